"""Training a run: from a dataset to a complete, evaluated run folder.

Everything the user can get wrong is checked before the run folder is created; the run is marked
complete (run.json) only after the final model, the evaluation and the reports are on disk. An
interrupted run resumes from its last completed epoch (`resume=<run id>`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from seeds_tf.classifier.backbones import get_backbone
from seeds_tf.classifier.model import (
    FEATURES_LAYER,
    BackboneScaledAdam,
    backbone_layers,
    build_classifier,
    head_model,
    load_classifier,
    save_classifier,
)
from seeds_tf.core import files, runs
from seeds_tf.core.config import ModelConfig, RunConfig, TrainConfig
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import Roots
from seeds_tf.data import datasets
from seeds_tf.data.pipeline import augmentation, make_dataset
from seeds_tf.data.splits import (
    CALIBRATION_SPLIT,
    Dataset,
    Split,
    copy_split_files,
    parse_split_file,
    read_dataset,
    stratified_hold_out,
    write_split_files,
)
from seeds_tf.hosting import admission, remote
from seeds_tf.learning import calibrate, distribute, indexing, preflight, progress, reports, tracking
from seeds_tf.learning.evaluation import evaluate_split, test_metrics
from seeds_tf.prediction.inference import load_run

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a finished training reports: the run, its test metrics (empty without a labelled test
    split), a digest of its final weights (equal on every worker of a distributed run) and, with
    `upload_to`, what became of the copy to the remote."""

    run_id: str
    metrics: dict[str, float]
    training_time_s: float
    weights_digest: str
    upload: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train(config: RunConfig, roots: Roots, *, candidate: bool = False) -> TrainResult:
    """Trains a new run into `roots.models` (or resumes the run `config.training.resume`).

    Args:
        config: the run's options.
        roots: the data and models folders.
        candidate: a run started through the API: it does not become the default served run until
            promoted (runs.default_order). Defaults to False (an operator's run).

    Raises:
        InputError: for bad options or a bad dataset, while another training runs in the models
            folder, or when the run would not fit on its disk, before any run folder is created;
            naming `models_dir` when the models folder cannot be written (full, read-only), in
            which case the other runs are untouched and the new one stays unfinished, to resume.
    """
    # On a cluster, collective operations must be configured before any other TensorFlow work.
    strategy = distribute.strategy()
    # The other workers of a cluster train the same run, into a scratch folder: the chief holds the slot.
    slot = admission.training_slot(roots.models) if distribute.is_chief() else contextlib.nullcontext()
    with slot:
        result = _train_or_resume(config, roots, strategy, candidate)
    if not distribute.is_chief():
        return result
    # Outside the slot, but within a server's or the command line's reservation (admission), which
    # refuses other trainings until the copy, which may take hours, has ended.
    layout = runs.RunLayout(roots.models / result.run_id)
    upload_to = layout.config().training.upload_to  # a resumed run's own destination
    if not upload_to:
        return result
    return dataclasses.replace(result, upload=remote.upload_run(layout.root, upload_to).to_dict())


def _train_or_resume(
    config: RunConfig, roots: Roots, strategy: tf.distribute.Strategy, candidate: bool
) -> TrainResult:
    if config.training.resume:
        with runs.storage_errors(roots.models):
            return _resume(config, roots, strategy, candidate)
    with tempfile.TemporaryDirectory(prefix="seeds_tf_splits_") as staging:
        dataset, weights = _check_inputs(config, roots, Path(staging))
        dataset = _hold_out_calibration(dataset, config.training, Path(staging) / CALIBRATION_SPLIT)
        dataset, skipped = _skip_unreadable(dataset)
        _check_disk(config, len(dataset.classes), roots)
        with runs.storage_errors(roots.models), _run_folder(roots) as layout:
            copy_split_files(dataset.splits_dir, layout.dataset_dir)
            runs.write_conf(layout, config.to_dict())
            return _train_run(
                config, dataset, layout, strategy, weights=weights, skipped=skipped, candidate=candidate
            )


