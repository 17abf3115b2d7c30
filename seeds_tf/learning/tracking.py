"""MLflow tracking of training runs, on when `MLFLOW_TRACKING_URI` is set, as the AI4OS platform does.

The platform injects `MLFLOW_TRACKING_URI`, `MLFLOW_TRACKING_USERNAME` and `MLFLOW_TRACKING_PASSWORD`;
MLflow's client reads all three. Each run logs its options, per-epoch metrics, test metrics, reports
and configuration, and its final model, registered as a new version with the alias `challenger`
(promoting it to `champion` is a person's decision).

The platform's MLflow is shared by all its users, and MLflow lets only an experiment's or a
registered model's creator write to it (its default permission for others is READ): with one name
for everyone, only the first user's trainings were ever tracked. A user's runs go to the experiment
and registered model `seeds_tf-<user name>` (`seeds_tf` without a user name); MLflow's own
`MLFLOW_EXPERIMENT_NAME` chooses another experiment.

The model is logged as a TensorFlow SavedModel (the keras flavor's `save_exported_model`): its graph
holds the preprocessing layer, so MLflow loads and serves it with TensorFlow alone. A `.keras` file
would need seeds_tf's custom layer imported before loading, which MLflow's keras flavor cannot do
(it takes neither `code_paths` nor custom objects).

Tracking never fails a training: an MLflow that is not installed, not reachable or refuses the
credentials is named in a warning, and the run completes locally. The client's retries are bounded
(unless the environment sets them), so a tracking server that goes down costs seconds, not minutes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import keras
import requests

_LOGGER = logging.getLogger(__name__)

TRACKING_ENV = "MLFLOW_TRACKING_URI"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
BASE_NAME = "seeds_tf"
NEW_VERSION_ALIAS = "challenger"
RUN_ID_TAG = "seeds_tf.run_id"
_CLIENT_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
"""MLflow's defaults retry for about 4 minutes per call against a server that is down."""
_PREFLIGHT_TIMEOUT_S = 10
Result = TypeVar("Result")


def mlflow_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    return bool(environ.get(TRACKING_ENV))


def experiment_name(environ: Mapping[str, str] = os.environ) -> str:
    """The experiment runs are logged to: `MLFLOW_EXPERIMENT_NAME`, else the user's own."""
    return environ.get(EXPERIMENT_ENV) or registered_model_name(environ)


def registered_model_name(environ: Mapping[str, str] = os.environ) -> str:
    """`seeds_tf-<user name>`, a name the user creates and so may write to on a shared server
    (MLflow refuses "/" and ":" in it), or `seeds_tf` when no user name is given."""
    user = environ.get(USERNAME_ENV, "")
    return f"{BASE_NAME}-{user.replace('/', '_').replace(':', '_')}" if user else BASE_NAME


def start_logger(run_id: str, options: dict[str, Any]) -> MlflowLogger | None:
    """An MlflowLogger for this run, or None (with a warning naming the reason) when MLflow is not
    installed, the tracking server cannot be reached, or it refuses the credentials."""
    try:
        import mlflow
    except ImportError:
        _LOGGER.warning(
            "%s is set but MLflow is not installed (pip install 'seeds_tf[mlflow]'): not tracking run %s",
            TRACKING_ENV,
            run_id,
        )
        return None
    problem = _preflight(os.environ[TRACKING_ENV])
    if problem is not None:
        _LOGGER.warning("MLflow tracking off for run %s: %s", run_id, problem)
        return None
    return MlflowLogger(mlflow, run_id, options)


