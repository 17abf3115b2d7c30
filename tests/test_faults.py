"""Faults: saves killed half-way, a full or read-only models folder, damaged runs.

None of them may lose a finished run, leave half a file at an artifact's name, or take the service
down. (A training cancelled through DEEPaaS and then resumed is tested in test_api.py; a training
killed with SIGKILL and resumed, in test_training_features.py.)
"""

import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import deepaas.model.v2
import pytest

from seeds_tf import api, cli
from seeds_tf.core import config, files, runs
from seeds_tf.core.errors import InputError
from seeds_tf.learning import demo
from seeds_tf.prediction import inference
from tests.deepaas_harness import MODEL_URL
from tests.helpers import SMALL_OPTIONS, in_process_service, seed_photo, train_flags

VGG_OPTIONS = {**SMALL_OPTIONS, "modelname": "VGG16"}
"""The training-machinery options on a network of 16 layers, for trainings that only have to reach
a save."""

# Run in a separate Python: saves a small model with save_classifier, but its zip writer stops half
# way through the weights, flushes what it wrote to disk, says so, and waits to be killed.
_SAVE_KILLED_HALF_WAY = """
import sys, time, zipfile
from pathlib import Path

import keras

from seeds_tf.classifier.model import save_classifier

def half_then_wait(archive, name, data, *args, **kwargs):
    with archive.open(str(name), "w") as entry:
        entry.write(data[: len(data) // 2])
        archive.fp.flush()
        print("half written", flush=True)
        time.sleep(600)

zipfile.ZipFile.writestr = half_then_wait
inputs = keras.Input((64,))
model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(256)(inputs)))
save_classifier(model, Path(sys.argv[1]))
"""


