"""Training end to end on real images with the real training code: the session's tiny run, and
the Xception core at 71 px, the least it takes."""

import os
import re
import shutil

import keras
import numpy as np
import pytest

from seeds_tf.classifier.model import backbone_layers, build_classifier
from seeds_tf.core import config, files, runs
from seeds_tf.core.errors import InputError
from seeds_tf.data.splits import read_dataset
from seeds_tf.hosting import admission
from seeds_tf.learning import calibrate, evaluation, indexing, training
from seeds_tf.prediction.inference import load_run
from tests.deepaas_harness import free_port
from tests.helpers import SMALL_OPTIONS, TINY_OPTIONS, TINY_XCEPTION_OPTIONS, write_colour_dataset


def test_a_trained_run_explains_itself(roots, tiny_run):
    layout = runs.RunLayout(roots.models / tiny_run)
    summary = layout.summary()
    assert summary["run_id"] == tiny_run
    model = (TINY_OPTIONS["modelname"], TINY_OPTIONS["image_size"])
    assert (layout.config().model.modelname, layout.config().model.image_size) == model
    assert len(layout.classes()) == 16
    described = runs.list_runs(roots.models).working[tiny_run]
    assert (described["modelname"], described["image_size"], described["num_classes"]) == (*model, 16)
    assert summary["skipped_images"] == 0
    assert set(summary["metrics"]) == {"test_loss", "test_accuracy", "test_top5_accuracy", "test_macro_f1"}
    assert summary["checkpoints"] == ["best", "final"]
    assert len(summary["weights_digest"]) == 64

    saved = layout.config()
    assert saved == config.RunConfig.from_options(**TINY_OPTIONS)

    stats = files.read_json(layout.stats_file)
    assert [epoch["epoch"] for epoch in stats["epochs"]] == [1]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"} <= set(stats["epochs"][0])
    assert stats["training_time_s"] > 0

    for name in ("classes.txt", "info.txt", "train.txt", "val.txt", "test.txt"):
        assert (layout.dataset_dir / name).is_file()
    assert any(layout.logs_dir.rglob("events.out.tfevents.*"))
    for name in ("training_curves.png", "test_confusion_matrix.png", "test_evaluation.json"):
        assert (layout.reports_dir / name).stat().st_size > 0
    evaluation = files.read_json(layout.reports_dir / "test_evaluation.json")
    assert evaluation["top1"] == pytest.approx(summary["metrics"]["test_accuracy"], abs=1e-6)
    assert len(evaluation["per_class"]) == 16
    assert not layout.backup_dir.exists(), "the resume backup outlived a finished run"


def test_a_loaded_run_predicts_as_the_trained_model_evaluated(roots, tiny_run):
    run = load_run(runs.RunLayout(roots.models / tiny_run))
    size = TINY_OPTIONS["image_size"]
    assert run.config.image_size == size
    assert len(run.classes) == 16
    assert run.info is not None and len(run.info) == 16
    probabilities = run.model.predict_on_batch(np.full((2, size, size, 3), 100.0, dtype="float32"))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "field", "problem"),
    [
        ({"images_directory": "nowhere"}, "images_directory", "is not a folder"),
        ({"images_directory": "../.."}, "images_directory", "outside the data folder"),
        (
            {"splits_directory": "tiny", "images_directory": "tiny/dataset_files"},
            "splits_directory",
            "no classes",
        ),
        ({"modelname": "Xception", "image_size": 64}, "image_size", "needs at least 71"),
        ({"mode": "fast"}, "mode", "pretrained weights"),
        ({"weights": "missing.h5"}, "weights", "'missing.h5' is not a file"),
    ],
)
def test_bad_training_inputs_fail_before_any_run_is_created(data_roots, overrides, field, problem):
    before = sorted(os.listdir(data_roots.models))
    with pytest.raises(InputError) as raised:
        training.train(config.RunConfig.from_options(**{**TINY_OPTIONS, **overrides}), data_roots)
    assert raised.value.field == field
    assert problem in raised.value.problem
    # The training lock stays in a models folder once a training has asked for it; nothing else may appear.
    assert sorted(set(os.listdir(data_roots.models)) - {admission.LOCK_FILE}) == before


