"""The training features beyond a plain run: folder datasets, checkpoints, early stopping, schedules,
mixed precision, MLflow, resume after a crash, check-dataset and evaluate."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from seeds_tf import cli
from seeds_tf.classifier.model import build_classifier
from seeds_tf.core import config, files, runs
from seeds_tf.core.errors import InputError
from seeds_tf.learning import training
from seeds_tf.prediction.inference import load_run
from tests.helpers import SMALL_OPTIONS, interrupted_run, write_colour_dataset

BIN = Path(sys.executable).parent
COLOURS = {
    **SMALL_OPTIONS,
    "images_directory": "colours/images",
    "splits_directory": "colours/dataset_files",
    "batch_size": 8,
}


@pytest.fixture
def colours(empty_roots):
    write_colour_dataset(empty_roots.data / "colours", per_class=10)
    return empty_roots


def test_a_run_with_every_option_on(empty_roots):
    """Folder-per-class data, cosine schedule, checkpoints every epoch, early stopping, label
    smoothing, class weights, bfloat16 mixed precision. (MLflow: test_tracking.py, against a server.)"""
    write_colour_dataset(empty_roots.data / "colours", per_class=10, split_files=False)
    options = {
        **COLOURS,
        "splits_directory": "colours/no_split_files",
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "epochs": 2,
        "lr_schedule": "cosine",
        "ckpt_freq": 1,
        "use_early_stopping": True,
        "early_stopping_patience": 1,
        "label_smoothing": 0.1,
        "use_class_weights": True,
        "mixed_precision": "bfloat16",
        "noise": 0.02,
        "cutout": 0.5,
    }
    result = training.train(config.RunConfig.from_options(**options), empty_roots)
    layout = runs.RunLayout(empty_roots.models / result.run_id)

    # The folder dataset was split, stratified, and the split files were recorded in the run.
    split_sizes = {
        name: len((layout.dataset_dir / f"{name}.txt").read_text().splitlines())
        for name in ("train", "val", "test")
    }
    assert split_sizes == {"train": 18, "val": 6, "test": 6}
    assert (layout.dataset_dir / "classes.txt").read_text().splitlines() == [
        "Caerulea caerulea",
        "Rubra ruber",
        "Viridis viridis",
    ]

    summary = files.read_json(layout.summary_file)
    assert summary["checkpoints"] == ["best", "epoch_0001", "epoch_0002", "final"]
    epochs = files.read_json(layout.stats_file)["epochs"]
    assert [e["lr"] for e in epochs] == pytest.approx([0.001, 0.001 * 0.5 * (1 + math.cos(math.pi / 2))])

    # Early stopping restored the best epoch's weights, which best.keras holds too.
    final = load_run(layout).model
    best = keras.saving.load_model(layout.best_model, compile=False, safe_mode=True)
    assert training.weights_digest(best) == summary["weights_digest"] == training.weights_digest(final)
    # Trained in bfloat16, saved and served in float32: every checkpoint, not the final model alone.
    for name in ("best", "epoch_0001", "epoch_0002", "final"):
        saved = keras.saving.load_model(runs.resolve_checkpoint(layout, name), compile=False)
        assert {layer.dtype_policy.name for layer in saved.layers} == {"float32"}, name


def test_schedules_and_class_weights():
    assert [training.step_decay(1.0, 10)(e) for e in (0, 6, 7, 8, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert [training.step_decay(1.0, 2)(e) for e in (0, 1)] == [1.0, 1.0]
    assert training.cosine_decay(1.0, 4)(2) == pytest.approx(0.5)
    weights = training.class_weights((0, 0, 0, 1), 3)
    assert weights == {0: pytest.approx(2 / 3), 1: 2.0, 2: 1.0}
    assert all(math.isfinite(w) for w in weights.values())


def test_l2_reaches_every_kernel_and_a_seed_fixes_the_initialisation():
    model_config = config.load(config.ModelConfig, image_size=71, dense_units=8, weights="none", l2_reg=1e-3)
    keras.utils.set_random_seed(7)
    model = build_classifier(model_config, 3)
    kernels = [v for v in model.trainable_weights if v.name.endswith("kernel")]
    expected = 1e-3 * sum(float(np.sum(np.square(keras.ops.convert_to_numpy(v)))) for v in kernels)
    assert len(model.losses) == len(kernels) > 70
    assert float(sum(keras.ops.convert_to_numpy(loss) for loss in model.losses)) == pytest.approx(
        expected, rel=1e-4
    )
    keras.utils.set_random_seed(7)
    assert training.weights_digest(build_classifier(model_config, 3)) == training.weights_digest(model)


def _seeds_tf(*arguments: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "seeds-tf"), "--quiet", *arguments],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_a_killed_training_resumes_and_finishes_with_its_own_config(colours, capsys):
    run_id = interrupted_run(colours.models, {**COLOURS, "epochs": 3})
    assert run_id not in runs.complete_runs(colours.models)
    assert run_id in runs.incomplete_runs(colours.models)
    layout = runs.RunLayout(colours.models / run_id)
    conf = layout.conf_file.read_bytes()

    # The run trains with its own options: one it would ignore is refused (it was dropped silently).
    assert cli.main(["--quiet", "train", "--resume", run_id, "--epochs", "50"]) == 2
    ignored = f"epochs: resume={run_id} continues that run with its own epochs, 3: 50 would be ignored"
    assert ignored in capsys.readouterr().err
    # Resumed, and killed again once its last epoch is done, before the run is complete (while its
    # final model is saved, evaluated, indexed and calibrated).
    assert interrupted_run(colours.models, {"resume": run_id}, marker="ckpts/final.keras") == run_id
    trained = files.read_json(layout.stats_file)["epochs"]
    assert [e["epoch"] for e in trained] == [1, 2, 3]
    assert not layout.is_complete()

    # Finished in this process: the kills above need processes of their own, this does not.
    assert cli.main(["--quiet", "train", "--resume", run_id, "--epochs", "3"]) == 0  # its own value
    assert json.loads(capsys.readouterr().out)["run_id"] == run_id
    stats = files.read_json(layout.stats_file)
    assert stats["epochs"] == trained, "epochs were trained again"
    assert stats["training_time_s"] >= sum(epoch["seconds"] for epoch in trained)
    assert not layout.backup_dir.exists()
    assert layout.conf_file.read_bytes() == conf, "the resumed run's configuration changed"
    assert layout.config().training.epochs == 3
    assert layout.is_complete()

    assert cli.main(["--quiet", "train", "--resume", run_id]) == 2
    assert "is complete" in capsys.readouterr().err


def test_a_resumed_run_replaces_best_only_with_an_epoch_better_than_all_before(tmp_path):
    """best.keras follows the best epoch of the whole run: a resumed fit starts from the best of
    the epochs it restored (stats.json), not from scratch; records beyond the restored epoch (of the
    attempt that was killed) do not count."""
    layout = runs.RunLayout(tmp_path / "run")
    records = [{"epoch": 1, "val_loss": 0.5}, {"epoch": 2, "val_loss": 0.7}, {"epoch": 3, "val_loss": 0.1}]
    files.write_json(layout.stats_file, {"epochs": records})
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    checkpoints = training._Checkpoints(model, layout, frequency=0, keep=0, monitor="val_loss", twin=None)
    checkpoints.set_model(model)
    checkpoints.on_epoch_begin(2)  # the fit's first epoch: epochs 1 and 2 were backed up
    checkpoints.on_epoch_end(2, {"val_loss": 0.6})
    assert not layout.best_model.exists()
    checkpoints.on_epoch_end(3, {"val_loss": 0.4})
    assert layout.best_model.is_file()


@pytest.mark.parametrize(
    ("losses", "patience", "epochs_left"),
    [
        # Best at epoch 2, one epoch without improvement since: one more worse epoch stops it.
        ([0.5, 0.4, 0.45], 2, 1),
        # It had stopped after epoch 2, then was killed while saved: it trains no further epoch.
        ([0.5, 0.6], 1, 0),
    ],
)
def test_a_resumed_run_keeps_its_early_stopping_count(tmp_path, losses, patience, epochs_left):
    """Early stopping continues from the epochs the run did before it was killed (stats.json)
    instead of starting its patience over, which would train up to `patience` epochs too many."""
    layout = runs.RunLayout(tmp_path / "run")
    records = [{"epoch": epoch, "val_loss": loss} for epoch, loss in enumerate(losses, start=1)]
    files.write_json(layout.stats_file, {"epochs": [*records, {"epoch": 9, "val_loss": 0.0}]})
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model._initial_epoch = len(losses)  # as _AtomicBackup restores it; epoch 9 was not backed up
    stopping = training._ResumableEarlyStopping(layout, "val_loss", patience)
    stopping.set_model(model)
    stopping.set_params({"epochs": 10})
    stopping.on_train_begin()
    trained = 0
    for epoch in range(model._initial_epoch, 10):  # as Keras' fit goes on from there
        stopping.on_epoch_end(epoch, {"val_loss": 0.9})  # no improvement
        trained += 1
        if model.stop_training:
            break
    assert trained == epochs_left


def test_the_training_time_counts_the_epochs_restored(tmp_path):
    layout = runs.RunLayout(tmp_path / "run")
    records = [{"epoch": 1, "seconds": 10.0}, {"epoch": 2, "seconds": 12.5}, {"epoch": 3, "seconds": 99.0}]
    files.write_json(layout.stats_file, {"epochs": records})
    resumed = training._EpochLog(layout)
    resumed.on_train_begin()
    resumed.on_epoch_begin(2)  # epochs 1 and 2 were backed up; epoch 3 is trained again
    assert resumed.restored_seconds() == 22.5
    finished = training._EpochLog(layout)  # resumed after its last epoch: it trains none
    finished.on_train_begin()
    assert finished.restored_seconds() == 121.5


def test_a_training_whose_loss_is_no_number_fails_naming_the_learning_rate():
    """A diverged network (its weights NaN) was trained on to the end, then saved, calibrated and
    served; Keras' TerminateOnNaN would stop its epochs, and the run complete all the same. The
    callbacks after it (checkpoints, backups) never see the diverged batch."""

    def classifier() -> keras.Model:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        return model

    model = classifier()
    healthy, diverged = np.ones((40, 4), "float32"), np.full((40, 4), np.nan, "float32")
    seen = []
    later = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(batch))
    stop = training._StopWhenDiverged(0.5)
    model.fit(healthy, np.zeros(40), batch_size=10, epochs=1, callbacks=[stop, later], verbose=0)
    assert seen == [0, 1, 2, 3]
    seen.clear()
    with pytest.raises(InputError) as failed:
        model.fit(diverged, np.zeros(40), batch_size=10, epochs=1, callbacks=[stop, later], verbose=0)
    assert (failed.value.field, failed.value.problem) == (
        "initial_lr",
        "the training diverged: its loss became nan in epoch 1, batch 1; train again with a smaller "
        "initial_lr than 0.5",
    )
    assert seen == []
    # Weights made NaN by an epoch's last update show first in its val_loss: caught before the
    # epoch's checkpoints and backup.
    ended = []
    later = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: ended.append(epoch))
    with pytest.raises(InputError, match="its val_loss became nan at the end of epoch 1;"):
        classifier().fit(
            healthy,
            np.zeros(40),
            validation_data=(diverged[:10], np.zeros(10)),
            batch_size=10,
            epochs=1,
            callbacks=[stop, later],
            verbose=0,
        )
    assert ended == []


def test_check_dataset_and_evaluate_commands(roots, tiny_run, capsys):
    check = _seeds_tf(
        "check-dataset",
        "--images_directory",
        "tiny/images",
        "--splits_directory",
        "tiny/dataset_files",
        "--json",
    )
    output, errors = check.communicate(timeout=120)
    assert check.returncode == 0, errors
    report = json.loads(output)
    assert report["ok"] is True
    assert sum(report["images_per_class"]["train"].values()) > 0

    (roots.data / "tiny" / "images" / "Lens_culinaris" / "0000.jpg").write_bytes(b"broken")
    broken = _seeds_tf(
        "check-dataset", "--images_directory", "tiny/images", "--splits_directory", "tiny/dataset_files"
    )
    _, errors = broken.communicate(timeout=120)
    assert broken.returncode == 2
    assert "0000.jpg" in errors

    split_file = roots.data / "tiny" / "dataset_files" / "val.txt"
    assert cli.main(["--quiet", "evaluate", tiny_run, str(split_file)]) == 0  # TensorFlow loaded here
    assert json.loads(capsys.readouterr().out)["num_images"] == len(split_file.read_text().splitlines())
    assert (roots.models / tiny_run / "reports" / "val_evaluation.json").is_file()
    assert (roots.models / tiny_run / "reports" / "val_confusion_matrix.png").is_file()
