"""A training shows how far it is: its progress file, the model's metadata, and the server's log."""

import logging
import shutil
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import requests

from seeds_tf.core import files, runs
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV
from seeds_tf.learning import progress
from tests.deepaas_harness import MODEL_URL, deepaas_run
from tests.helpers import SMALL_OPTIONS


class _Reader(keras.callbacks.Callback):
    """Reads the progress file and the models folder's trainings in progress as a user would while
    the run trains: placed after ProgressLog, it sees each record just written."""

    def __init__(self, layout: runs.RunLayout):
        super().__init__()
        self._layout = layout
        self.batches: list[dict] = []
        self.epochs: list[dict] = []
        self.listed: list[list[dict]] = []

    def on_train_batch_begin(self, batch, logs=None):
        self.batches.append(files.read_json(self._layout.progress_file))

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(files.read_json(self._layout.progress_file))
        self.listed.append(runs.trainings_in_progress(self._layout.root.parent))


def _fit(callbacks: list, epochs: int, initial_epoch: int = 0) -> None:
    """A real, tiny Keras fit: 40 samples in 4 batches per epoch."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=10, epochs=epochs, initial_epoch=initial_epoch, callbacks=callbacks, verbose=0)


def test_the_progress_file_follows_the_fit_and_a_line_is_logged_per_epoch(tmp_path, caplog):
    layout = runs.create_run(tmp_path / "models")
    reader = _Reader(layout)
    with (
        caplog.at_level(logging.INFO, logger="seeds_tf.learning.progress"),
        progress.tracking(layout, epochs=3, batch_interval_s=0) as tracker,
    ):
        preparing = files.read_json(layout.progress_file)
        _fit([tracker, reader], epochs=3)
        finishing = files.read_json(layout.progress_file)
        tracker.finish()
    done = files.read_json(layout.progress_file)

    assert preparing["state"] == "preparing"
    assert (preparing["epoch"], preparing["epochs"], preparing["eta_s"]) == (None, 3, None)

    first, *rest = reader.batches[:4]
    assert (first["state"], first["epoch"], first["batch"], first["batches"]) == ("training", 0, 0, 4)
    assert first["eta_s"] is None, "no pace to go by before the first batch"
    assert [record["batch"] for record in rest] == [1, 2, 3]
    assert all(record["eta_s"] >= 0 for record in rest)

    assert [record["epoch"] for record in reader.epochs] == [1, 2, 3]
    for record in reader.epochs:
        assert record["state"] == "training"
        assert set(record["metrics"]) == {"loss", "accuracy"}
        assert record["elapsed_s"] >= 0
    assert reader.epochs[-1]["eta_s"] == 0
    assert [[listed["run_id"] for listed in listing] for listing in reader.listed] == [[layout.run_id]] * 3
    assert reader.listed[-1][0]["epoch"] == 3

    assert (finishing["state"], finishing["epoch"], finishing["eta_s"]) == ("finishing", 3, None)
    assert (done["state"], done["epoch"], done["epochs"], done["eta_s"]) == ("done", 3, 3, 0)
    assert runs.trainings_in_progress(layout.root.parent) == []

    lines = [record.getMessage() for record in caplog.records if record.name == progress.__name__]
    assert len(lines) == 3
    for number, line in enumerate(lines, start=1):
        assert line.startswith(f"Run {layout.run_id} epoch {number}/3 in ")
        assert "loss " in line and "accuracy " in line
        assert " elapsed, about " in line and line.endswith(" left")
    assert lines[-1].endswith("about 0 s left")


def test_a_resumed_run_counts_from_its_restored_epoch(tmp_path):
    layout = runs.create_run(tmp_path / "models")
    reader = _Reader(layout)
    with progress.tracking(layout, epochs=4, batch_interval_s=0) as tracker:
        _fit([tracker, reader], epochs=4, initial_epoch=2)
    assert (reader.batches[0]["epoch"], reader.batches[0]["eta_s"]) == (2, None)
    assert [record["epoch"] for record in reader.epochs] == [3, 4]


def test_a_training_that_fails_is_no_longer_in_progress(tmp_path):
    layout = runs.create_run(tmp_path / "models")
    with pytest.raises(ValueError, match="broken"), progress.tracking(layout, epochs=5) as tracker:
        _fit([tracker], epochs=1)
        raise ValueError("broken")
    assert files.read_json(layout.progress_file)["state"] == "finishing"
    assert runs.trainings_in_progress(layout.root.parent) == []


def test_a_killed_training_is_no_longer_in_progress(tmp_path):
    """The mark is a lock the kernel releases with the process: a training killed with SIGKILL
    (as DEEPaaS cancels one) leaves its progress file saying "training", and is not listed."""
    models = tmp_path / "models"
    layout = runs.create_run(models)
    files.write_json(layout.progress_file, {"state": "training", "epoch": 1, "epochs": 5})
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from seeds_tf.core import runs\n"
            "with runs.mark_in_progress(runs.RunLayout(Path(sys.argv[1]))):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(300)\n",
            str(layout.root),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        listed = runs.trainings_in_progress(models)
        assert listed == [{"state": "training", "epoch": 1, "epochs": 5, "run_id": layout.run_id}]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert runs.trainings_in_progress(models) == []
    assert files.read_json(layout.progress_file)["state"] == "training"


def test_a_training_through_deepaas_run_shows_its_progress_and_logs_its_epochs(session_roots, tmp_path):
    """Through a real deepaas-run: while the training runs in a DEEPaaS worker, the model's
    metadata shows it in progress (epoch k of N, the last metrics, an estimate of the time left);
    once done, it is no longer in progress and its progress file says done; the worker's epoch
    lines are in the server's log (deepaas-run's stderr), in the server's format."""
    data, models = tmp_path / "data", tmp_path / "models"
    shutil.copytree(session_roots.data, data)
    env = {DATA_ENV: str(data), MODELS_ENV: str(models)}
    log = tmp_path / "server.log"
    options = {**SMALL_OPTIONS, "epochs": 3}
    with deepaas_run(env, log) as url:
        started = requests.post(f"{url}{MODEL_URL}/train/", params=options, timeout=30)
        assert started.status_code == 200, started.text
        uuid = started.json()["uuid"]
        seen = _progress_seen_mid_training(url, uuid)
        status = _finished(url, uuid)
        metadata = requests.get(f"{url}{MODEL_URL}/", timeout=10).json()

    assert status["status"] == "done", status
    run_id = status["result"]["output"]["run_id"]
    assert seen is not None, f"no training in progress seen in the metadata:\n{log.read_text()}"
    assert seen["run_id"] == run_id
    assert seen["state"] == "training"
    assert 1 <= seen["epoch"] < seen["epochs"] == 3
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(seen["metrics"])
    assert seen["eta_s"] > 0
    assert metadata["trainings_in_progress"] == []
    assert run_id in metadata["runs"]
    final = files.read_json(runs.RunLayout(models / run_id).progress_file)
    assert (final["state"], final["epoch"], final["epochs"], final["eta_s"]) == ("done", 3, 3, 0)

    text = log.read_text()
    for epoch in (1, 2, 3):
        assert f"INFO seeds_tf.learning.progress [-] Run {run_id} epoch {epoch}/3 in " in text, text


def _progress_seen_mid_training(url: str, uuid: str, timeout: float = 600) -> dict | None:
    """The first record of the metadata's trainings in progress with an epoch done and one more to
    train, or None when the training ended before one was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metadata = requests.get(f"{url}{MODEL_URL}/", timeout=10).json()
        for record in metadata["trainings_in_progress"]:
            if record["state"] == "training" and 1 <= record["epoch"] < record["epochs"]:
                return record
        if requests.get(f"{url}{MODEL_URL}/train/{uuid}", timeout=10).json()["status"] != "running":
            return None
        time.sleep(0.2)
    return None


def _finished(url: str, uuid: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = requests.get(f"{url}{MODEL_URL}/train/{uuid}", timeout=10).json()
        if status["status"] != "running":
            return status
        time.sleep(0.5)
    raise AssertionError(f"training {uuid} still running after {timeout} s")
