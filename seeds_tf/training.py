"""Training a run: from a split-file dataset to a complete, evaluated run folder.

Everything the user can get wrong is checked before the run folder is created; the run is marked
complete (run.json) only after the final model and the evaluation are on disk.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import time
from typing import Any

import keras
import numpy as np

from seeds_tf import __version__, images, runs
from seeds_tf.backbones import get_backbone
from seeds_tf.config import RunConfig
from seeds_tf.errors import InputError
from seeds_tf.model import BackboneScaledAdam, backbone_layers, build_classifier, save_classifier
from seeds_tf.paths import Roots
from seeds_tf.pipeline import make_dataset
from seeds_tf.splits import Dataset, copy_split_files, read_dataset

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a finished training reports: the new run and its test metrics (empty without test.txt)."""

    run_id: str
    metrics: dict[str, float]
    training_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train(config: RunConfig, roots: Roots) -> TrainResult:
    """Trains a new run into `roots.models` and returns its id and test metrics.

    Raises:
        InputError: for bad options or a bad dataset, before any run folder is created.
    """
    dataset, weights = _check_inputs(config, roots)
    dataset, skipped = _skip_unreadable(dataset)
    layout = runs.create_run(roots.models)
    _LOGGER.info("Training run %s on %d classes", layout.run_id, len(dataset.classes))
    started = time.monotonic()
    copy_split_files(dataset, layout.dataset_dir)
    runs.write_json_atomic(layout.conf_file, {**config.to_dict(), "seeds_tf_version": __version__})

    keras.utils.set_random_seed(config.training.seed)
    model = _compiled_model(config, len(dataset.classes), weights)
    history = _fit(model, config, dataset, layout)
    save_classifier(model, layout.final_model)
    metrics = _evaluate(model, config, dataset)
    training_time = round(time.monotonic() - started, 1)

    runs.write_json_atomic(
        layout.stats_file, {"epochs": history, "training_time_s": training_time, "test": metrics}
    )
    runs.mark_complete(
        layout,
        {
            "created": layout.run_id,
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "modelname": config.model.modelname,
            "image_size": config.model.image_size,
            "num_classes": len(dataset.classes),
            "skipped_images": skipped,
            "metrics": metrics,
            "seeds_tf_version": __version__,
        },
    )
    _LOGGER.info("Run %s complete in %.0f s: %s", layout.run_id, training_time, metrics)
    return TrainResult(layout.run_id, metrics, training_time)


def step_decay(initial_lr: float, epochs: int):
    """The original schedule: the learning rate divided by 10 at 70% and again at 90% of the epochs."""

    boundaries = (math.ceil(0.7 * epochs), math.ceil(0.9 * epochs))

    def schedule(epoch: int, current_lr: float | None = None) -> float:
        # Keras passes the current rate too; the schedule depends on the epoch alone.
        return initial_lr * 0.1 ** sum(epoch >= boundary for boundary in boundaries)

    return schedule


