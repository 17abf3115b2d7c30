"""Clients and a training at once, against a real `deepaas-run --workers 2` on loopback.

DEEPaaS runs predict and train in the same worker pools: with two workers a training must take one of
them and leave the other answering predictions, the training must show how far it is (the model's
metadata, the server's log), and the finished run must be servable at once. The requests, their
checks and the memory readings are benchmarks/load.py's, so the load test and this suite judge
answers the same way. One server and one training serve every check of this module: starting a
server and training a run each cost seconds.
"""

import dataclasses
import time

import pytest
import requests

from benchmarks import load
from seeds_tf.core import files, runs
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV, Roots
from tests.deepaas_harness import MODEL_URL
from tests.helpers import SMALL_OPTIONS, copy_roots

TRAINING_TIMEOUT_S = 300
PAUSE_S = 0.3
"""Between requests during the training: enough requests to show they are answered, and a look at
the metadata in each epoch, while leaving the training most of the two cores."""
EPOCHS = 4


@dataclasses.dataclass
class Story:
    """What clients saw of one training through the server, and what it left behind."""

    roots: Roots
    run_id: str
    training: dict
    during: load.Tally
    progress_seen: dict | None
    metadata_after: dict
    new_run: load.Tally
    load_figures: dict
    uploads_left: list
    log: str


def _status(url: str, uuid: str) -> dict:
    answer = requests.get(f"{url}{MODEL_URL}/train/{uuid}", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _in_progress(url: str) -> dict | None:
    """The metadata's training in progress with an epoch done and one more to train, if any."""
    metadata = requests.get(f"{url}{MODEL_URL}/", timeout=30).json()
    return next(
        (
            record
            for record in metadata["trainings_in_progress"]
            if record["state"] == "training" and 1 <= record["epoch"] < record["epochs"]
        ),
        None,
    )


@pytest.fixture(scope="module")
def story(tmp_path_factory, session_roots, tiny_run) -> Story:
    """A training started through the API of a server that serves the tiny run; while it runs, the
    mix of valid and invalid requests, one after another, and a look at the metadata; then a
    prediction with the new run and the load test in small over both workers."""
    base = tmp_path_factory.mktemp("concurrency")
    roots = copy_roots(session_roots, base)
    uploads = base / "uploads"
    uploads.mkdir()
    env = {DATA_ENV: str(roots.data), MODELS_ENV: str(roots.models), "TMPDIR": str(uploads)}
    log = base / "server.log"
    with load.serving(env, log, workers=2) as (url, pid), requests.Session() as session:
        target = load.load_target(url, roots, tiny_run)
        started = requests.post(
            f"{url}{MODEL_URL}/train/", data={**SMALL_OPTIONS, "epochs": EPOCHS}, timeout=30
        )
        assert started.status_code == 200, started.text
        uuid = started.json()["uuid"]
        during, seen = load.Tally(), None
        deadline = time.monotonic() + TRAINING_TIMEOUT_S
        while (training := _status(url, uuid))["status"] == "running" and time.monotonic() < deadline:
            seen = seen or _in_progress(url)
            load.send(session, load.MIX[during.sent % len(load.MIX)], target, during)
            time.sleep(PAUSE_S)
        metadata_after = requests.get(f"{url}{MODEL_URL}/", timeout=30).json()
        assert training["status"] == "done", training
        run_id = training["result"]["output"]["run_id"]
        new_target, new_run = load.load_target(url, roots, run_id), load.Tally()
        load.send(session, "predict", new_target, new_run)
        figures = load.summarise(*load.load_run(new_target, pid, clients=2, total=16), workers=2)
    return Story(
        roots,
        run_id,
        training,
        during,
        seen,
        metadata_after,
        new_run,
        figures,
        load.uploads_left(uploads),
        log.read_text(),
    )


def test_predictions_are_answered_while_a_training_runs(story):
    assert story.during.failures == 0, story.during.problems
    assert story.during.statuses["predict 200"] >= 3, story.during.statuses
    assert (story.roots.models / story.run_id / "run.json").is_file()
    assert story.new_run.failures == 0, story.new_run.problems
    # The load test in small: concurrent clients over both workers, with the new run.
    figures = story.load_figures
    assert figures["failures"] == figures["warmup_failures"] == 0, figures["first_problems"]
    assert figures["held"] == 16
    assert figures["rss_mib_after"]["16"] > 0
    assert story.uploads_left == []


def test_a_training_shows_its_progress_and_logs_its_epochs(story):
    """While the training runs in a DEEPaaS worker, the model's metadata shows it in progress (epoch
    k of N, the last metrics, an estimate of the time left); once done, it is no longer in progress
    and its progress file says done; the worker's epoch lines are in the server's log (deepaas-run's
    stderr), in the server's format."""
    seen = story.progress_seen
    assert seen is not None, f"no training in progress seen in the metadata:\n{story.log}"
    assert seen["run_id"] == story.run_id
    assert seen["state"] == "training"
    assert 1 <= seen["epoch"] < seen["epochs"] == EPOCHS
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(seen["metrics"])
    assert seen["eta_s"] > 0
    assert story.metadata_after["trainings_in_progress"] == []
    assert story.run_id in story.metadata_after["runs"]
    final = files.read_json(runs.RunLayout(story.roots.models / story.run_id).progress_file)
    assert (final["state"], final["epoch"], final["epochs"], final["eta_s"]) == ("done", EPOCHS, EPOCHS, 0)
    for epoch in range(1, EPOCHS + 1):
        line = f"INFO seeds_tf.learning.progress [-] Run {story.run_id} epoch {epoch}/{EPOCHS} in "
        assert line in story.log, story.log
