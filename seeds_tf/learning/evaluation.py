"""Evaluating a model on a labelled split: the test report of every run, and `seeds-tf evaluate`."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np

from seeds_tf.core import runs
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import Roots
from seeds_tf.data import datasets
from seeds_tf.data.pipeline import images_only, make_dataset
from seeds_tf.data.splits import Split, read_split
from seeds_tf.learning import reports
from seeds_tf.prediction.inference import load_run

_LOGGER = logging.getLogger(__name__)


def predict_split(model: keras.Model, split: Split, image_size: int, batch_size: int) -> np.ndarray:
    """Softmax outputs for every image of `split`, in order, shape (len(split.paths), num_classes)."""
    num_classes = model.output_shape[-1]
    data = images_only(make_dataset(split, image_size, batch_size, num_classes))
    return np.asarray(model.predict(data, verbose=0), dtype=np.float64)


def evaluate_split(
    model: keras.Model, split: Split, classes: tuple[str, ...], image_size: int, batch_size: int
) -> reports.Evaluation:
    """Top-1/top-5, per-class precision/recall/F1 and the confusion matrix of `model` on `split`."""
    if split.labels is None:
        raise InputError("split_file", f"{split.name} has no labels to evaluate against")
    probabilities = predict_split(model, split, image_size, batch_size)
    return reports.evaluate(split.labels, probabilities, classes, split.name)


def test_metrics(evaluation: reports.Evaluation) -> dict[str, float]:
    """The headline figures of an evaluation, as a run records them in run.json and stats.json."""
    return {
        "test_accuracy": round(evaluation.top1, 6),
        "test_top5_accuracy": round(evaluation.top5, 6),
        "test_loss": round(evaluation.log_loss, 6),
        "test_macro_f1": round(evaluation.macro_f1, 6),
    }


def evaluate_run(roots: Roots, run_id: str, split_file: Path, batch_size: int = 32) -> reports.Evaluation:
    """Re-evaluates a complete run on any split file (paths relative to the run's images folder) and
    writes `reports/<report_name>_evaluation.json` and its confusion-matrix PNG into the run."""
    layout = runs.resolve_run(roots.models, run_id)
    run = load_run(layout)
    images_dir = roots.data_path(layout.config().training.images_directory, "images_directory")
    if not split_file.is_file():
        raise InputError("split_file", f"{split_file} is not a file")
    name = report_name(layout, split_file)
    listed = read_split(split_file, name, images_dir, len(run.classes), "split_file")
    split = datasets.readable(listed)
    evaluation = evaluate_split(run.model, split, run.classes, run.config.image_size, batch_size)
    written = reports.write_evaluation(evaluation, layout.reports_dir, prefix=name)
    _LOGGER.info("Run %s on %s: top-1 %.4f; wrote %s", run_id, split_file, evaluation.top1, written)
    return evaluation


def report_name(layout: runs.RunLayout, split_file: Path) -> str:
    """The name of the evaluation of `split_file` in the run's reports: the file's stem, prefixed
    by its folder's name where the stem is that of one of the run's own splits and the file is not
    that split (another dataset's test.txt), so that the run's own test report, which its run.json
    figures come from, is never replaced by another split's."""
    own = layout.dataset_dir / f"{split_file.stem}.txt"
    if not own.is_file() or own.read_bytes() == split_file.read_bytes():
        return split_file.stem
    return f"{split_file.resolve().parent.name}_{split_file.stem}"