def class_weights(labels: tuple[int, ...], num_classes: int) -> dict[int, float]:
    """Inverse-frequency weights with mean 1 over the present classes; a class absent from the
    training split gets weight 1.0 (finite, and irrelevant since no sample carries it)."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    present = np.count_nonzero(counts)
    return {
        label: float(len(labels) / (present * count)) if count else 1.0
        for label, count in enumerate(counts.tolist())
    }


def _check_inputs(config: RunConfig, roots: Roots) -> tuple[Dataset, str | None]:
    training, model = config.training, config.model
    backbone = get_backbone(model.modelname)
    if model.image_size < backbone.min_size:
        raise InputError(
            "image_size",
            f"{model.modelname} needs at least {backbone.min_size}. Received: {model.image_size}",
        )
    weights = _initial_weights(model.weights, roots)
    if training.mode == "fast" and weights is None:
        raise InputError(
            "mode",
            "'fast' freezes the backbone, which only makes sense with pretrained weights; "
            "use weights=imagenet or a weights file, or mode=normal",
        )
    dataset = read_dataset(
        roots.data_path(training.splits_directory, "splits_directory"),
        roots.data_path(training.images_directory, "images_directory"),
    )
    return dataset, weights


def _skip_unreadable(dataset: Dataset) -> tuple[Dataset, int]:
    """Drops images that cannot be decoded, with a warning each: one bad file among thousands
    should not end a run."""
    all_paths = [path for split in dataset.splits.values() for path in split.paths]
    unreadable = images.find_unreadable(all_paths)
    for path, problem in unreadable.items():
        _LOGGER.warning("Skipping unreadable image %s: %s", path, problem)
    if not unreadable:
        return dataset, 0
    splits = {name: split.without(unreadable) for name, split in dataset.splits.items()}
    if not splits["train"].paths:
        raise InputError("images_directory", "no readable image in the training split")
    return dataclasses.replace(dataset, splits=splits), len(unreadable)


def _initial_weights(weights: str, roots: Roots) -> str | None:
    if weights == "none":
        return None
    if weights == "imagenet":
        return weights
    path = roots.data_path(weights, "weights")
    if not path.is_file():
        raise InputError("weights", f"expected 'imagenet', 'none' or a weights file; {path} is none")
    return str(path)


def _compiled_model(config: RunConfig, num_classes: int, weights: str | None) -> keras.Model:
    model = build_classifier(config.model, num_classes, weights)
    if config.training.mode == "fast":
        for layer in backbone_layers(model):
            layer.trainable = False
    model.compile(
        optimizer=BackboneScaledAdam(
            backbone_lr_factor=config.training.backbone_lr_factor,
            learning_rate=config.training.initial_lr,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5_accuracy"),
        ],
    )
    return model


def _fit(model: keras.Model, config: RunConfig, dataset: Dataset, layout: runs.RunLayout) -> list:
    training = config.training
    train_split = dataset.split("train")
    val_split = dataset.split("val") if training.use_validation else None
    epoch_log = _EpochLog(layout)
    model.fit(
        make_dataset(
            train_split,
            config.model.image_size,
            training.batch_size,
            training=True,
            augment=training.augment,
            seed=training.seed,
        ),
        validation_data=(
            make_dataset(val_split, config.model.image_size, training.batch_size)
            if val_split is not None
            else None
        ),
        epochs=training.epochs,
        shuffle=False,  # make_dataset shuffles, seeded; Keras cannot shuffle a tf.data.Dataset
        class_weight=(
            class_weights(train_split.labels, len(dataset.classes)) if training.use_class_weights else None
        ),
        callbacks=[
            keras.callbacks.LearningRateScheduler(step_decay(training.initial_lr, training.epochs)),
            keras.callbacks.TensorBoard(log_dir=str(layout.logs_dir)),
            epoch_log,
        ],
        verbose=0,
    )
    return epoch_log.epochs


def _evaluate(model: keras.Model, config: RunConfig, dataset: Dataset) -> dict[str, float]:
    test = dataset.split("test")
    if test is None or test.labels is None:
        return {}
    results = model.evaluate(
        make_dataset(test, config.model.image_size, config.training.batch_size),
        return_dict=True,
        verbose=0,
    )
    return {f"test_{name}": round(float(value), 6) for name, value in results.items()}


class _EpochLog(keras.callbacks.Callback):
    """Logs a line per epoch and rewrites stats/stats.json, so progress shows while a run trains."""

    def __init__(self, layout: runs.RunLayout):
        super().__init__()
        self._layout = layout
        self.epochs: list[dict[str, float]] = []
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        record = {
            "epoch": epoch + 1,
            "lr": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            "seconds": round(time.monotonic() - self._started, 2),
            **{
                name: round(float(value), 6)
                for name, value in (logs or {}).items()
                if name != "learning_rate"
            },
        }
        self.epochs.append(record)
        runs.write_json_atomic(self._layout.stats_file, {"epochs": self.epochs})
        _LOGGER.info("Run %s epoch %d: %s", self._layout.run_id, epoch + 1, record)
