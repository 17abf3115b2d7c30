"""A training shows how far it is: its progress file and the models folder's trainings in progress
(through a real deepaas-run, the metadata and the server's log: test_concurrency.py)."""

import json
import logging
import subprocess
import sys

import keras
import numpy as np
import pytest

from seeds_tf.core import files, runs
from seeds_tf.learning import progress


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


def _fit(callbacks: list, epochs: int, initial_epoch: int = 0, *, diverged: bool = False) -> None:
    """A real, tiny Keras fit: 40 samples in 4 batches per epoch (NaN samples, when `diverged`: a
    loss and metrics that are no numbers)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype("float32")
    if diverged:
        x[:] = np.nan
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


def test_metrics_that_are_no_numbers_are_null_and_the_listing_stays_json(tmp_path, caplog):
    """A loss of NaN was written as a bare NaN, which the model's metadata then sent: no JSON parser
    but Python's reads it, and the Swagger UI lost the whole listing."""
    layout = runs.create_run(tmp_path / "models")
    reader = _Reader(layout)
    with (
        caplog.at_level(logging.INFO, logger="seeds_tf.learning.progress"),
        progress.tracking(layout, epochs=1) as tracker,
    ):
        _fit([tracker, reader], epochs=1, diverged=True)

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    strict = json.loads(layout.progress_file.read_text(), parse_constant=no_constants)
    assert strict["metrics"]["loss"] is None
    assert reader.listed[0][0]["metrics"]["loss"] is None
    assert "loss nan" in caplog.records[-1].getMessage()  # the log line says what happened


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