def test_imagenet_weights_that_cannot_be_fetched_fail_before_any_run_is_created(
    data_roots, tmp_path, monkeypatch
):
    """Offline, the download failed inside the run's folder: the run was listed as interrupted and
    its resume failed the same way. Here the download goes through a proxy on a closed loopback
    port, so nothing leaves the machine, into an empty Keras cache."""
    monkeypatch.setattr(keras.src.backend.config, "_KERAS_DIR", str(tmp_path / "keras"))  # read at import
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    before = sorted(os.listdir(data_roots.models))
    with pytest.raises(InputError) as raised:
        training.train(
            config.RunConfig.from_options(**{**TINY_XCEPTION_OPTIONS, "weights": "imagenet"}), data_roots
        )
    assert raised.value.field == "weights"
    assert "the ImageNet weights of Xception could not be fetched (URL fetch failure" in raised.value.problem
    assert "Connection refused" in raised.value.problem
    assert sorted(set(os.listdir(data_roots.models)) - {admission.LOCK_FILE}) == before
    assert runs.interrupted_runs(data_roots.models) == []


def test_a_split_naming_a_missing_image_fails_before_training(data_roots):
    train_txt = data_roots.data / "tiny" / "dataset_files" / "train.txt"
    train_txt.write_text(train_txt.read_text() + "Lens_culinaris/gone.jpg 4\n")
    with pytest.raises(InputError, match=r"missing image 'Lens_culinaris/gone\.jpg'"):
        training.train(config.RunConfig.from_options(**TINY_OPTIONS), data_roots)


@pytest.mark.parametrize(
    ("split", "relabel", "problem"),
    [
        ("test", False, r"'{image}' is listed in train and test"),
        ("train", True, r"train.txt lists '{image}' with labels {label}, {other}"),
        ("val", False, r"'{image}' and '{image}.copy.jpg' are identical files in train and val"),
    ],
)
def test_a_dataset_whose_figures_could_not_be_trusted_fails_before_training(
    data_roots, split, relabel, problem
):
    """A training image also in test.txt inflated the run's test figures, and one listed twice with
    two labels trained as two species: check-dataset called them fatal, the training went ahead. A
    copy of a training image under another name in val.txt leaked as well, and was not even found."""
    splits = data_roots.data / "tiny" / "dataset_files"
    first = (splits / "train.txt").read_text().splitlines()[0]
    image, label = first.rsplit(" ", 1)
    other = (int(label) + 1) % 16 if relabel else int(label)
    listed = image
    if split == "val":
        listed = f"{image}.copy.jpg"
        shutil.copy(data_roots.data / "tiny" / "images" / image, data_roots.data / "tiny" / "images" / listed)
    with open(splits / f"{split}.txt", "a") as listing:
        listing.write(f"{listed} {other}\n")
    before = sorted(os.listdir(data_roots.models))
    with pytest.raises(InputError) as raised:
        training.train(config.RunConfig.from_options(**TINY_OPTIONS), data_roots)
    assert raised.value.field == "splits_directory"
    assert re.search(problem.format(image=re.escape(image), label=label, other=other), raised.value.problem)
    assert "seeds-tf check-dataset lists every problem" in raised.value.problem
    assert sorted(set(os.listdir(data_roots.models)) - {admission.LOCK_FILE}) == before


def test_unreadable_images_are_skipped_and_counted(data_roots):
    """By the training, and by what reads the run's split files later (they list what it skipped)
    or a user's split file: an index, a calibration, an evaluation."""
    train_txt = data_roots.data / "tiny" / "dataset_files" / "train.txt"
    first = train_txt.read_text().splitlines()[0].rsplit(" ", 1)[0]
    (data_roots.data / "tiny" / "images" / first).write_bytes(b"not a jpeg")
    result = training.train(config.RunConfig.from_options(**SMALL_OPTIONS), data_roots)
    layout = runs.RunLayout(data_roots.models / result.run_id)
    summary = files.read_json(layout.summary_file)
    assert summary["skipped_images"] == 1

    listed = len(train_txt.read_text().splitlines())
    indexing.index_run(data_roots, result.run_id)
    assert len(files.read_json(layout.index_dir / "references.json")["paths"]) == listed - 1
    assert calibrate.calibrate_run(data_roots, result.run_id, split="train").fitted_on == "train"
    assert evaluation.evaluate_run(data_roots, result.run_id, train_txt).num_images == listed - 1