def step_decay(initial_lr: float, epochs: int) -> Callable[[int], float]:
    """The original schedule: the learning rate divided by 10 at 70% and again at 90% of the epochs."""
    boundaries = (math.ceil(0.7 * epochs), math.ceil(0.9 * epochs))
    return lambda epoch: initial_lr * 0.1 ** sum(epoch >= boundary for boundary in boundaries)


def cosine_decay(initial_lr: float, epochs: int) -> Callable[[int], float]:
    """Half a cosine from the initial rate at the first epoch towards zero after the last."""
    return lambda epoch: initial_lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def class_weights(labels: tuple[int, ...], num_classes: int) -> dict[int, float]:
    """Inverse-frequency weights with mean 1 over the present classes; a class absent from the
    training split gets weight 1.0 (finite, and irrelevant since no sample carries it)."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    present = np.count_nonzero(counts)
    return {
        label: float(len(labels) / (present * count)) if count else 1.0
        for label, count in enumerate(counts.tolist())
    }


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of all weight values, in order: identical weights give identical digests."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def _check_inputs(config: RunConfig, roots: Roots, staging: Path) -> tuple[Dataset, str | None]:
    """Checks options and dataset; a folder-per-class dataset is split into `staging` first."""
    training, model = config.training, config.model
    backbone = get_backbone(model.modelname)
    if model.image_size < backbone.min_size:
        raise InputError(
            "image_size",
            f"{model.modelname} needs at least {backbone.min_size}. Received: {model.image_size}",
        )
    weights = _initial_weights(model, roots)
    if training.upload_to:
        remote.check_destination(training.upload_to)
    if training.mode == "fast" and weights is None:
        raise InputError(
            "mode",
            "'fast' freezes the backbone, which only makes sense with pretrained weights; "
            "use weights=imagenet or a weights file, or mode=normal",
        )
    images_dir = roots.data_path(training.images_directory, "images_directory")
    splits_dir = roots.data_path(training.splits_directory, "splits_directory")
    if not (splits_dir / "train.txt").is_file() and datasets.is_folder_dataset(images_dir):
        _LOGGER.info("No split files in %s: splitting the class folders of %s", splits_dir, images_dir)
        splits_dir = datasets.split_folder_dataset(
            images_dir,
            staging,
            val_fraction=training.val_fraction,
            test_fraction=training.test_fraction,
            seed=training.seed,
        )
    dataset = read_dataset(splits_dir, images_dir)
    problems = datasets.mixing_problems(dataset)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(
            "splits_directory",
            f"{splits_dir}: {problems[0]}{more}: the run's figures could not be trusted; "
            "seeds-tf check-dataset lists every problem",
        )
    return dataset, weights


def _hold_out_calibration(dataset: Dataset, training: TrainConfig, folder: Path) -> Dataset:
    """The dataset, with CALIBRATION_SPLIT held out of its training split (stratified_hold_out of
    `training.calibration_fraction`, seeded by `training.seed`) when it has nothing else to calibrate
    on: its split files, so changed, are written into `folder` and become the run's. A dataset with a
    validation split (or a calibration split already), or a fraction of 0, is returned as it is."""
    if _calibration_split(dataset) is not None or training.calibration_fraction == 0:
        return dataset
    entries = parse_split_file(dataset.splits_dir / "train.txt")
    kept, held = stratified_hold_out(entries, training.calibration_fraction, training.seed)
    if not held:
        return dataset  # too few images to spare: _trust_files says the run is uncalibrated
    copy_split_files(dataset.splits_dir, folder)
    write_split_files(
        folder, list(dataset.classes), {"train": kept, CALIBRATION_SPLIT: held}, list(dataset.info or ())
    )
    _LOGGER.info(
        "No validation split: %d of the %d training images are held out of training to calibrate on "
        "(calibration_fraction %g)",
        len(held),
        len(entries),
        training.calibration_fraction,
    )
    return read_dataset(folder, dataset.images_dir)


def _calibration_split(dataset: Dataset) -> Split | None:
    """What a run is calibrated on: its validation split, else the split held out of its training
    images for it, with at least 2 labelled images; None when it has neither."""
    for name in ("val", CALIBRATION_SPLIT):
        split = dataset.split(name)
        if split is not None and split.labels is not None and len(split.paths) >= 2:
            return split
    return None


def _initial_weights(model: ModelConfig, roots: Roots) -> str | None:
    """The backbone's initial weights as `build_classifier` takes them, checked before any run
    folder is made: a weights file in the data folder, or ImageNet's, fetched now. A download that
    failed inside the run left it listed as interrupted, and its resume failed the same way."""
    weights = model.weights
    if weights == "imagenet":
        try:
            get_backbone(model.modelname).fetch_imagenet_weights()
        except Exception as error:  # Keras' download raises a bare Exception
            problem = (
                f"the ImageNet weights of {model.modelname} could not be fetched ({error}); give "
                "weights=none, or a weights file inside the data folder"
            )
            raise InputError("weights", problem) from None
        return weights
    path = preflight.weights_file(roots, weights)
    return None if path is None else str(path)


def _skip_unreadable(dataset: Dataset) -> tuple[Dataset, int]:
    """`dataset` less the images that cannot be decoded (datasets.readable), and how many."""
    splits = {name: datasets.readable(split) for name, split in dataset.splits.items()}
    skipped = sum(len(dataset.splits[name].paths) - len(split.paths) for name, split in splits.items())
    if not skipped:
        return dataset, 0
    # An empty split stopped the training only when it came to it: the validation at the end of the
    # first epoch, the test split's evaluation after the last, and again at every resume.
    for name, split in splits.items():
        if not split.paths and dataset.splits[name].paths:
            which = "training" if name == "train" else name
            raise InputError("images_directory", f"no readable image in the {which} split")
    return dataclasses.replace(dataset, splits=splits), skipped


@contextlib.contextmanager
def _run_folder(roots: Roots, resume: str | None = None) -> Iterator[runs.RunLayout]:
    """The run's folder, new or the interrupted run `resume`: in models/ on the chief. The other
    workers of a cluster train in lockstep into a scratch folder (a copy of the interrupted run):
    they must not write a second copy of the run, nor wait on the lock the chief holds on it.

    Raises:
        InputError: naming `resume`, when it is not an interrupted run of the models folder.
    """
    interrupted = runs.resolve_interrupted_run(roots.models, resume) if resume else None
    if distribute.is_chief():
        yield interrupted or runs.create_run(roots.models)
        return
    with tempfile.TemporaryDirectory(prefix="seeds_tf_worker_") as scratch:
        if interrupted is None:
            yield runs.create_run(Path(scratch))
        else:
            yield runs.RunLayout(shutil.copytree(interrupted.root, Path(scratch) / interrupted.run_id))


def _check_disk(config: RunConfig, num_classes: int, roots: Roots) -> None:
    """Refuses a run whose checkpoints would not fit in the free disk of the models folder."""
    training = config.training
    parameters = _parameter_count(config.model, num_classes)
    periodic = (
        min(training.keep_checkpoints, training.epochs // training.ckpt_freq) if training.ckpt_freq else 0
    )
    admission.check_disk(roots.models, admission.run_bytes(parameters, periodic))


@functools.lru_cache(maxsize=16)
def _parameter_count(model: ModelConfig, num_classes: int) -> int:
    """The classifier's number of weights, counted on the network built at its backbone's smallest
    input (the number does not depend on the input size); remembered, since building even the
    small network takes seconds and a process (a server, a test session) trains many alike."""
    small = dataclasses.replace(model, image_size=get_backbone(model.modelname).min_size)
    return build_classifier(small, num_classes).count_params()


def _resume(
    requested: RunConfig, roots: Roots, strategy: tf.distribute.Strategy, candidate: bool
) -> TrainResult:
    """Continues an interrupted run with its own configuration and split files; `requested`, the
    options of the resume, may ask for nothing else, and its own must still hold (preflight.check)."""
    run_id = requested.training.resume
    preflight.check(requested, roots)
    with _run_folder(roots, resume=run_id) as layout:
        config = layout.config()
        images_dir = roots.data_path(config.training.images_directory, "images_directory")
        dataset, skipped = _skip_unreadable(read_dataset(layout.dataset_dir, images_dir))
        _check_disk(config, len(dataset.classes), roots)
        _LOGGER.info("Resuming run %s", run_id)
        weights = _initial_weights(config.model, roots)
        return _train_run(
            config, dataset, layout, strategy, weights=weights, skipped=skipped, candidate=candidate
        )


def _train_run(
    config: RunConfig,
    dataset: Dataset,
    layout: runs.RunLayout,
    strategy: tf.distribute.Strategy,
    *,
    weights: str | None,
    skipped: int,
    candidate: bool,
) -> TrainResult:
    training = config.training
    num_classes = len(dataset.classes)
    _LOGGER.info("Training run %s on %d classes (%s)", layout.run_id, num_classes, type(strategy).__name__)
    started = time.monotonic()
    # Marked in progress until complete: the model's metadata shows how far it is.
    with progress.tracking(layout, training.epochs) as tracker:
        keras.utils.set_random_seed(training.seed)
        with _dtype_policy(training.mixed_precision), strategy.scope():
            model = _compiled_model(config, num_classes, weights)
            distribute.synchronize_batch_norm(model, strategy)
        # What is saved and served is float32: a model trained in mixed precision is copied into
        # its float32 twin, built once, for every checkpoint and the final model.
        twin = build_classifier(config.model, num_classes) if training.mixed_precision != "none" else None
        # Tracked by the chief alone: the other workers of a cluster train the same run.
        mlflow = (
            tracking.start_logger(layout.run_id, _flat_options(config))
            if tracking.mlflow_enabled() and distribute.is_chief()
            else None
        )
        try:
            epoch_log = _fit(
                model, config, dataset, layout, strategy, twin=twin, mlflow=mlflow, progress_log=tracker
            )
            history = epoch_log.epochs
            model = _as_served(model, twin)
            save_classifier(model, layout.final_model)
            metrics = _write_reports(model, config, dataset, layout, history)
            if distribute.is_chief():
                _trust_files(model, layout, dataset, config)
        except BaseException:
            if mlflow is not None:
                mlflow.abort()
            raise
        # The epochs restored from an interrupted attempt count too.
        training_time = round(epoch_log.restored_seconds() + time.monotonic() - started, 1)
        digest = weights_digest(model)
        files.write_json(
            layout.stats_file, {"epochs": history, "training_time_s": training_time, "test": metrics}
        )
        registered = None
        if mlflow is not None:
            registered = mlflow.finish(model, metrics, [layout.reports_dir, layout.conf_file.parent])
        tracker.finish()
        runs.mark_complete(
            layout,
            metrics=metrics,
            skipped_images=skipped,
            weights_digest=digest,
            mlflow_model_version=registered,
            candidate=candidate,
        )
        shutil.rmtree(layout.backup_dir, ignore_errors=True)  # a complete run is never resumed
    _LOGGER.info("Run %s complete in %.0f s: %s", layout.run_id, training_time, metrics)
    return TrainResult(layout.run_id, metrics, training_time, digest)


def _trust_files(model: keras.Model, layout: runs.RunLayout, dataset: Dataset, config: RunConfig) -> None:
    """The index of the run's training images, and its calibration, fitted on its validation split
    (else on the images held out of training for it; the test split reports it) with the reference
    specimens of that index: written before the run is complete, so every answer it gives is
    calibrated and can show its reference specimens."""
    fitting, batch_size = _calibration_split(dataset), config.training.batch_size
    # The final model as saved, still in memory: its traced predict function serves again.
    run = load_run(layout, model=model)
    indexing.index_split(layout, run, dataset.split("train"), dataset.images_dir, batch_size)
    if fitting is not None:
        calibrate.calibrate_splits(
            layout,
            run,
            fitting,
            dataset.split("test"),
            target_precision=config.training.target_precision,
            batch_size=batch_size,
        )
    else:
        _LOGGER.warning(
            "Run %s has no validation split nor images held out to calibrate on (calibration_fraction "
            "%g): it answers uncalibrated until `seeds-tf calibrate %s --split FILE` fits it on "
            "labelled images of yours",
            layout.run_id,
            config.training.calibration_fraction,
            layout.run_id,
        )


@contextlib.contextmanager
def _dtype_policy(mixed_precision: str) -> Iterator[None]:
    """Builds layers under a mixed-precision policy, restoring the process's policy afterwards."""
    previous = keras.config.dtype_policy()
    if mixed_precision != "none":
        keras.config.set_dtype_policy(f"mixed_{mixed_precision}")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _compiled_model(config: RunConfig, num_classes: int, weights: str | None) -> keras.Model:
    model = build_classifier(config.model, num_classes, weights)
    if config.training.mode == "fast":
        for layer in backbone_layers(model):
            layer.trainable = False
    compile_classifier(model, config, num_classes)
    return model


