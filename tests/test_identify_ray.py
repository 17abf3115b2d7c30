"""seeds-tf identify --ray on a real Ray cluster of two nodes on loopback: the same rows as one machine.

One cluster for the module (starting Ray costs seconds), made by Ray's own test utility
(ray.cluster_utils.Cluster: a head and a second node, one CPU each) in a process of its own, so that
nothing of Ray runs in the test process. Every Ray server binds 127.0.0.1: the nodes are given that
address, and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from swapping a loopback address for the
machine's own (what it does for a cluster that other machines may join).
"""

from __future__ import annotations

import csv
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from seeds_tf.core import runs
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import MODELS_ENV
from seeds_tf.data.sources import ALLOW_ENV
from seeds_tf.prediction import batch, batch_ray
from seeds_tf.prediction import calibration as calibrating
from tests.deepaas_harness import free_port
from tests.loopback import http_server

_CLUSTER = """
import sys
from ray.cluster_utils import Cluster

node = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "object_store_memory": 80 * 1024**2}
cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
cluster.add_node(**node)
print(cluster.address, flush=True)
sys.stdin.read()  # until the test closes it
cluster.shutdown()
"""


@pytest.fixture(scope="module")
def ray_env() -> Iterator[dict[str, str]]:
    """The environment of the cluster and of the jobs: Ray's files in a short temporary folder
    (its socket paths must stay short), no usage statistics sent, loopback only."""
    folder = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield {
        **os.environ,
        "RAY_TMPDIR": folder,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(ray_env) -> Iterator[str]:
    """The address of a running two-node Ray cluster on 127.0.0.1."""
    with subprocess.Popen(
        [sys.executable, "-c", _CLUSTER],
        env=ray_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as process:
        try:
            address = process.stdout.readline().strip()
            assert address.startswith("127.0.0.1:"), f"the cluster did not start: {address!r}"
            yield address
        finally:
            process.stdin.close()  # the cluster shuts down
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def collection(tmp_path_factory, session_roots) -> Path:
    """A few hundred small images (the tiny dataset's, four times over), one of them named in
    Latin-1, and a broken file."""
    folder = tmp_path_factory.mktemp("collection")
    for copy in range(4):
        shutil.copytree(session_roots.data / "tiny" / "images", folder / f"box{copy}")
    first = min(folder.rglob("*.jpg"))
    first.rename(first.with_name(os.fsdecode(b"caf\xe9.jpg")))
    (folder / "box1" / "broken.png").write_bytes(b"\x89PNG broken")
    return folder


def test_a_job_on_two_ray_nodes_writes_the_rows_one_machine_writes(
    cluster, ray_env, session_roots, tiny_run, collection, tmp_path, monkeypatch
):
    """The job's own settings reach the workers, whose environment is their node's: here a URL on
    loopback, allowed to the job alone, is fetched on the cluster as on one machine."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(collection))
    with http_server(handler) as base:
        listed = tmp_path / "images.txt"
        paths = sorted(collection.rglob("*.*"))  # the images and the broken file
        url = f"{base}/{paths[-1].relative_to(collection).as_posix()}"
        listed.write_bytes(b"".join(os.fsencode(path) + b"\n" for path in paths) + url.encode() + b"\n")
        on_ray = tmp_path / "ray.csv"
        command = [
            sys.executable, "-m", "seeds_tf.cli", "identify", str(listed), "--output", str(on_ray),
            "--run", tiny_run, "--engine", "keras", "--top-k", "3", "--batch-size", "16", "--ray", cluster,
        ]  # fmt: skip
        done = subprocess.run(
            command,
            env={**ray_env, MODELS_ENV: str(session_roots.models), ALLOW_ENV: "127.0.0.1"},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert '"failed": 1' in done.stdout
        assert f"Answered {len(paths) + 1} images on 2 Ray nodes" in done.stderr, done.stderr[-3000:]

        here = tmp_path / "here.csv"
        monkeypatch.setenv(ALLOW_ENV, "127.0.0.1")
        options = batch.IdentifyOptions(timestamp=tiny_run, engine="keras", top_k=3, batch_size=16)
        batch.identify(session_roots, listed, here, options)
    tables = []
    for path in (on_ray, here):
        with open(path, newline="", errors=batch.NAMES_ERRORS) as stream:
            tables.append(list(csv.DictReader(stream)))
    ray_rows, rows = tables
    assert len(rows) == len(list(collection.rglob("*.jpg"))) + 2 > 200
    assert [row["input"] for row in ray_rows] == [row["input"] for row in rows]
    assert ray_rows[-1]["input"] == url and ray_rows[-1]["error"] == ""
    assert os.fsdecode(b"caf\xe9.jpg") in {Path(row["input"]).name for row in ray_rows if not row["error"]}
    calibration = calibrating.load_calibration(runs.RunLayout(session_roots.models / tiny_run))
    for ray_row, row in zip(ray_rows, rows, strict=True):
        for column, value in row.items():
            if column.endswith(("probability", "ood_score", "specimen_distance")) and value:
                assert float(ray_row[column]) == pytest.approx(float(value), abs=1e-5), column
            elif column not in ("decision", "out_of_distribution") or not _on_a_threshold(row, calibration):
                assert ray_row[column] == value, column


def _on_a_threshold(row: dict[str, str], calibration: calibrating.Calibration) -> bool:
    """Whether a score of `row` is, to 1e-5, the threshold that judges it. The thresholds are scores
    of the run's calibration images, which the collection holds: the decision of such an image falls
    either way between two machines whose batches round differently (by about 1e-7)."""
    judged = [(row["ood_score"], calibration.ood_threshold)]
    judged += [(row["species_1_probability"], calibration.thresholds.species)]
    judged += [(row["genus_1_probability"], calibration.thresholds.genus)]
    if calibration.specimens is not None:
        judged += [(row["specimen_distance"], calibration.specimens.distance_threshold)]
    return any(score and abs(float(score) - threshold) <= 1e-5 for score, threshold in judged)


@pytest.mark.parametrize(
    ("node_cpus", "cpus_per_worker", "workers"),
    [([1.0, 1.0], 1.0, 2), ([3.0, 3.0], 2.0, 2), ([4.0, 1.0], 0.5, 10), ([1.0, 1.0], 2.0, 0), ([], 1.0, 0)],
)
def test_workers_fit_on_one_node_each(node_cpus, cpus_per_worker, workers):
    """--ray-cpus-per-worker 2 on a cluster of 1-CPU nodes waited forever ('pending: 2 CPU'), as
    did the workers counted on the cluster's total beyond what its nodes hold: refused, naming it."""
    if workers:
        assert batch_ray.worker_count(node_cpus, cpus_per_worker, "head:6379") == workers
        return
    with pytest.raises(InputError) as refused:
        batch_ray.worker_count(node_cpus, cpus_per_worker, "head:6379")
    assert refused.value.field == "ray_cpus_per_worker"
    assert f"no node of the Ray cluster at head:6379 has {cpus_per_worker:g} CPUs" in refused.value.problem


@pytest.mark.parametrize(
    "address", ["127.0.0.1:{closed}", "ray://127.0.0.1:{closed}", "127.0.0.1", "head:port"]
)
def test_an_address_where_no_head_answers_is_refused_at_once(tmp_path, address):
    """--ray 127.0.0.1:1 (no cluster there) loaded the run, listed the inputs, then ray.init retried
    'Failed to connect to GCS' for minutes without an error: refused before the job starts."""
    with pytest.raises(InputError) as refused:
        batch_ray.ray_answerer(address.format(closed=free_port()), tmp_path)
    assert refused.value.field == "ray"


def test_ray_missing_is_refused_naming_ray(session_roots, monkeypatch):
    """--ray without Ray installed raised ModuleNotFoundError as a traceback, after the job had
    listed its inputs and loaded the run: refused before, saying what to install."""
    monkeypatch.setitem(sys.modules, "ray", None)  # how Python marks a module that cannot be imported
    with pytest.raises(InputError, match=r"ray: Ray is not installed here: pip install 'seeds_tf\[ray\]'"):
        batch_ray.ray_answerer("auto", session_roots.models)
