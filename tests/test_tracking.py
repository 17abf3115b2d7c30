"""MLflow as the AI4OS platform runs it: a real `mlflow server` with basic auth on loopback, the
credentials in MLFLOW_TRACKING_USERNAME/PASSWORD. A training logs its options, per-epoch metrics,
reports, configuration and model, registered with the alias `challenger` and served by MLflow alone;
a tracking server that is down or refuses the credentials costs a warning, never the training."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from seeds_tf.classifier.model import load_classifier
from seeds_tf.core import config, files, runs
from seeds_tf.learning import tracking, training
from tests.deepaas_harness import free_port
from tests.helpers import SMALL_OPTIONS

ADMIN, PASSWORD = "admin", "seeds-admin-password-1234"
SERVER = Path(sys.prefix) / "mlflow-server" / "bin" / "mlflow"
"""The MLflow server, in an environment of its own that `make test` builds inside .venv: the
tests' environment has the client alone, as the image does."""
CONSUMER = """
import sys
import mlflow
import numpy as np
model = mlflow.pyfunc.load_model(sys.argv[1])
np.save(sys.argv[3], model.predict(np.load(sys.argv[2])))
sys.exit("seeds_tf was imported" if "seeds_tf" in sys.modules else 0)
"""
"""What a consumer of the registry runs, in a fresh interpreter that imports nothing of seeds_tf."""


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` with a SQLite store and served artifacts, on a free
    loopback port; stopped through its process group (uvicorn and its worker)."""
    if not SERVER.is_file():
        pytest.fail(f"no MLflow server at {SERVER}: `make test` installs it")
    folder = tmp_path_factory.mktemp("mlflow")
    (folder / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{folder}/auth.db\n"
        f"admin_username = {ADMIN}\nadmin_password = {PASSWORD}\nauth_cache_ttl_seconds = 60\n"
    )
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-secret",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    command = [
        str(SERVER),
        "server",
        "--app-name",
        "basic-auth",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{folder}/mlflow.db",
        "--serve-artifacts",
        "--artifacts-destination",
        str(folder / "artifacts"),
    ]
    with open(folder / "server.log", "wb") as log:
        process = subprocess.Popen(
            command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError((folder / "server.log").read_text()[-3000:])
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not answer within 120 s")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


def tracked_by(monkeypatch, url: str, password: str = PASSWORD) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def test_a_training_is_tracked_and_its_model_registered(data_roots, monkeypatch, mlflow_server, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    tracked_by(monkeypatch, mlflow_server)
    options = {**SMALL_OPTIONS, "epochs": 2, "lr_schedule": "cosine"}
    result = training.train(config.RunConfig.from_options(**options), data_roots)
    layout = runs.RunLayout(data_roots.models / result.run_id)
    summary = files.read_json(layout.summary_file)

    client = MlflowClient()
    experiment = client.get_experiment_by_name(f"seeds_tf-{ADMIN}")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`seeds_tf.run_id` = '{result.run_id}'")
    assert run.info.run_name == result.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["lr_schedule"] == "cosine"
    assert run.data.params["modelname"] == SMALL_OPTIONS["modelname"]
    assert "test_accuracy" in run.data.metrics
    assert [metric.step for metric in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"reports", "conf"} <= artifacts
    reports = {artifact.path for artifact in client.list_artifacts(run.info.run_id, "reports")}
    assert "reports/training_curves.png" in reports

    version = client.get_model_version_by_alias(f"seeds_tf-{ADMIN}", tracking.NEW_VERSION_ALIAS)
    assert version.run_id == run.info.run_id
    assert summary["mlflow_model_version"] == version.version

    # The registered model serves through MLflow alone: the Keras model's probabilities, for a
    # batch of float32 RGB images in [0, 255] of the run's size, with no seeds_tf code loaded.
    size = options["image_size"]
    images = np.random.default_rng(0).uniform(0, 255, (3, size, size, 3)).astype("float32")
    np.save(tmp_path / "images.npy", images)
    registered = f"models:/seeds_tf-{ADMIN}@{tracking.NEW_VERSION_ALIAS}"
    command = [sys.executable, "-c", CONSUMER, registered, tmp_path / "images.npy", tmp_path / "answer.npy"]
    served = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert served.returncode == 0, served.stderr[-3000:]
    keras_probabilities = load_classifier(layout.final_model).predict(images, verbose=0)
    np.testing.assert_allclose(np.load(tmp_path / "answer.npy"), keras_probabilities, atol=1e-6)
    requirements = Path(mlflow.pyfunc.get_model_dependencies(registered)).read_text()
    assert "seeds_tf" not in requirements


def test_every_user_of_a_shared_server_is_tracked(monkeypatch, mlflow_server):
    """The platform's MLflow is shared, and MLflow lets others only READ what a user created: with
    one experiment for everyone, the second user's runs were refused (403) and never tracked.
    Each user logs to, and registers in, names of their own."""
    from mlflow import MlflowClient

    for user in ("alice@example.org", "bob@example.org"):
        created = requests.post(
            f"{mlflow_server}/api/2.0/mlflow/users/create",
            json={"username": user, "password": f"{user}-password"},
            auth=(ADMIN, PASSWORD),
            timeout=30,
        )
        assert created.ok, created.text
        tracked_by(monkeypatch, mlflow_server, password=f"{user}-password")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        logger = tracking.start_logger("2026-11-30_000000", {"epochs": 1})
        logger.on_train_begin()
        logger.on_epoch_end(0, {"loss": 1.0})
        logger.abort()  # the run's end, through the logger
        client = MlflowClient()
        experiment = client.get_experiment_by_name(f"seeds_tf-{user}")
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.data.metrics["loss"] == 1.0
        assert run.info.status == "FAILED"
        client.create_registered_model(tracking.registered_model_name())
    # MLflow's own variable chooses another experiment.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "seed bank trials")
    assert tracking.experiment_name() == "seed bank trials"
    assert tracking.registered_model_name() == "seeds_tf-bob@example.org"


def test_the_mlflow_run_of_an_attempt_killed_with_its_worker_is_ended_by_the_next(monkeypatch, mlflow_server):
    """A cancelled DEEPaaS training kills its worker, and nothing ended its MLflow run: it showed
    RUNNING forever beside the resumed attempt's. The resumed attempt marks it KILLED."""
    import mlflow
    from mlflow import MlflowClient

    tracked_by(monkeypatch, mlflow_server)
    run_id = "2026-11-30_120000"
    experiment = mlflow.set_experiment(tracking.experiment_name())
    client = MlflowClient()
    # What the killed worker left: its attempt's run, never ended.
    client.create_run(experiment.experiment_id, tags={"seeds_tf.run_id": run_id}, run_name=run_id)
    resumed = tracking.start_logger(run_id, {"resume": run_id})
    resumed.on_train_begin()
    resumed.abort()  # the resumed attempt's end, through the logger
    attempts = client.search_runs([experiment.experiment_id], f"tags.`seeds_tf.run_id` = '{run_id}'")
    assert sorted(attempt.info.status for attempt in attempts) == ["FAILED", "KILLED"]


def test_refused_credentials_cost_a_warning_not_the_training(monkeypatch, mlflow_server, caplog):
    """The real server answers 401 to the preflight: no logger, so the training runs untracked (as
    every training without MLflow does) and records no model version."""
    tracked_by(monkeypatch, mlflow_server, password="not-the-password")  # noqa: S106 - wrong on purpose
    with caplog.at_level(logging.WARNING, logger="seeds_tf.learning.tracking"):
        assert tracking.start_logger("2026-11-30_000000", {}) is None
    assert "refused the credentials (HTTP 401)" in caplog.text


def test_a_tracking_server_that_is_down_is_found_out_at_once(monkeypatch, caplog):
    """One short request tells (the preflight), instead of MLflow's minutes of retries per call."""
    tracked_by(monkeypatch, f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="seeds_tf.learning.tracking"):
        assert tracking.start_logger("2026-11-30_000000", {}) is None
    assert "cannot be reached" in caplog.text


def test_without_mlflow_installed_the_run_is_not_tracked(monkeypatch, caplog):
    """An image built without the mlflow extra, on a platform that injects MLFLOW_TRACKING_URI."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets when it is absent
    with caplog.at_level(logging.WARNING, logger="seeds_tf.learning.tracking"):
        assert tracking.start_logger("2026-11-30_000000", {}) is None
    assert "MLflow is not installed" in caplog.text