def test_a_split_of_which_no_image_reads_is_refused_before_the_run_starts(data_roots):
    """A validation split of unreadable images failed the training at the end of its first epoch,
    and a test split's after its last, each with a traceback, and again at every resume."""
    folder = data_roots.data / "tiny"
    for line in (folder / "dataset_files" / "val.txt").read_text().splitlines():
        (folder / "images" / line.rsplit(" ", 1)[0]).write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="images_directory: no readable image in the val split"):
        training.train(config.RunConfig.from_options(**SMALL_OPTIONS), data_roots)
    assert runs.interrupted_runs(data_roots.models) == [], "no run folder, nothing to resume"


@pytest.mark.parametrize("run_eagerly", [True, False])
def test_the_run_chooses_eager_steps_or_a_compiled_graph(run_eagerly):
    run_config = config.RunConfig.from_options(**{**SMALL_OPTIONS, "run_eagerly": run_eagerly})
    model = build_classifier(run_config.model, 3)
    training.compile_classifier(model, run_config, 3)
    assert model.run_eagerly is run_eagerly


def test_fast_mode_trains_on_every_image_each_epoch(session_roots):
    """Its cache took the first epoch's batches, less the partial one shuffling had left out: the
    same images (70 - 64 = 6 of 70, say) were missing from every epoch."""
    run_config = config.RunConfig.from_options(**{**SMALL_OPTIONS, "mode": "fast", "batch_size": 7})
    dataset = read_dataset(
        session_roots.data / "tiny" / "dataset_files", session_roots.data / "tiny" / "images"
    )
    split = dataset.split("train")
    assert len(split.paths) % 7, "a partial last batch"
    model = build_classifier(run_config.model, len(dataset.classes))
    data = training._fast_mode_train_data(
        model, split, run_config.model.image_size, run_config.training, len(dataset.classes)
    )
    for _ in range(2):  # the first epoch fills the cache, the second reads it
        labels = [int(label) for _, batch in data for label in np.argmax(batch, axis=1)]
        assert sorted(labels) == sorted(split.labels)


def test_fast_mode_trains_the_head_only(data_roots):
    """A weights file inside the data folder initialises the backbone; fast mode keeps it fixed.
    Freezing is the same code for every backbone: the small one keeps the training short."""
    assert SMALL_OPTIONS["modelname"] == "MobileNet"
    backbone = keras.applications.MobileNet(include_top=False, weights=None, input_shape=(32, 32, 3))
    weights = data_roots.data / "mobilenet_notop.weights.h5"
    backbone.save_weights(weights)
    options = {**SMALL_OPTIONS, "mode": "fast", "weights": weights.name}
    run_config = config.RunConfig.from_options(**options)
    result = training.train(run_config, data_roots)
    layout = runs.RunLayout(data_roots.models / result.run_id)
    trained = load_run(layout).model
    first_conv = next(layer.name for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D))
    np.testing.assert_array_equal(
        trained.get_layer(first_conv).kernel.numpy(), backbone.get_layer(first_conv).kernel.numpy()
    )
    # The head as training initialised it (same seed, same weights file): every layer of it moved.
    keras.utils.set_random_seed(run_config.training.seed)
    initial = build_classifier(run_config.model, len(layout.classes()), str(weights))
    frozen = {layer.name for layer in backbone_layers(initial)}
    head = [layer.name for layer in initial.layers if layer.weights and layer.name not in frozen]
    assert head
    for name in head:
        before, after = initial.get_layer(name).weights[0].numpy(), trained.get_layer(name).weights[0].numpy()
        assert not np.array_equal(before, after), f"{name} did not train"


def test_the_network_learns(empty_roots):
    """Loss falls and accuracy rises far above chance (1/3) on an easy dataset. A few dozen steps
    are all a test affords: a low batch-norm momentum lets the moving statistics, which inference
    uses, catch up within them."""
    write_colour_dataset(empty_roots.data / "colours")
    options = {
        **TINY_XCEPTION_OPTIONS,
        "images_directory": "colours/images",
        "splits_directory": "colours/dataset_files",
        "epochs": 6,
        "batch_size": 6,
        "batchnorm_momentum": 0.5,
        "augment": False,
    }
    result = training.train(config.RunConfig.from_options(**options), empty_roots)
    epochs = files.read_json(runs.RunLayout(empty_roots.models / result.run_id).stats_file)["epochs"]
    assert min(epoch["loss"] for epoch in epochs[-2:]) < 0.6 * epochs[0]["loss"]
    assert epochs[-1]["val_loss"] < 0.6 * epochs[0]["val_loss"]
    assert epochs[-1]["val_accuracy"] >= 0.8
    assert result.metrics["test_accuracy"] >= 0.75