def compile_classifier(model: keras.Model, config: RunConfig, num_classes: int) -> None:
    """Adam with the backbone at its own rate, cross-entropy with label smoothing, top-1 and top-5,
    in a compiled graph unless the run asks for eager steps.

    The optimizer's variables are made here: made inside the first traced training step instead,
    they make TensorFlow trace that step twice (seconds to tens of seconds per training)."""
    model.compile(
        optimizer=BackboneScaledAdam(
            backbone_lr_factor=config.training.backbone_lr_factor,
            learning_rate=config.training.initial_lr,
        ),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.training.label_smoothing),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5_accuracy"),
        ],
        run_eagerly=config.training.run_eagerly,
    )
    model.optimizer.build(model.trainable_variables)


def _as_served(model: keras.Model, twin: keras.Model | None) -> keras.Model:
    """`model` as it is saved and served: its weights in `twin`, the float32 twin of a model trained
    in mixed precision (serving on CPUs must not run in 16-bit), else `model` itself."""
    if twin is None:
        return model
    twin.set_weights(model.get_weights())
    return twin


def _fit(
    model: keras.Model,
    config: RunConfig,
    dataset: Dataset,
    layout: runs.RunLayout,
    strategy: tf.distribute.Strategy,
    *,
    twin: keras.Model | None,
    mlflow: tracking.MlflowLogger | None,
    progress_log: progress.ProgressLog,
) -> _EpochLog:
    """Runs model.fit with the run's callbacks, leaving `model` with the weights to save (those of
    the best epoch under early stopping); returns the log of the per-epoch records of stats.json."""
    training, size = config.training, config.model.image_size
    num_classes = len(dataset.classes)
    train_split = dataset.split("train")
    val_split = dataset.split("val") if training.use_validation else None
    augment = augmentation(config.augmentation, training.seed) if training.augment else None
    train_data = make_dataset(
        train_split, size, training.batch_size, num_classes, shuffle=True, augment=augment, seed=training.seed
    )
    val_data = make_dataset(val_split, size, training.batch_size, num_classes) if val_split else None

    fitted = model
    if training.mode == "fast" and augment is None and strategy.num_replicas_in_sync == 1:
        # The frozen backbone gives each image the same features every epoch: compute them in
        # the first epoch, cache them, and train the head alone on the cache afterwards.
        fitted = head_model(model)
        compile_classifier(fitted, config, num_classes)
        train_data = _fast_mode_train_data(model, train_split, size, training, num_classes)
        val_data = _cached_features(model, val_data, training.batch_size) if val_data else None

    epoch_log = _EpochLog(layout)
    monitor = "val_loss" if val_data else "loss"
    schedule = {"step": step_decay, "cosine": cosine_decay}[training.lr_schedule]
    callbacks = [
        _StopWhenDiverged(training.initial_lr),
        # The epoch's record goes to stats.json and its checkpoints are saved before its backup: a
        # run killed in between redoes the epoch and replaces them, instead of resuming without.
        epoch_log,
        _Checkpoints(model, layout, training.ckpt_freq, training.keep_checkpoints, monitor, twin=twin),
        # Saves the training state every epoch and restores it when the run is resumed; kept
        # until the run is complete (_train_run deletes it).
        _AtomicBackup(layout),
        keras.callbacks.LearningRateScheduler(schedule(training.initial_lr, training.epochs)),
        keras.callbacks.TensorBoard(log_dir=str(layout.logs_dir)),
    ]
    if training.use_early_stopping:
        callbacks.append(_ResumableEarlyStopping(layout, monitor, training.early_stopping_patience))
    if mlflow is not None:
        callbacks.append(mlflow)
    # On a terminal, Keras' progress bar shows the batches of each epoch; it is placed here so that
    # it ends its line before the progress line (Keras would add it after every other callback).
    terminal = sys.stdout.isatty()
    if terminal:
        callbacks.append(keras.callbacks.ProgbarLogger())
    # Last, so that an epoch's time includes the saving after it.
    callbacks.append(progress_log)
    fitted.fit(
        train_data,
        validation_data=val_data,
        epochs=training.epochs,
        shuffle=False,  # make_dataset shuffles, seeded; Keras cannot shuffle a tf.data.Dataset
        class_weight=class_weights(train_split.labels, num_classes) if training.use_class_weights else None,
        callbacks=callbacks,
        verbose=1 if terminal else 0,  # elsewhere (a DEEPaaS worker's log, a file), no bar
    )
    if training.use_early_stopping and layout.best_model.is_file():
        # The best epoch's weights, as Keras' restore_best_weights would restore them, but from
        # best.keras, which outlives a kill: a resumed run ends at its best epoch of all attempts.
        model.set_weights(load_classifier(layout.best_model).get_weights())
    return epoch_log