class MlflowLogger(keras.callbacks.Callback):
    """Logs one seeds_tf run to MLflow; the MLflow run is named after the seeds_tf run id and tagged
    with it, so either finds the other. The first failure turns it off with a warning."""

    def __init__(self, mlflow, run_id: str, options: dict[str, Any]):
        super().__init__()
        self._mlflow = mlflow
        self._run_id = run_id
        self._options = options
        self._on = True

    def on_train_begin(self, logs=None):
        self._safely("start the run", self._start)

    def on_epoch_end(self, epoch, logs=None):
        metrics = {name: float(value) for name, value in (logs or {}).items()}
        self._safely("log the epoch's metrics", lambda: self._mlflow.log_metrics(metrics, step=epoch + 1))

    def finish(self, model: keras.Model, metrics: dict[str, float], folders: list[Path]) -> str | None:
        """Logs the final metrics, the run's folders (reports, conf) and the model, registers it
        with the alias `challenger`, and closes the MLflow run.

        Returns:
            The registered version, or None when it could not be registered.
        """
        version = self._safely("log the final model", lambda: self._log_model(model, metrics, folders))
        self._safely("close the run", self._mlflow.end_run)
        return version

    def abort(self) -> None:
        if self._safely("look up the run", self._mlflow.active_run) is not None:
            self._safely("mark the run failed", lambda: self._mlflow.end_run(status="FAILED"))

    def _start(self) -> None:
        experiment = self._mlflow.set_experiment(experiment_name())
        self._end_dead_attempts(experiment.experiment_id)
        self._mlflow.start_run(run_name=self._run_id, tags={RUN_ID_TAG: self._run_id})
        self._mlflow.log_params(self._options)

    def _end_dead_attempts(self, experiment_id: str) -> None:
        """Marks KILLED the MLflow runs of this seeds_tf run still RUNNING: those of an attempt
        whose process was killed (a cancelled DEEPaaS training, a crash), which nothing else ends.
        None is alive: a run is resumed only while no process trains it."""
        client = self._mlflow.MlflowClient()
        query = f"tags.`{RUN_ID_TAG}` = '{self._run_id}' and attributes.status = 'RUNNING'"
        for dead in client.search_runs([experiment_id], query):
            client.set_terminated(dead.info.run_id, status="KILLED")

    def _log_model(self, model: keras.Model, metrics: dict[str, float], folders: list[Path]) -> str:
        self._mlflow.log_metrics(metrics)
        for folder in folders:
            if folder.is_dir():
                self._mlflow.log_artifacts(str(folder), artifact_path=folder.name)
        with _keras_messages_to_logging():
            info = self._mlflow.keras.log_model(
                model,
                name="model",
                save_exported_model=True,
                signature=_signature(model),
                pip_requirements=_requirements(),
            )
        model_name = registered_model_name()
        registered = self._mlflow.register_model(info.model_uri, model_name)
        self._mlflow.MlflowClient().set_registered_model_alias(
            model_name, NEW_VERSION_ALIAS, registered.version
        )
        _LOGGER.info(
            "Run %s registered as %s version %s (@%s)",
            self._run_id,
            model_name,
            registered.version,
            NEW_VERSION_ALIAS,
        )
        return str(registered.version)

    def _safely(self, action: str, call: Callable[[], Result]) -> Result | None:
        """`call()` with bounded retries; its first failure warns and turns tracking off."""
        if not self._on:
            return None
        with _bounded_retries():
            try:
                return call()
            except Exception as error:  # tracking must never end a training
                self._on = False
                _LOGGER.warning(
                    "MLflow could not %s for run %s, tracking off for the rest of it: %s",
                    action,
                    self._run_id,
                    error,
                )
                with contextlib.suppress(Exception):
                    self._mlflow.end_run(status="FAILED")
                return None


def _preflight(uri: str) -> str | None:
    """Why the tracking server at `uri` cannot be used (unreachable, credentials refused), or None.
    Asks once, with a short timeout, instead of letting every MLflow call retry."""
    if not uri.startswith(("http://", "https://")):
        return None  # a local store (file:, sqlite:): MLflow reports its own errors
    username = os.environ.get(USERNAME_ENV)
    auth = (username, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if username else None
    try:
        answer = requests.get(
            f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": experiment_name()},
            auth=auth,
            timeout=_PREFLIGHT_TIMEOUT_S,
        )
    except requests.RequestException as error:
        return f"the tracking server {uri} cannot be reached ({type(error).__name__})"
    if answer.status_code in (401, 403):
        return f"the tracking server {uri} refused the credentials (HTTP {answer.status_code})"
    return None


@contextlib.contextmanager
def _bounded_retries() -> Iterator[None]:
    """MLflow's client reads its retry settings from the environment at each call: bound them for
    the duration of one call, keeping any the user set."""
    added = [name for name in _CLIENT_LIMITS if name not in os.environ]
    os.environ.update({name: _CLIENT_LIMITS[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextlib.contextmanager
def _keras_messages_to_logging() -> Iterator[None]:
    """Keras's export prints every variable it saves (hundreds of lines for Xception) and MLflow
    cannot pass it `verbose=False`: for this thread (Keras keeps the setting per thread), that
    message goes to the absl logger instead of stdout."""
    interactive = keras.config.is_interactive_logging_enabled()
    keras.config.disable_interactive_logging()
    try:
        yield
    finally:
        if interactive:
            keras.config.enable_interactive_logging()


def _signature(model: keras.Model):
    """The model's input and output tensors, stated rather than inferred from an example: a batch
    of RGB images in [0, 255] (float32, the run's size) in, the class probabilities out. Both are
    unnamed: the SavedModel's `serve` takes one positional tensor, and a named input would make
    MLflow ask for a dict."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    (image,) = model.inputs
    (probabilities,) = model.outputs
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(image.dtype), (-1, *image.shape[1:]))]),
        outputs=Schema([TensorSpec(np.dtype(probabilities.dtype), (-1, *probabilities.shape[1:]))]),
    )


def _requirements() -> list[str]:
    """What loading the logged model needs (MLflow adds itself), stated rather than inferred
    (faster, and exact): Keras and TensorFlow, pinned as installed. Not seeds_tf: the SavedModel
    needs none of its code, and seeds_tf is not on a package index."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for package in ("keras", "tensorflow", "tensorflow-cpu"):
        with contextlib.suppress(PackageNotFoundError):
            pinned.append(f"{package}=={version(package)}")
    return pinned
