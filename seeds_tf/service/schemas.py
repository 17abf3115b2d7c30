"""The DEEPaaS request arguments and response schema, generated from the config specs.

Each option is defined once, in etc/config.yaml; here it becomes a marshmallow field with its type,
description, default and validation, so the Swagger UI documents exactly what the code accepts and
webargs rejects bad values with a 422 before any worker is involved. The descriptions are written for
the Swagger UI, which renders them as Markdown and shows neither a field's limits nor an empty default
well: the limits are spelt out in the description, and an empty default is left out of the spec.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import marshmallow
from marshmallow import fields, validate

from seeds_tf.core import runs
from seeds_tf.core.config import RUN_SECTIONS, OptionSpec, option_specs
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import Roots
from seeds_tf.hosting import remote
from seeds_tf.learning import preflight

UPLOAD_FIELDS = ("image", "image_2", "image_3", "image_4")
"""The file fields of predict: DEEPaaS 2.6 passes one file per field, so several photos need several."""

_ANSWER_TYPES = ("application/json", "image/png")
"""What predict answers with, chosen by the `accept` header (DEEPaaS adds `*/*`, answered as JSON)."""

_FIELD_TYPES = {str: fields.Str, int: fields.Int, float: fields.Float, bool: fields.Bool}


class _Unlisted(str):
    """A default the OpenAPI spec leaves out, so the Swagger UI shows no empty "Default value :" and
    preselects nothing. apispec skips callable defaults; marshmallow calls it for the plain string;
    deepaas-cli, which takes the field's default as it is, gets a string all the same."""

    def __call__(self) -> str:
        return str(self)


def option_field(spec: OptionSpec, extra_validator: Callable | None = None) -> fields.Field:
    """A marshmallow field for one option: optional, defaulting to the config value.

    Args:
        spec: the option, from config.yaml.
        extra_validator: a check the server process runs as well (a run or path that must exist),
            raising marshmallow.ValidationError. Defaults to None (the spec's own checks only).
    """
    validators = []
    metadata = {"description": _description(spec)}
    if spec.choices is not None:
        validators.append(validate.OneOf(list(spec.choices)))
        metadata["enum"] = list(spec.choices)
    if spec.min is not None or spec.max is not None:
        validators.append(validate.Range(min=spec.min, max=spec.max))
    if extra_validator is not None:
        validators.append(extra_validator)
    default = _Unlisted(spec.default) if spec.default == "" else spec.default
    return _FIELD_TYPES[spec.type](
        required=False, load_default=default, validate=validators, metadata=metadata
    )


def predict_arguments() -> dict[str, fields.Field]:
    """The arguments of POST predict: the image uploads, URLs and data URIs, the prediction options
    of config.yaml, the accept header."""
    uploads = {
        # The platform's Gradio UI draws an image widget only for a description with "image".
        name: _file_field(
            "Image of a seed (a photo): JPEG, PNG, WebP, TIFF, BMP or GIF."
            if name == "image"
            else "Another image, for several seeds or one specimen in several photos (merge)."
        )
        for name in UPLOAD_FIELDS
    }
    return {
        **uploads,
        # In the form body, where the Swagger UI then sends them: a URL holding a data URI went past
        # aiohttp's 8 KB limit. The query string and a JSON body still work (request_parsing).
        "urls": fields.Str(
            required=False,
            load_default=_Unlisted(""),
            metadata={
                "location": "form",
                "description": "http(s) URLs of photos, separated by spaces, commas or new lines.",
            },
        ),
        "data": fields.Str(
            required=False,
            load_default=_Unlisted(""),
            metadata={
                "location": "form",
                "description": "Photos as base64 data URIs (`data:image/jpeg;base64,...`), space separated.",
            },
        ),
        **_option_fields("prediction"),
        "accept": _accept_field(),
    }


def train_arguments() -> dict[str, fields.Field]:
    """The arguments of POST train: every model, training and augmentation option of the config."""
    return _option_fields(*RUN_SECTIONS)