def _fast_mode_train_data(
    model: keras.Model, split: Split, image_size: int, training: TrainConfig, num_classes: int
) -> tf.data.Dataset:
    """Fast mode's (features, labels) batches of the training split: every image's, in a seeded
    order, reshuffled each epoch. Read as the other modes read it (shuffled, the last partial batch
    dropped), the images the first epoch dropped never reached the cache, and no epoch trained on
    them: a rare class could vanish from the training."""
    order = np.random.default_rng(training.seed).permutation(len(split.paths))
    shuffled = Split(split.name, tuple(split.paths[i] for i in order), tuple(split.labels[i] for i in order))
    images = make_dataset(shuffled, image_size, training.batch_size, num_classes)
    return _cached_features(model, images, training.batch_size, shuffle_seed=training.seed)


def _cached_features(
    model: keras.Model, data: tf.data.Dataset, batch_size: int, shuffle_seed: int | None = None
) -> tf.data.Dataset:
    """(features, labels) batches whose features the backbone computes once, on the first pass."""
    extractor = keras.Model(model.input, model.get_layer(FEATURES_LAYER).output, name="features")
    features = data.map(lambda batch, labels: (extractor(batch, training=False), labels)).unbatch().cache()
    if shuffle_seed is not None:
        features = features.shuffle(4096, seed=shuffle_seed, reshuffle_each_iteration=True)
    # Without the autotuner: it models the whole pipeline, backbone included, and tearing down a
    # finished epoch's iterator then took up to 8 s, more than the cached epoch itself
    # (benchmarks/serving.py, fast mode). Cached features need no tuning.
    options = tf.data.Options()
    options.autotune.enabled = False
    return features.batch(batch_size).prefetch(2).with_options(options)