# Run in a separate Python as root: drops CAP_DAC_OVERRIDE from the bounding set, then runs the
# command; a root process started without that capability obeys file modes.
_WITHOUT_DAC_OVERRIDE = """
import ctypes, os, sys
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE = 24, 1
if ctypes.CDLL(None, use_errno=True).prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, 0, 0, 0):
    sys.exit(f"cannot drop CAP_DAC_OVERRIDE: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def _snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under folder, by relative path; hidden files (temporaries) aside."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


def _copy_run(models: Path, run_id: str, new_id: str) -> runs.RunLayout:
    """A copy of a run made of hard links (fast, no space): replace files, never edit them in place."""
    shutil.copytree(models / run_id, models / new_id, copy_function=os.link)
    layout = runs.RunLayout(models / new_id)
    summary = files.read_json(layout.summary_file)
    layout.summary_file.unlink()
    files.write_json(layout.summary_file, {**summary, "run_id": new_id, "created": new_id})
    return layout


def _replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def _damage(models: Path, run_id: str) -> dict[str, runs.RunLayout]:
    """Copies of a run, each damaged one way, all newer than it. The last two ("weights", and
    "calibration" with a calibration.json that is not JSON) pass the listing's checks and only fail
    when the run is loaded."""
    layouts = {
        name: _copy_run(models, run_id, f"2099-01-01_00000{index}")
        for index, name in enumerate(("run.json", "truncated", "garbage", "weights", "calibration"), start=1)
    }
    _replace(layouts["run.json"].summary_file, b'{"run_id": "2099-01-01_000001", "metr')
    model = layouts["truncated"].final_model.read_bytes()
    _replace(layouts["truncated"].final_model, model[: len(model) // 2])
    _replace(layouts["garbage"].final_model, os.urandom(4096))
    with zipfile.ZipFile(io.BytesIO(model)) as original:
        members = {name: original.read(name) for name in original.namelist()}
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as damaged:
        for name, data in members.items():
            damaged.writestr(name, data[: len(data) // 2] if name.startswith("model.weights") else data)
    _replace(layouts["weights"].final_model, archive.getvalue())
    _replace(layouts["calibration"].calibration_file, b'{"temperature": 1.5, "thresh')
    return layouts


def test_a_save_killed_half_way_leaves_the_previous_model_and_nothing_visible(roots, tiny_run):
    """A process killed (SIGKILL) while save_classifier writes a new final.keras over the old one:
    the old file is intact at its name, and the half-written one is a hidden temporary that no
    listing of runs or checkpoints offers."""
    layout = runs.RunLayout(roots.models / tiny_run)
    before = _snapshot(layout.root)
    names_before = set(os.listdir(layout.ckpts_dir))
    saving = subprocess.Popen(
        [sys.executable, "-c", _SAVE_KILLED_HALF_WAY, str(layout.final_model)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = saving.stdout.readline()
    finally:
        saving.send_signal(signal.SIGKILL)
        _, errors = saving.communicate(timeout=60)
    assert line == "half written\n", errors

    (debris,) = [layout.ckpts_dir / name for name in set(os.listdir(layout.ckpts_dir)) - names_before]
    assert debris.name.startswith(".final.keras.") and debris.name.endswith(".keras")
    assert debris.stat().st_size > 0
    assert not zipfile.is_zipfile(debris), "expected a half-written archive"
    assert _snapshot(layout.root) == before
    assert runs.checkpoint_names(layout) == ["best", "final"]
    # Debris at the level of the runs is never a run either.
    (roots.models / f".{tiny_run}.tmp").mkdir()
    (roots.models / f".{tiny_run}.tmp" / "run.json").write_text("{}")
    (roots.models / f"{tiny_run}.partial").mkdir()
    listing = runs.list_runs(roots.models)
    assert (list(listing.working), listing.broken) == ([tiny_run], {})
    assert runs.complete_runs(roots.models) == [tiny_run]


def test_a_read_only_models_folder_fails_clearly_and_keeps_the_runs(roots):
    """`seeds-tf train` with models/ made read-only (chmod 0o555) ends with exit status 2 and a
    message naming the folder and the OS error, no traceback, and the runs untouched. Root writes
    through file modes with CAP_DAC_OVERRIDE: as root, the command runs without that capability
    (dropped from the bounding set before exec), so it obeys the folder's mode as any user does."""
    before = _snapshot(roots.models)
    command = [
        str(Path(sys.executable).with_name("seeds-tf")),
        "--quiet",
        "train",
        *train_flags(VGG_OPTIONS),
    ]
    if os.geteuid() == 0:
        command = [sys.executable, "-c", _WITHOUT_DAC_OVERRIDE, *command]
    roots.models.chmod(0o555)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    finally:
        roots.models.chmod(0o755)
    if "cannot drop CAP_DAC_OVERRIDE" in done.stderr:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 2, done.stderr
    assert f"seeds-tf: error: models_dir: cannot write into the models folder {roots.models}" in done.stderr
    assert "Permission denied (EACCES)" in done.stderr
    assert "Traceback" not in done.stderr
    assert _snapshot(roots.models) == before


