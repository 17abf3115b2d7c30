"""The DEEPaaS request arguments and response schema, generated from the config specs.

Each option is defined once, in etc/config.yaml; here it becomes a marshmallow field with its type,
description, default and validation, so the Swagger UI documents exactly what the code accepts and
webargs rejects bad values with a 422 before any worker is involved.
"""

from __future__ import annotations

from collections.abc import Callable

import marshmallow
from marshmallow import fields, validate

from seeds_tf.core import runs
from seeds_tf.core.config import RUN_SECTIONS, OptionSpec, option_specs
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import Roots

UPLOAD_FIELDS = ("image", "image_2", "image_3", "image_4")
"""The file fields of predict: DEEPaaS 2.6 passes one file per field, so several photos need several."""

_FIELD_TYPES = {str: fields.Str, int: fields.Int, float: fields.Float, bool: fields.Bool}


def option_field(spec: OptionSpec, extra_validator: Callable | None = None) -> fields.Field:
    """A marshmallow field for one option: optional, defaulting to the config value."""
    validators = []
    metadata = {"description": spec.help}
    if spec.choices is not None:
        validators.append(validate.OneOf(list(spec.choices)))
        metadata["enum"] = list(spec.choices)
    if spec.min is not None or spec.max is not None:
        validators.append(validate.Range(min=spec.min, max=spec.max))
    if extra_validator is not None:
        validators.append(extra_validator)
    return _FIELD_TYPES[spec.type](
        required=False, load_default=spec.default, validate=validators, metadata=metadata
    )


def predict_arguments() -> dict[str, fields.Field]:
    """The arguments of POST predict: the image upload, the prediction options, the accept header."""
    specs = option_specs("prediction")
    uploads = {
        name: fields.Field(
            required=False,
            load_default=None,
            metadata={
                "type": "file",
                "location": "form",
                # The platform's Gradio UI draws an image widget only for a description with "image".
                "description": "Image of a seed (a photo): JPEG, PNG, WebP, TIFF, BMP or GIF."
                if name == "image"
                else "Another image, for several seeds or one specimen in several photos (merge).",
            },
        )
        for name in UPLOAD_FIELDS
    }
    return {
        **uploads,
        "urls": fields.Str(
            required=False,
            load_default="",
            metadata={"description": "http(s) URLs of photos, separated by spaces, commas or new lines."},
        ),
        "data": fields.Str(
            required=False,
            load_default="",
            metadata={
                "description": "Photos as base64 data URIs (data:image/jpeg;base64,...), space separated."
            },
        ),
        "top_k": option_field(specs["top_k"]),
        "timestamp": option_field(specs["timestamp"], _existing_run),
        "ckpt_name": option_field(specs["ckpt_name"]),
        "merge": option_field(specs["merge"]),
        "tta": option_field(specs["tta"]),
        "engine": option_field(specs["engine"]),
        # DEEPaaS appends "*/*" to this list and takes its first entry as the default.
        "accept": fields.Str(
            required=False,
            load_default="application/json",
            validate=validate.OneOf(["application/json", "image/png"]),
            metadata={
                "location": "headers",
                "description": "application/json: the species and genera; image/png: the photo with a "
                "Grad-CAM heatmap of the top species and the top three labels.",
            },
        ),
    }


def train_arguments() -> dict[str, fields.Field]:
    """The arguments of POST train: every model, training and augmentation option of the config."""
    # splits_directory may be absent: a folder-per-class dataset is split by the training itself.
    path_checks = {
        "images_directory": _data_path("images_directory", must_be_folder=True),
        "splits_directory": _data_path("splits_directory", must_be_folder=False),
        "weights": _weights,
        "resume": _interrupted_run,
    }
    return {
        name: option_field(spec, path_checks.get(name))
        for section in RUN_SECTIONS
        for name, spec in option_specs(section).items()
    }


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


class _ImageResult(marshmallow.Schema):
    image = fields.Str(required=True, metadata={"description": "Name of the uploaded file."})
    species = fields.List(
        fields.Nested(_Species), required=True, metadata={"description": "Most probable first."}
    )
    genera = fields.List(
        fields.Nested(_Genus), required=True, metadata={"description": "Most probable first."}
    )


class ModelPredictionResponse(marshmallow.Schema):
    """The JSON answer of predict. The name is the one the platform's Gradio UI looks up in the spec."""

    run_id = fields.Str(required=True, metadata={"description": "Run that made the prediction."})
    checkpoint = fields.Str(required=True, metadata={"description": "Checkpoint of the run used."})
    tta = fields.Str(required=True, metadata={"description": "Test-time augmentation applied."})
    engine = fields.Str(required=True, metadata={"description": "Runtime that ran the network."})
    merged = fields.Bool(required=True, metadata={"description": "All images answered as one specimen."})
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


def _data_path(field: str, must_be_folder: bool) -> Callable[[str], None]:
    """Validates a path argument in the server process: inside the data folder (and a folder)."""

    def check(value: str) -> None:
        try:
            path = Roots.from_env().data_path(value, field)
            is_folder = path.is_dir() if must_be_folder else True
        except InputError as error:
            raise marshmallow.ValidationError(error.problem) from None
        except (ValueError, OSError) as error:
            # Names no file system accepts: a NUL byte (ValueError from resolve) or a name over 255
            # bytes (ENAMETOOLONG from is_dir). Uncaught here, webargs would answer 500.
            reason = getattr(error, "strerror", None) or str(error)
            raise marshmallow.ValidationError(f"{value!r} is not a valid path ({reason})") from None
        if not is_folder:
            raise marshmallow.ValidationError(f"{value!r} is not a folder inside the data folder")

    return check


def _weights(value: str) -> None:
    if value not in ("imagenet", "none"):
        _data_path("weights", must_be_folder=False)(value)
