"""Several clients and a training at once, against a real `deepaas-run --workers 2` on loopback.

DEEPaaS runs predict and train in the same worker pools: with two workers a training must take one of
them and leave the other answering predictions, and the finished run must be servable at once. The
requests, their checks and the memory readings are benchmarks/load.py's, so the load test and this
suite judge answers the same way; one server serves both checks, as starting one costs seconds.
"""

import time

import requests

from benchmarks import load
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV
from tests.deepaas_harness import MODEL_URL
from tests.helpers import SMALL_OPTIONS

TRAINING_TIMEOUT_S = 180
PAUSE_S = 0.5
"""Between requests during the training: enough requests to show they are answered, few enough to
leave the training most of the two cores."""


def _training(url: str, uuid: str) -> dict:
    answer = requests.get(f"{url}{MODEL_URL}/train/{uuid}", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _requests_during_training(
    session: requests.Session, target: load.Target, uuid: str
) -> tuple[dict, load.Tally]:
    """The mix of valid and invalid requests, one after another, while the training runs; the
    training's final state and the tally of the requests."""
    tally = load.Tally()
    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    while (training := _training(target.url, uuid))["status"] == "running" and time.monotonic() < deadline:
        load.send(session, load.MIX[tally.sent % len(load.MIX)], target, tally)
        time.sleep(PAUSE_S)
    return training, tally


def test_predictions_are_answered_while_a_training_runs(roots, tiny_run, tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    env = {DATA_ENV: str(roots.data), MODELS_ENV: str(roots.models), "TMPDIR": str(uploads)}
    with load.serving(env, tmp_path / "server.log", workers=2) as (url, pid), requests.Session() as session:
        target = load.load_target(url, roots, tiny_run)
        started = requests.post(f"{url}{MODEL_URL}/train/", data=SMALL_OPTIONS, timeout=30)
        assert started.status_code == 200, started.text

        training, tally = _requests_during_training(session, target, started.json()["uuid"])
        assert training["status"] == "done", training
        assert tally.failures == 0, tally.problems
        assert tally.statuses["predict 200"] >= 3, tally.statuses

        run_id = training["result"]["output"]["run_id"]
        assert (roots.models / run_id / "run.json").is_file()
        new = load.load_target(url, roots, run_id)
        load.send(session, "predict", new, tally)
        assert tally.failures == 0, tally.problems

        # The load test in small: concurrent clients over both workers, with the new run.
        figures = load.summarise(*load.load_run(new, pid, clients=2, total=16), workers=2)
        assert figures["failures"] == figures["warmup_failures"] == 0, figures["first_problems"]
        assert figures["held"] == 16
        assert figures["rss_mib_after"]["16"] > 0
    assert load.uploads_left(uploads) == []