def test_damaged_runs_are_listed_as_broken_and_skipped(roots, tiny_run, capsys):
    """A run.json that is not JSON, a truncated or garbage model file: the run is listed as broken
    with the reason and never chosen. Corrupt weights inside a sound archive show only on loading:
    a prediction without `timestamp` then falls back to the newest run that loads. Naming any of
    them is the caller's error, naming `timestamp`."""
    damaged = _damage(roots.models, tiny_run)
    listing = runs.list_runs(roots.models)
    assert list(listing.working) == [tiny_run, damaged["weights"].run_id, damaged["calibration"].run_id]
    reasons = {name: listing.broken.get(layout.run_id) for name, layout in damaged.items()}
    assert reasons["run.json"].startswith("run.json is unreadable")
    assert reasons["truncated"].startswith("ckpts/final.keras is not a whole Keras model file")
    assert reasons["garbage"].startswith("ckpts/final.keras is not a whole Keras model file")
    assert reasons["weights"] is reasons["calibration"] is None

    metadata = api.get_metadata()  # a run.json or a calibration.json that is not JSON made this fail before
    assert metadata["runs"] == list(listing.working)
    assert metadata["engine"]["run_id"] == damaged["calibration"].run_id
    assert metadata["engine"]["reason"].startswith("calibration.json is unreadable")
    assert metadata["broken"] == listing.broken_list()
    assert cli.main(["--quiet", "runs"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [run["run_id"] for run in printed["runs"]] == list(listing.working)
    assert [run["run_id"] for run in printed["broken"]] == list(listing.broken)
    assert list(listing.broken) == [damaged[name].run_id for name in ("run.json", "truncated", "garbage")]

    photo = [("a.jpg", seed_photo(roots).read_bytes())]
    cache = inference.RunCache()
    answer = inference.predict(roots, cache, config.load(config.PredictConfig), photo)
    assert answer["run_id"] == tiny_run
    problems = {}
    for name, layout in damaged.items():
        request = config.load(config.PredictConfig, timestamp=layout.run_id)
        with pytest.raises(InputError) as raised:
            inference.predict(roots, cache, request, photo)
        assert raised.value.field == "timestamp", name
        assert layout.run_id in raised.value.problem, name
        assert " is broken: " in raised.value.problem, name
        problems[name] = raised.value.problem
    assert "is broken: ckpts/final.keras does not load" in problems["weights"]
    assert "is broken: calibration.json is unreadable" in problems["calibration"]


def test_interrupted_runs_are_listed_for_resume(empty_roots, capsys):
    """A training killed half-way (a cancelled DEEPaaS training, a crash) leaves a run that only
    `resume=<id>` finishes, and no listing named it: `seeds-tf runs` and the metadata list it under
    `interrupted`; a run being trained now is not."""
    died = runs.RunLayout(empty_roots.models / "2026-01-01_000000")
    training_now = runs.RunLayout(empty_roots.models / "2026-01-02_000000")
    for layout in (died, training_now):
        files.write_json(layout.conf_file, {})
        layout.progress_file.parent.mkdir(parents=True)
    with runs.mark_in_progress(training_now):
        assert cli.main(["--quiet", "runs"]) == 0
        assert json.loads(capsys.readouterr().out)["interrupted"] == [died.run_id]
        assert api.get_metadata()["interrupted"] == [died.run_id]


def test_make_serve_trains_the_demo_when_every_run_is_broken(roots, tiny_run, monkeypatch):
    """`make serve` runs `seeds-tf demo`: a working run is served as it is, but a models folder of
    broken runs only would leave the service with nothing to serve, so the demo run is trained."""
    assert demo.ensure_demo_run(roots) == tiny_run
    _replace(runs.RunLayout(roots.models / tiny_run).final_model, b"not a model")
    trained = []
    monkeypatch.setattr(demo, "train_demo_run", lambda roots: trained.append(roots) or "2099-12-31_000000")
    assert demo.ensure_demo_run(roots) == "2099-12-31_000000"
    assert trained == [roots]


@pytest.fixture(scope="module")
def service(tmp_path_factory, session_roots, tiny_run):
    """One DEEPaaS app (one worker) over copies of the tiny dataset and run, as in test_api.py."""
    with in_process_service(tmp_path_factory.mktemp("faults"), session_roots) as (app, roots, _):
        yield app, roots


def _worker_pids() -> list[int]:
    """The processes of the DEEPaaS workers (reached through DEEPaaS internals, as the harness does)."""
    return [
        process.pid
        for wrapper in deepaas.model.v2.MODELS.values()
        for pool in wrapper._executor._free | wrapper._executor._working
        for process in pool._pool
    ]


def test_the_service_reports_broken_runs_and_keeps_serving(service, tiny_run):
    """Through DEEPaaS: the metadata lists the broken runs (it answered 500 for a run.json that is
    not JSON), a prediction without `timestamp` comes from the newest run that loads, and one that
    names a broken run is a 422 naming `timestamp`."""
    app, roots = service
    damaged = _damage(roots.models, tiny_run)
    photo = ("a.jpg", seed_photo(roots).read_bytes())
    try:
        metadata = app.request("GET", f"{MODEL_URL}/")
        assert metadata.status == 200, metadata.body
        broken = {entry["run_id"]: entry["reason"] for entry in metadata.json()["broken"]}
        assert set(broken) == {damaged[name].run_id for name in ("run.json", "truncated", "garbage")}
        assert metadata.json()["engine"]["reason"].startswith("calibration.json is unreadable")
        assert app.request("GET", "/v2/models/").status == 200

        answer = app.predict({"image": photo})
        assert answer.status == 200, answer.body
        assert answer.json()["run_id"] == tiny_run
        # Refused in the server when the listing shows the damage; in the worker when loading does.
        listed = app.predict({"image": photo}, timestamp=damaged["truncated"].run_id)
        assert listed.status == 422, listed.body
        assert listed.json()["field"] == "timestamp"
        assert "is broken: ckpts/final.keras" in listed.json()["message"]
        loaded = app.predict({"image": photo}, timestamp=damaged["weights"].run_id)
        assert loaded.status == 422, loaded.body
        assert loaded.json()["field"] == "timestamp"
        assert "is broken: ckpts/final.keras does not load" in loaded.json()["message"]
        assert app.predict({"image": photo}).json()["run_id"] == tiny_run
    finally:
        for layout in damaged.values():
            shutil.rmtree(layout.root)


def test_a_full_disk_ends_the_training_with_a_clear_error_and_keeps_the_runs(service, tiny_run):
    """A full disk, simulated by a file size limit (RLIMIT_FSIZE, set on the DEEPaaS worker with
    prlimit): every write past 1 MB fails with EFBIG, as it would with ENOSPC on a full disk, and
    Python ignores SIGXFSZ, so the write fails instead of the process being killed. The small files
    of the new run fit; its first model save (the epoch-1 backup) does not. The training ends in
    status error with a message naming the models folder and the OS error, not a hang; the runs
    already there are byte for byte the same; the half-made run is never offered; the service
    keeps serving."""
    app, roots = service
    before = _snapshot(roots.models)
    (worker,) = _worker_pids()
    soft, hard = resource.prlimit(worker, resource.RLIMIT_FSIZE)
    resource.prlimit(worker, resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        started = app.train(**VGG_OPTIONS)
        assert started.status == 200, started.body
        status = app.wait_for_training(started.json()["uuid"])
    finally:
        resource.prlimit(worker, resource.RLIMIT_FSIZE, (soft, hard))
    assert status["status"] == "error", status
    assert f"models_dir: cannot write into the models folder {roots.models}" in status["message"]
    assert "File too large (EFBIG)" in status["message"]

    (unfinished,) = runs.incomplete_runs(roots.models)
    layout = runs.RunLayout(roots.models / unfinished)
    # It failed saving the first backup, after epoch 1 (whose record is in stats.json).
    assert [epoch["epoch"] for epoch in files.read_json(layout.stats_file)["epochs"]] == [1]
    assert {path: digest for path, digest in _snapshot(roots.models).items() if path in before} == before
    assert runs.complete_runs(roots.models) == [tiny_run]
    # Nothing half-written at any artifact's name, and no temporary left behind.
    assert not list(layout.ckpts_dir.rglob("*.keras")), list(layout.ckpts_dir.rglob("*"))
    assert not layout.backup_state.exists()
    assert list(layout.root.rglob(".*")) == []
    answer = app.predict({"image": ("a.jpg", seed_photo(roots).read_bytes())})
    assert answer.status == 200, answer.body
    assert answer.json()["run_id"] == tiny_run
