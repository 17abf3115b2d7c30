"""The DEEPaaS v2 model interface of seeds_tf: a thin adapter over the core modules.

DEEPaaS loads this module through the `deepaas.v2.model` entry point. Metadata and argument
definitions run in the server process, so this module imports no TensorFlow; predict, train and warm
run in worker processes, which import the model code on first use.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from deepaas import config as deepaas_config
from oslo_config import cfg

from seeds_tf import __version__
from seeds_tf.classifier import engine_choice
from seeds_tf.core import config, runs, startup
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import Roots
from seeds_tf.data import sources
from seeds_tf.data.images import Upload
from seeds_tf.hosting import admission, monitor
from seeds_tf.learning import preflight
from seeds_tf.prediction.calibration import UnreadableCalibration, load_calibration
from seeds_tf.service import dependency_warnings, request_parsing, schemas

_LOGGER = logging.getLogger(__name__)

schema = schemas.ModelPredictionResponse

MODEL_NAME = "seeds_tf"
"""The name setup.cfg registers in the deepaas.v2.model group, and DEEPaaS' route to this model."""


def _admit_a_training(args: dict[str, Any]) -> Callable[[], None]:
    """Runs in the server process for each valid POST train: a second training gets a 409 at once,
    not a place in the workers' queue, and a resume given options it would ignore, or whose run's
    own options no longer hold (its upload destination, its folders), a 422, as `seeds-tf train`
    checks them. Returns the release of the admission."""
    roots = Roots.from_env()
    if args.get("resume"):
        preflight.check(config.RunConfig.from_options(**args), roots)
    return admission.reserve_training(roots.models)


dependency_warnings.silence_deprecations()
request_parsing.install(admit_training=_admit_a_training)


class ClientError(web.HTTPUnprocessableEntity):
    """An HTTP 422 that survives the trip from a DEEPaaS worker to the server.

    DEEPaaS sends an HTTPException raised in a worker back as the response, but aiohttp's own
    exceptions cannot be unpickled (the request would hang): `__reduce__` rebuilds this one from
    its field and problem. The body has the shape of every client error (request_parsing.error_text).
    """

    def __init__(self, field: str, problem: str):
        super().__init__(text=request_parsing.error_text(field, problem), content_type="application/json")
        self.field = field
        self.problem = problem

    def __reduce__(self):
        return (type(self), (self.field, self.problem))

    def __str__(self) -> str:
        """What deepaas-cli (and the platform's serverless path, which runs it) shows of a refusal:
        the field and the problem, not the status' reason alone."""
        return f"{self.field}: {self.problem}"


def get_metadata() -> dict[str, Any]:
    """The model's description, its working runs, the promoted run, the summary of the run that
    serves requests naming none (`model`) and the engine `engine=auto` runs it with on this CPU
    and why (`engine`), the broken runs with the reason each cannot serve, the trainings in
    progress with how far each is (seeds_tf.learning.progress), and the interrupted runs, which
    `resume=<id>` finishes (after a cancelled training, its id is listed nowhere else)."""
    models = Roots.from_env().models
    listing = runs.list_runs(models)
    default = runs.default_order(models, listing)[0] if listing.working else None
    return {
        "name": MODEL_NAME,
        "version": __version__,
        "summary": "Identifies plant species (and genus) from photos of their seeds.",
        "description": (
            "Names the plant species in a photo of a seed with a Keras image classifier "
            "(Xception by default), with calibrated probabilities. Replaces the DEEP "
            "'image classification with TensorFlow' seeds service (743 species, 493 genera)."
        ),
        "author": "seeds_tf developers",
        "authors": ["seeds_tf developers"],
        "license": "Apache-2.0",
        "url": "https://github.com/seeds-tf/seeds_tf",
        # DEEPaaS' own self link is replaced by these, so it is repeated; its schema wants a type.
        "links": [
            {"rel": "self", "href": _self_href(), "type": "application/json"},
            {"rel": "source", "href": "https://github.com/seeds-tf/seeds_tf", "type": "text/html"},
            {
                "rel": "predecessor",
                "href": "https://github.com/deephdc/image-classification-tf",
                "type": "text/html",
            },
        ],
        "runs": list(listing.working),
        "broken": listing.broken_list(),
        "promoted": runs.promoted_run(models),
        "model": listing.working[default] if default else None,
        "engine": _auto_engine(models, default) if default else None,
        "trainings_in_progress": runs.trainings_in_progress(models),
        "interrupted": runs.interrupted_runs(models),
    }


def _self_href() -> str:
    """This model's route, under deepaas-run's `--base-path`: a fixed `/v2/models/seeds_tf` was a
    404 on a server started with one. deepaas-cli registers no such option (no route either)."""
    try:
        base = deepaas_config.CONF.base_path or ""
    except cfg.NoSuchOptError:
        base = ""
    return f"{base.rstrip('/')}/v2/models/{MODEL_NAME}"


def _auto_engine(models: Path, run_id: str) -> dict[str, Any]:
    """The engine `engine=auto` runs `run_id` with on this CPU and why: the timings it was chosen
    by, "only keras", or that it is measured at the run's first load here; for a run whose answers
    use its reference specimens, among the exports that qualify for it (inference.LoadedRun.engine)."""
    layout = runs.RunLayout(models / run_id)
    try:
        fitted = load_calibration(layout)
    except UnreadableCalibration as error:  # the run does not load: requests go to the next one
        return {"run_id": run_id, "engine": None, "reason": str(error)}
    embeds = fitted is not None and fitted.specimens is not None and layout.has_index
    choice = engine_choice.recorded_choice(layout.exports_dir, embeds=embeds)
    if choice is None:
        return {"run_id": run_id, "engine": None, "reason": "not measured on this CPU yet: at the first load"}
    return {**choice.to_dict(), "run_id": run_id}