def _file_field(description: str) -> fields.Field:
    """An optional upload. deepaas-cli recognises a file only by the exact type fields.Field, which
    marshmallow 3.26 warns against instantiating: a warning about the pinned stack, kept out of the log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`Field` should not be instantiated", DeprecationWarning)
        return fields.Field(
            required=False,
            load_default=_Unlisted(""),  # no file (None would show as "Default value : null")
            metadata={"type": "file", "location": "form", "description": description},
        )


def _option_fields(*sections: str) -> dict[str, fields.Field]:
    """The fields of the options of config.yaml's `sections`, in the file's order, each with the
    check the server process runs for it (`_SERVER_CHECKS`)."""
    return {
        name: option_field(spec, _SERVER_CHECKS.get(name))
        for section in sections
        for name, spec in option_specs(section).items()
    }


def _accept_field() -> fields.Field:
    """The `accept` header. DEEPaaS appends "*/*" to its choices, defaults to the first and lists them
    all in the "Response content type" selector. The Swagger UI sends this field in place of that
    selector, so the field lists no default (the selector decides unless a value is chosen here),
    and its listed choices leave "*/*" to the selector (the UI's Markdown showed it as "/")."""
    choices = [_Unlisted(_ANSWER_TYPES[0]), *_ANSWER_TYPES[1:]]
    return fields.Str(
        required=False,
        load_default=choices[0],
        validate=validate.OneOf(choices),
        metadata={
            "location": "headers",
            "enum": list(_ANSWER_TYPES),
            "description": "The answer's format: `application/json`, the species and genera; "
            "`image/png`, each photo with a Grad-CAM heatmap of its top species (the merged answer's, "
            "with merge) and the top three labels, one under another. The HTTP `Accept` header, "
            "negotiated (media ranges, q-values): `*/*` (curl's "
            "default), a browser's `application/json, text/plain, */*` and no value answer JSON, "
            "`image/*` the PNG; one that allows neither gets a 406. In the Swagger UI, a value "
            'chosen here wins over the "Response content type" selector; left empty, the selector '
            "decides. Errors are JSON whatever is asked: a 4xx with "
            '`{"message": "<field>: <problem>", "field": "<field>"}`.',
        },
    )


class _Links(marshmallow.Schema):
    wikipedia = fields.Url(required=True)
    gbif = fields.Url(required=True)
    images = fields.Url(required=True)


class _Species(marshmallow.Schema):
    label_id = fields.Int(required=True, metadata={"description": "Line of the class in classes.txt."})
    label = fields.Str(required=True, metadata={"description": "Species name, 'Genus species'."})
    probability = fields.Float(required=True, metadata={"description": "Softmax probability."})
    info = fields.Str(required=True, metadata={"description": "The class's line of info.txt, or ''."})
    links = fields.Nested(_Links, required=True, metadata={"description": "Where to read more."})


class _Genus(marshmallow.Schema):
    genus = fields.Str(required=True, metadata={"description": "First word of the species names."})
    probability = fields.Float(required=True, metadata={"description": "Sum over its species."})


class _Neighbour(marshmallow.Schema):
    label = fields.Str(required=True, metadata={"description": "Species of the reference image."})
    label_id = fields.Int(required=True, metadata={"description": "Its line in classes.txt."})
    similarity = fields.Float(
        required=True, metadata={"description": "Cosine similarity of the features, 1 = the same."}
    )
    path = fields.Str(required=True, metadata={"description": "The image, relative to the dataset's images."})


_DECISIONS = ("species", "genus", "unknown", "not_calibrated")
_DECISION_HELP = (
    "How far to trust the answer: 'species' (the top species reaches the run's threshold for its target "
    "precision, and the training images most like it agree), 'genus' (the species does not, its genus "
    "does), 'unknown' (neither, or the image is unlike the training images), 'not_calibrated' (the run "
    "has no calibration: seeds-tf calibrate)."
)


class _ImageResult(marshmallow.Schema):
    image = fields.Str(required=True, metadata={"description": "Name of the uploaded file."})
    species = fields.List(
        fields.Nested(_Species), required=True, metadata={"description": "Most probable first."}
    )
    genera = fields.List(
        fields.Nested(_Genus), required=True, metadata={"description": "Most probable first."}
    )
    decision = fields.Str(
        required=True,
        validate=validate.OneOf(_DECISIONS),
        metadata={"description": _DECISION_HELP},
    )
    ood_score = fields.Float(
        required=True,
        metadata={
            "description": "Entropy of the probabilities over log(classes), 0 to 1: higher is less like "
            "the training images."
        },
    )
    out_of_distribution = fields.Bool(
        required=True,
        allow_none=True,
        metadata={
            "description": "ood_score or specimen_distance is above the run's threshold for it (null: the "
            "run is not calibrated)."
        },
    )
    neighbours_agree = fields.Bool(
        required=True,
        allow_none=True,
        metadata={
            "description": "The majority species of the 5 training images most like this one is the top "
            "species; the decision is 'species' only if so (null: the run's calibration does not use its "
            "reference specimens)."
        },
    )
    specimen_distance = fields.Float(
        required=True,
        allow_none=True,
        metadata={
            "description": "1 - the cosine similarity of the 5th most similar training image, 0 to 2: "
            "higher is less like any training image (null: not used, as neighbours_agree)."
        },
    )
    neighbours = fields.List(
        fields.Nested(_Neighbour),
        metadata={"description": "With neighbours=k: the k training images most like this one."},
    )


class ModelPredictionResponse(marshmallow.Schema):
    """The JSON answer of predict. The name is the one the platform's Gradio UI looks up in the spec."""

    run_id = fields.Str(required=True, metadata={"description": "Run that made the prediction."})
    checkpoint = fields.Str(required=True, metadata={"description": "Checkpoint of the run used."})
    tta = fields.Str(required=True, metadata={"description": "Test-time augmentation applied."})
    engine = fields.Str(required=True, metadata={"description": "Runtime that ran the network."})
    merged = fields.Bool(required=True, metadata={"description": "All images answered as one specimen."})
    calibrated = fields.Bool(
        required=True, metadata={"description": "The probabilities are scaled by the run's temperature."}
    )
    results = fields.List(
        fields.Nested(_ImageResult), required=True, metadata={"description": "One per image."}
    )
    # The platform's Gradio UI draws a classification widget for top-level labels and probabilities.
    labels = fields.List(
        fields.Str(),
        required=True,
        metadata={"description": "The first result's species, most probable first (as in results)."},
    )
    probabilities = fields.List(
        fields.Float(),
        required=True,
        metadata={"description": "The probabilities of `labels`, in the same order."},
    )
    decision = fields.Str(
        required=True,
        validate=validate.OneOf(_DECISIONS),
        metadata={"description": "The first result's decision (as in results)."},
    )


def _existing_run(run_id: str) -> None:
    """Validates `timestamp` in the server process, against the runs on disk at request time."""
    try:
        runs.resolve_run(Roots.from_env().models, run_id)
    except InputError as error:
        raise marshmallow.ValidationError(error.problem) from None


def _interrupted_run(run_id: str) -> None:
    """Validates `resume` in the server process: empty, or an interrupted run listed in models/."""
    if run_id:
        try:
            runs.resolve_interrupted_run(Roots.from_env().models, run_id)
        except InputError as error:
            raise marshmallow.ValidationError(error.problem) from None


def _data_path(field: str, must_be: str = "") -> Callable[[str], None]:
    """Validates a path argument in the server process (preflight.existing_path)."""

    def check(value: str) -> None:
        try:
            preflight.existing_path(Roots.from_env(), value, field, must_be)
        except InputError as error:
            raise marshmallow.ValidationError(error.problem) from None

    return check


def _weights(value: str) -> None:
    """Validates `weights` in the server process (preflight.weights_file): a missing file was found
    in the worker only, once the request had been answered 200."""
    try:
        preflight.weights_file(Roots.from_env(), value)
    except InputError as error:
        raise marshmallow.ValidationError(error.problem) from None


def _upload_destination(destination: str) -> None:
    """Validates `upload_to` in the server process: empty, or an rclone destination with rclone
    installed. The worker checks it again (for the CLI), but only once the request is answered."""
    if destination:
        try:
            remote.check_destination(destination)
        except InputError as error:
            raise marshmallow.ValidationError(error.problem) from None


_SERVER_CHECKS: dict[str, Callable[[str], None]] = {
    "timestamp": _existing_run,
    "images_directory": _data_path("images_directory", must_be="folder"),
    # splits_directory may be absent: a folder-per-class dataset is split by the training itself.
    "splits_directory": _data_path("splits_directory"),
    "weights": _weights,
    "resume": _interrupted_run,
    "upload_to": _upload_destination,
}
"""Checks of option values against the disk, run in the server process at request time, by name."""


def _description(spec: OptionSpec) -> str:
    """The option's help as Swagger UI Markdown, followed by its limits, which the UI does not show."""
    limits = _limits(spec)
    return f"{_markdown(spec.help)} {limits}" if limits else _markdown(spec.help)


def _limits(spec: OptionSpec) -> str:
    """The allowed range in words ("From 1 to 1000."), or "" for an option without one."""
    low, high = (None if bound is None else _number(spec, bound) for bound in (spec.min, spec.max))
    if low is not None and high is not None:
        return f"From {low} to {high}."
    if low is not None:
        return f"At least {low}."
    return f"At most {high}." if high is not None else ""


def _number(spec: OptionSpec, value: float) -> str:
    return str(int(value)) if spec.type is int else f"{value:g}"


_MARKDOWN_SPECIAL = re.compile(r"\\|\*|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")
"""What Markdown takes for emphasis or an escape: a backslash, an asterisk (`*/*` showed as "/"), an
underscore at either end of a word. One inside a word (val_fraction) renders as it is."""


def _markdown(text: str) -> str:
    """`text` with the characters of `_MARKDOWN_SPECIAL` escaped, except inside `code` spans."""
    parts = text.split("`")
    parts[::2] = [_MARKDOWN_SPECIAL.sub(r"\\\g<0>", part) for part in parts[::2]]
    return "`".join(parts)