def _write_reports(
    model: keras.Model, config: RunConfig, dataset: Dataset, layout: runs.RunLayout, history: list
) -> dict[str, float]:
    """Training curves, and the evaluation on the labelled test split; returns the test metrics.
    Every worker of a cluster evaluates (its predictions are collective operations), and the chief
    alone draws and writes the reports: the others' run is a scratch copy, deleted at the end."""
    chief = distribute.is_chief()
    if chief:
        reports.plot_training_curves(history, layout.reports_dir / "training_curves.png")
    test = dataset.split("test")
    if test is None or test.labels is None:
        return {}
    evaluation = evaluate_split(
        model, test, dataset.classes, config.model.image_size, config.training.batch_size
    )
    if chief:
        reports.write_evaluation(evaluation, layout.reports_dir, prefix="test")
    return test_metrics(evaluation)


def _flat_options(config: RunConfig) -> dict[str, Any]:
    return {name: value for section in config.to_dict().values() for name, value in section.items()}


class _StopWhenDiverged(keras.callbacks.Callback):
    """Fails the training, saying why, the moment its loss is no longer a number: a network whose
    weights went to NaN learns nothing more, and trained on it would be saved, calibrated and served
    (Keras' TerminateOnNaN only stops the epochs, and the run then completes). First of the
    callbacks, so that no checkpoint or backup of the diverged weights is written."""

    def __init__(self, initial_lr: float):
        super().__init__()
        self._initial_lr = initial_lr
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._check({"loss": (logs or {}).get("loss", 0.0)}, f"in epoch {self._epoch + 1}, batch {batch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        # A batch's loss is taken before its update: weights that the last update of an epoch
        # made NaN show first in the epoch's val_loss.
        self._check(logs or {}, f"at the end of epoch {epoch + 1}")

    def _check(self, logs: dict[str, Any], when: str) -> None:
        for name, value in logs.items():
            if not math.isfinite(float(value)):
                raise InputError(
                    "initial_lr",
                    f"the training diverged: its {name} became {float(value)} {when}; train again "
                    f"with a smaller initial_lr than {self._initial_lr:g}",
                )


class _EpochLog(keras.callbacks.Callback):
    """Rewrites stats/stats.json after each epoch (the line in the log comes from
    progress.ProgressLog). A resumed run keeps the records of the epochs it had already completed."""

    def __init__(self, layout: runs.RunLayout):
        super().__init__()
        self._layout = layout
        self.epochs: list[dict[str, float]] = []
        self._started = 0.0
        self._first_epoch: int | None = None  # of this fit; None until it trains one

    def on_train_begin(self, logs=None):
        if self._layout.stats_file.is_file():
            self.epochs = files.read_json(self._layout.stats_file).get("epochs", [])

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.monotonic()
        if self._first_epoch is None:
            self._first_epoch = epoch
        # Records beyond the restored epoch belong to the interrupted attempt: it is done again.
        self.epochs = [record for record in self.epochs if record["epoch"] <= epoch]

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
        files.write_json(self._layout.stats_file, {"epochs": self.epochs})

    def restored_seconds(self) -> float:
        """The training time of the epochs restored from the attempts before this fit."""
        first = math.inf if self._first_epoch is None else self._first_epoch
        return sum(record["seconds"] for record in self.epochs if record["epoch"] <= first)


class _AtomicBackup(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore with a backup that a kill at any instant leaves usable.

    Keras rewrites `latest.weights.h5` in place and the epoch number in a second file after it: a
    kill while saving leaves truncated weights (the resumed run then fails) or weights an epoch
    ahead of their number. Here each epoch's weights go to a file of their own through
    files.atomic_path; only then does `state.json` (atomic too) name them as the last epoch done.

    Keras deletes its backup when fit returns; this one outlives fit until the run is complete, so
    a run killed while it is saved, evaluated, indexed or calibrated resumes after its last epoch
    (fitting no epoch again) instead of from the first.
    """

    def __init__(self, layout: runs.RunLayout):
        super().__init__(str(layout.backup_dir), delete_checkpoint=False)
        self._layout = layout

    def _save_model(self):
        weights = self._layout.backup_dir / f"epoch_{self._current_epoch:04d}.weights.h5"
        with files.atomic_path(weights) as temporary:
            self.model.save_weights(temporary)
        files.write_json(self._layout.backup_state, {"epoch": self._current_epoch, "weights": weights.name})
        for stale in self._layout.backup_dir.glob("epoch_*.weights.h5"):
            if stale != weights:
                stale.unlink()

    def _load_model(self):
        if not self._layout.backup_state.is_file():
            return
        state = files.read_json(self._layout.backup_state)
        # compile_classifier made the optimizer's variables, so the saved ones load into them.
        self.model.load_weights(self._layout.backup_dir / state["weights"])
        # As Keras' own callback does: fit starts from the epoch after the last one backed up.
        self.model._initial_epoch = state["epoch"]


class _Checkpoints(keras.callbacks.Callback):
    """ckpts/epoch_NNNN.keras every `frequency` epochs (the newest `keep` of them kept) and
    ckpts/best.keras at the best `monitor`, written atomically, for the full classifier even while
    a head alone is being fitted, and in float32 through its `twin` when it trains in mixed
    precision. A resumed run starts from the best of the epochs it had done (in stats.json), so a
    worse epoch after the resume does not replace best.keras."""

    def __init__(
        self,
        classifier: keras.Model,
        layout: runs.RunLayout,
        frequency: int,
        keep: int,
        monitor: str,
        *,
        twin: keras.Model | None,
    ):
        super().__init__()
        self._classifier = classifier
        self._twin = twin
        self._layout = layout
        self._frequency = frequency
        self._keep = keep
        self._monitor = monitor
        self._best: float | None = None  # known at the first epoch of the fit

    def on_epoch_begin(self, epoch, logs=None):
        if self._best is None:
            # The fit's first epoch: the `epoch` epochs before it were done by an earlier attempt.
            restored = _restored_records(self._layout, epoch, self._monitor)
            self._best = min((record[self._monitor] for record in restored), default=math.inf)

    def on_epoch_end(self, epoch, logs=None):
        if self._frequency and self._keep and (epoch + 1) % self._frequency == 0:
            self._save(self._layout.ckpts_dir / f"epoch_{epoch + 1:04d}.keras")
            periodic = sorted(self._layout.ckpts_dir.glob("epoch_*.keras"))
            for stale in periodic[: -self._keep]:
                stale.unlink()
        value = (logs or {}).get(self._monitor)
        if value is not None and value < self._best:
            self._best = value
            self._save(self._layout.best_model)

    def _save(self, path: Path) -> None:
        save_classifier(_as_served(self._classifier, self._twin), path)


class _ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' EarlyStopping, continued by a resumed run: its best value and its count of epochs
    without improvement are replayed from the epochs done before (stats.json), and a run that had
    already stopped trains no further epoch. It keeps no weights: the best are in ckpts/best.keras
    (_Checkpoints, on the same monitor), which _fit loads when the fit ends."""

    def __init__(self, layout: runs.RunLayout, monitor: str, patience: int):
        super().__init__(monitor=monitor, patience=patience, mode="min")
        self._layout = layout

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        # _AtomicBackup, before this callback, has set the epoch a resumed fit starts from.
        done = getattr(self.model, "_initial_epoch", 0) or 0
        for record in _restored_records(self._layout, done, self.monitor):
            super().on_epoch_end(record["epoch"] - 1, record)
        if self.stopped_epoch:
            self.model._initial_epoch = self.params["epochs"]


def _restored_records(layout: runs.RunLayout, done: int, monitor: str) -> list[dict[str, float]]:
    """The records in stats.json of the first `done` epochs (those a resumed fit restored; the
    later ones are of the attempt that was killed) that have a `monitor` value, oldest first."""
    if not done or not layout.stats_file.is_file():
        return []
    records = files.read_json(layout.stats_file).get("epochs", [])
    return sorted(
        (record for record in records if record["epoch"] <= done and monitor in record),
        key=lambda record: record["epoch"],
    )