def warm() -> None:
    """Loads the newest working run into this worker with its engine, run once on a blank image so
    that the first request pays no tracing; without a run, the server still starts, and the worker
    loads no TensorFlow (seconds and hundreds of MB) until a request needs it. Starts TensorBoard on
    the monitor port when `SEEDS_TF_MONITOR` is on."""
    _worker_logging()
    try:
        sources.FetchPolicy.from_env()
    except ValueError as error:
        _LOGGER.error("Predictions from URLs are refused until this setting is corrected: %s", error)
    roots = Roots.from_env()
    monitor.ensure_from_env(roots.models)
    try:
        runs.resolve_run(roots.models, "")  # raises, saying why, when there is no working run
        startup.import_tensorflow()
        from seeds_tf.prediction import inference

        inference.choose_run(roots, _run_cache()).engine("auto")
    except InputError as error:
        _LOGGER.warning("No model to warm up: %s", error)


def get_predict_args() -> dict:
    return schemas.predict_arguments()


def predict(**args) -> dict[str, Any] | bytes:
    """The species in the uploaded, linked or inlined images as JSON, or with `accept: image/png`
    each image with a Grad-CAM heatmap of its top species (explain.explain_request)."""
    _worker_logging()
    files = {name: args[name] for name in schemas.UPLOAD_FIELDS if args.get(name)}  # empty: no file
    try:
        with _client_errors():
            options = config.load(
                config.PredictConfig, **{name: args[name] for name in config.option_specs("prediction")}
            )
            roots = Roots.from_env()
            # Raises, saying why, before anything is fetched or TensorFlow is loaded (seconds and
            # hundreds of MB): a worker with no such run to answer from stays light.
            runs.resolve_run(roots.models, options.timestamp)
            startup.import_tensorflow()
            from seeds_tf.prediction import explain, inference

            uploads = sources.gather_images(
                [_read_upload(name, file) for name, file in files.items()],
                args["urls"],
                args["data"],
                _url_policy(args["urls"]),
            )
            if args.get("accept") == "image/png":
                return explain.explain_request(roots, _run_cache(), options, uploads)
            return inference.predict(roots, _run_cache(), options, uploads)
    finally:
        for file in files.values():
            _delete_upload(file)


def _url_policy(urls: str) -> sources.FetchPolicy:
    """The deployment's URL settings (sources.FetchPolicy.from_env), read for a request that names
    URLs: a mistake in them (which warm logs) refuses URLs, saying which setting, and leaves uploads
    answered, where it made every prediction a bare 500.

    Raises:
        InputError: naming `urls`, for settings that cannot be used.
    """
    if not urls.strip():
        return sources.FetchPolicy()
    try:
        return sources.FetchPolicy.from_env()
    except ValueError as error:
        raise InputError(
            "urls",
            f"this server fetches no URL until its operator corrects its setting {error}: upload the image",
        ) from None


def get_train_args() -> dict:
    return schemas.train_arguments()


def train(**args) -> dict[str, Any]:
    """Trains a new run. A bad option or dataset raises InputError, which DEEPaaS reports as the
    training's error message."""
    startup.import_tensorflow()
    from seeds_tf.learning import training

    _worker_logging()
    run_config = config.RunConfig.from_options(**args)
    roots = Roots.from_env()
    monitor.ensure_from_env(roots.models)
    # Anyone who can reach the API may train: such a run is a candidate until an operator promotes it.
    return training.train(run_config, roots, candidate=True).to_dict()


_WORKER_LOG_FORMAT = "%(asctime)s.%(msecs)03d %(process)d %(levelname)s %(name)s [-] %(message)s"
"""oslo.log's default format, which deepaas-run's own lines have."""


@functools.cache
def _worker_logging() -> None:
    """Sends this process's log to its stderr when nothing else does, once per process.

    DEEPaaS starts its workers with `spawn` and sets up no logging in them: their INFO lines (a
    training's epochs) were lost and their warnings printed bare. A worker's stderr is deepaas-run's,
    so its lines join the server's log, in the server's format: seeds_tf's from INFO, other
    libraries' from WARNING. Where logging is already set up (deepaas-cli, tests), nothing changes.
    """
    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_WORKER_LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))
    logging.getLogger().addHandler(handler)
    logging.getLogger("seeds_tf").setLevel(logging.INFO)


@functools.cache
def _run_cache():
    """The runs loaded in this worker process (made on first use, never in the server process)."""
    from seeds_tf.prediction import inference

    return inference.RunCache()


@contextlib.contextmanager
def _client_errors():
    try:
        yield
    except InputError as error:
        raise ClientError(error.field, error.problem) from None


def _read_upload(field: str, upload) -> Upload:
    """The image uploaded in `field` (DEEPaaS UploadedFile; a plain string is refused)."""
    filename = getattr(upload, "filename", None)
    if filename is None:
        raise InputError(field, f"expected an uploaded file (multipart form field {field!r})")
    name = getattr(upload, "original_filename", None) or os.path.basename(filename)
    with open(filename, "rb") as stream:
        return Upload(name, stream.read(), field)


def _delete_upload(upload) -> None:
    """DEEPaaS leaves each upload in a temporary file and never deletes it."""
    filename = getattr(upload, "filename", None)
    if filename:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(filename)
