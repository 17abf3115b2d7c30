"""A trainable service that anyone may reach stays the operators': trainings through the API are
candidates until promoted, one training runs at a time per models folder, a run must fit on disk and
keeps a bounded number of checkpoints."""

from __future__ import annotations

import shutil
import threading

import pytest

from seeds_tf import api, cli
from seeds_tf.core import config, runs
from seeds_tf.core.errors import InputError
from seeds_tf.hosting import admission
from seeds_tf.learning import training
from seeds_tf.prediction import inference
from tests.helpers import SMALL_OPTIONS, train_flags, unstarted_run


def test_a_remote_training_is_a_candidate_until_promoted(roots, tiny_run, capsys):
    """The tiny run (an operator's) keeps serving after a newer API training; promoting the
    candidate makes it the default, and the metadata shows which run serves and the promotion. The
    candidate keeps only its newest two periodic checkpoints."""
    options = {**SMALL_OPTIONS, "epochs": 3, "ckpt_freq": 1, "keep_checkpoints": 2}
    candidate = training.train(config.RunConfig.from_options(**options), roots, candidate=True).run_id
    assert runs.checkpoint_names(runs.RunLayout(roots.models / candidate)) == [
        "best",
        "epoch_0002",
        "epoch_0003",
        "final",
    ]
    listing = runs.list_runs(roots.models)
    assert runs.default_order(roots.models, listing) == [tiny_run, candidate]
    assert inference.choose_run(roots, inference.RunCache()).run_id == tiny_run
    assert api.get_metadata()["model"]["run_id"] == tiny_run

    assert cli.main(["promote", candidate]) == 0
    assert runs.default_order(roots.models, runs.list_runs(roots.models))[0] == candidate
    assert inference.choose_run(roots, inference.RunCache()).run_id == candidate
    metadata = api.get_metadata()
    assert metadata["promoted"] == candidate
    assert metadata["model"]["run_id"] == candidate

    assert cli.main(["promote", "../2026-01-01_000000"]) == 2
    assert "run: unknown run '../2026-01-01_000000'" in capsys.readouterr().err


def test_a_second_training_in_the_same_models_folder_is_refused(data_roots):
    with admission.training_slot(data_roots.models):
        with pytest.raises(InputError, match="another training is running") as raised:
            training.train(config.RunConfig.from_options(**SMALL_OPTIONS), data_roots)
        with pytest.raises(InputError, match="another training is running"):
            admission.check_no_training(data_roots.models)
    assert raised.value.field == "training"
    admission.check_no_training(data_roots.models)  # free again
    assert runs.incomplete_runs(data_roots.models) == []


def test_a_request_refused_by_a_reservation_never_fails_the_admitted_training(tmp_path):
    """A request refused while another is admitted looked at the training lock first (shared, for an
    instant): the admitted training's worker, taking the lock at that instant, failed. Requests
    are refused over and over here while the admitted one's worker takes the lock over and over."""
    models = tmp_path / "models"
    release = admission.reserve_training(models)
    stop, refusals = threading.Event(), []

    def refused_requests() -> None:
        while not stop.is_set():
            try:
                admission.reserve_training(models)()
                refusals.append("admitted")
            except InputError as refusal:
                refusals.append(refusal.problem)

    other = threading.Thread(target=refused_requests)
    other.start()
    try:
        for _ in range(3000):
            with admission.training_slot(models):
                pass
    finally:
        stop.set()
        other.join()
        release()
    assert len(refusals) > 100
    assert {problem.split(":")[0] for problem in refusals} == {f"another training is running in {models}"}


@pytest.mark.parametrize(
    "command", [["train", *train_flags(SMALL_OPTIONS)], ["demo", "--force"]], ids=["train", "demo"]
)
def test_a_command_line_training_is_refused_while_a_server_has_admitted_one(data_roots, capsys, command):
    """A server's reservation (a POST train admitted, its worker not started yet) refuses
    `seeds-tf train` and `seeds-tf demo --force` as a running training does, before they write
    anything, so that the admitted training is not the one that fails."""
    data_before = sorted(data_roots.data.iterdir())
    release = admission.reserve_training(data_roots.models)
    try:
        assert cli.main(["--quiet", *command]) == 2
    finally:
        release()
    assert "seeds-tf: error: training: another training is running" in capsys.readouterr().err
    assert runs.incomplete_runs(data_roots.models) == runs.complete_runs(data_roots.models) == []
    assert sorted(data_roots.data.iterdir()) == data_before  # no demo dataset generated


@pytest.mark.parametrize("command", [["train", *train_flags(SMALL_OPTIONS)], ["demo", "--force"]])
def test_a_models_folder_that_is_a_file_is_named_not_a_traceback(data_roots, tmp_path, capsys, command):
    """An operator's mistake (--models-dir naming a file) ended in a NotADirectoryError traceback.
    The data folder is a good one: the options are checked first, as the server checks them."""
    a_file = tmp_path / "models.txt"
    a_file.write_text("not a folder")
    assert (
        cli.main(["--quiet", "--data-dir", str(data_roots.data), "--models-dir", str(a_file), *command]) == 2
    )
    assert (
        f"seeds-tf: error: models_dir: cannot write into the models folder {a_file} while writing "
        f"{a_file / admission.RESERVATION_FILE}: Not a directory (ENOTDIR)"
    ) in capsys.readouterr().err
    assert a_file.read_text() == "not a folder"


def test_a_run_that_would_not_fit_on_disk_is_refused_before_it_starts(data_roots, monkeypatch):
    before = sorted(path.name for path in data_roots.models.iterdir())
    free = shutil.disk_usage(data_roots.models)._replace(free=32 * 2**20)
    monkeypatch.setattr(admission.shutil, "disk_usage", lambda path: free)
    with pytest.raises(InputError, match=r"the run needs about \d+ MiB and .* has 32 MiB free") as raised:
        training.train(config.RunConfig.from_options(**SMALL_OPTIONS), data_roots)
    assert raised.value.field == "models_dir"
    # The training lock stays in a models folder once a training has asked for it; nothing else may appear.
    assert sorted({path.name for path in data_roots.models.iterdir()} - {admission.LOCK_FILE}) == before

    # Nor does an interrupted run resume onto a disk it would not fit on.
    interrupted = unstarted_run(data_roots, SMALL_OPTIONS)
    with pytest.raises(InputError, match=r"the run needs about \d+ MiB and .* has 32 MiB free"):
        training.train(config.RunConfig.from_options(**SMALL_OPTIONS, resume=interrupted.run_id), data_roots)
    assert not interrupted.backup_dir.exists(), "the run was trained"


def test_the_disk_a_run_needs_grows_with_the_checkpoints_kept():
    # 1M weights: 4 MB per copy; final + best + 3 periodic + 6 for the backup, 10% and 64 MiB more.
    assert admission.run_bytes(1_000_000, 3) == pytest.approx(4e6 * 11 * 1.1 + 64 * 2**20, rel=1e-6)
    assert admission.run_bytes(1_000_000, 0) < admission.run_bytes(1_000_000, 3)
