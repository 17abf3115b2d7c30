"""Training across a cluster: two `seeds-tf train` worker processes on loopback, one run."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from seeds_tf.classifier.model import load_classifier
from seeds_tf.core import files, runs
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV
from seeds_tf.hosting import admission
from seeds_tf.learning import distribute, training
from seeds_tf.learning.training import weights_digest
from tests.deepaas_harness import free_port
from tests.helpers import SMALL_OPTIONS, train_flags, unstarted_run

SEEDS_TF = Path(sys.executable).parent / "seeds-tf"


CLUSTER_OPTIONS = {**SMALL_OPTIONS, "modelname": "VGG16", "run_eagerly": False}
"""Compiled steps, as a cluster trains (MultiWorkerMirroredStrategy's collectives run in the graph),
of VGG16: tracing is most of a two-step training, and VGG16's 16 layers trace in a fraction of
MobileNetV3Small's time (both workers: 17 s against 33 s)."""


def _tf_config(ports: list[int], index: int) -> str:
    workers = [f"127.0.0.1:{port}" for port in ports]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def test_two_workers_train_one_run_and_agree(data_roots, tmp_path):
    ports = [free_port(), free_port()]
    flags = train_flags(CLUSTER_OPTIONS)
    workers = [
        subprocess.Popen(
            [str(SEEDS_TF), "--quiet", "train", *flags],
            env={
                **os.environ,
                DATA_ENV: str(data_roots.data),
                MODELS_ENV: str(data_roots.models),
                "TF_CONFIG": _tf_config(ports, index),
                "TMPDIR": str(tmp_path),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    try:
        outputs = [worker.communicate(timeout=300) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-3000:]
    chief, other = (json.loads(stdout) for stdout, _ in outputs)

    assert chief["weights_digest"] == other["weights_digest"]
    assert chief["metrics"] == other["metrics"]
    layout = runs.resolve_run(data_roots.models, chief["run_id"])
    assert files.read_json(layout.summary_file)["weights_digest"] == chief["weights_digest"]
    assert weights_digest(load_classifier(layout.final_model)) == chief["weights_digest"]
    assert list(tmp_path.glob("seeds_tf_worker_*")) == [], "the worker's scratch run was left behind"


PAIR = {"worker": ["a:1", "b:1"]}
CHIEF_AND_WORKER = {"chief": ["a:1"], "worker": ["b:1"]}


def test_a_worker_resumes_in_a_scratch_copy_while_the_chief_holds_the_run(data_roots, monkeypatch, tmp_path):
    """On a cluster, the chief resumes the interrupted run itself and holds its in-progress lock
    while it trains; the other workers train in lockstep in a scratch copy of the run. Had they
    opened the run too, they would wait for the chief's lock while the chief waits for them in its
    first collective step: a deadlock."""
    interrupted = unstarted_run(data_roots, CLUSTER_OPTIONS)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": PAIR, "task": {"type": "worker", "index": 1}}))
    with (
        runs.mark_in_progress(interrupted),  # the chief, training
        training._run_folder(data_roots, resume=interrupted.run_id) as copy,
    ):
        assert copy.root.is_relative_to(scratch)
        assert copy.run_id == interrupted.run_id
        assert copy.config() == interrupted.config()
        assert copy.dataset_dir.joinpath("train.txt").read_bytes() == (
            interrupted.dataset_dir.joinpath("train.txt").read_bytes()
        )
        with runs.mark_in_progress(copy):  # the worker, training: a lock of its own
            assert sorted(path.name for path in copy.root.iterdir()) == sorted(
                path.name for path in interrupted.root.iterdir()
            )
    assert list(scratch.iterdir()) == [], "the worker's scratch copy was left behind"


@pytest.mark.parametrize(
    ("tf_config", "multi_worker", "chief"),
    [
        (None, False, True),
        ({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}, False, True),
        ({"cluster": PAIR, "task": {"type": "worker", "index": 0}}, True, True),
        ({"cluster": PAIR, "task": {"type": "worker", "index": 1}}, True, False),
        ({"cluster": CHIEF_AND_WORKER, "task": {"type": "worker", "index": 0}}, True, False),
        ({"cluster": CHIEF_AND_WORKER, "task": {"type": "chief", "index": 0}}, True, True),
    ],
)
def test_roles_from_tf_config(monkeypatch, tf_config, multi_worker, chief):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    assert distribute.is_multi_worker() is multi_worker
    assert distribute.is_chief() is chief


@pytest.mark.parametrize(
    ("tf_config", "expected"),
    [
        ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}', "is not JSON"),
        ('["a:1", "b:1"]', "expected an object with a 'cluster' object"),
        (json.dumps({"cluster": PAIR}), "worker 0..1"),
        (json.dumps({"cluster": PAIR, "task": {"type": "worker", "index": 2}}), "worker 0..1"),
        (json.dumps({"cluster": PAIR, "task": {"type": "chief", "index": 0}}), "worker 0..1"),
        (json.dumps({"cluster": CHIEF_AND_WORKER, "task": {"type": "chief", "index": 1}}), "chief 0..0"),
    ],
)
def test_a_mistaken_tf_config_is_refused_at_start_naming_it(monkeypatch, tf_config, expected):
    """A TF_CONFIG with a typo, or whose task is not one of its cluster's, failed with a traceback
    from json or TensorFlow's cluster resolver (and a worker took itself for no chief first)."""
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(InputError) as refused:
        distribute.is_chief()
    assert refused.value.field == "TF_CONFIG"
    assert expected in refused.value.problem
    assert tf_config in refused.value.problem


def test_a_worker_whose_peer_never_starts_ends_after_the_cluster_timeout(data_roots, tmp_path):
    """TensorFlow waits for a cluster's every task with no time limit, holding the GIL, and it
    catches SIGTERM: a worker whose peer never started held its machine and the
    models folder's training reservation for ever. It now ends with status 1 after the timeout it
    announced, and the next training is admitted."""
    ports = [free_port(), free_port()]
    worker = subprocess.Popen(
        [str(SEEDS_TF), "train", *train_flags(CLUSTER_OPTIONS)],
        env={
            **os.environ,
            DATA_ENV: str(data_roots.data),
            MODELS_ENV: str(data_roots.models),
            "TF_CONFIG": _tf_config(ports, 0),
            distribute.CLUSTER_TIMEOUT_ENV: "2",
            "TMPDIR": str(tmp_path),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = worker.communicate(timeout=120)
    finally:
        worker.kill()

    assert worker.returncode == 1, stderr[-3000:]
    assert stdout == ""
    waited = stderr.index("Waiting at most 2 s for every task of TF_CONFIG's cluster to start")
    assert f"worker 1 (127.0.0.1:{ports[1]})" in stderr[waited:]
    assert f"{distribute.CLUSTER_TIMEOUT_ENV}=SECONDS waits longer" in stderr[waited:]
    assert "/job:worker/replica:0/task:1" in stderr  # the straggler, named by the leader (worker 0)
    ended = stderr.index("Timeout (0:00:02)!", waited)
    assert "learning/distribute.py" in stderr[ended:]
    assert [entry.name for entry in data_roots.models.iterdir() if not entry.name.startswith(".")] == []
    admission.reserve_training(data_roots.models)()  # the reservation ended with the process


@pytest.mark.parametrize("text", ["0", "-5", "ten", "nan", "inf"])
def test_a_cluster_timeout_that_is_not_seconds_is_refused_naming_it(monkeypatch, text):
    monkeypatch.setenv(distribute.CLUSTER_TIMEOUT_ENV, text)
    with pytest.raises(InputError) as refused:
        distribute.cluster_timeout_s()
    assert refused.value.field == distribute.CLUSTER_TIMEOUT_ENV
    assert repr(text) in refused.value.problem


def test_the_cluster_timeout_defaults_to_ten_minutes(monkeypatch):
    monkeypatch.delenv(distribute.CLUSTER_TIMEOUT_ENV, raising=False)
    assert distribute.cluster_timeout_s() == distribute.DEFAULT_CLUSTER_TIMEOUT_S == 600
    monkeypatch.setenv(distribute.CLUSTER_TIMEOUT_ENV, " 90.5 ")
    assert distribute.cluster_timeout_s() == 90.5
