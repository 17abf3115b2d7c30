"""Run reports: metrics of a model on a labelled split, and pictures of them and of the training.

Written to `models/<run id>/reports/` after training and by `seeds-tf evaluate`, as JSON for programs
and PNG for people. The inputs are plain numpy arrays, so this module never imports TensorFlow.
Pictures are drawn on `Figure` objects with the Agg canvas, never through pyplot: no global state,
safe in DEEPaaS worker threads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from seeds_tf.core import files

TOP_K = 5
_MIN_PROBABILITY = 1e-7
_MOST_CONFUSED = 10
_MAX_COUNTS_SHOWN = 20
"""Beyond this many classes the cells are too small for their counts."""
_MAX_NAMES_SHOWN = 60
"""Beyond this many classes the axes show label ids instead of class names."""
_MAX_NAME_CHARS = 32
_DPI = 110


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Metrics of one model on one labelled split."""

    split: str  # "test", or the split file evaluated
    num_images: int
    top1: float
    top5: float  # top-min(5, num_classes)
    log_loss: float  # mean cross-entropy, probabilities clipped to [1e-7, 1]
    per_class: list[dict]  # in label order: label_id, label, support, precision, recall, f1
    macro_f1: float  # over the classes with support
    most_confused: list[dict]  # off-diagonal cells, most frequent first: true(_id), predicted(_id), count
    confusion: list[list[int]]  # confusion[true][predicted]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def evaluate(
    labels: Sequence[int], probabilities: np.ndarray, classes: Sequence[str], split: str
) -> Evaluation:
    """Scores softmax outputs against true labels.

    Args:
        labels: true label ids, shape (n,).
        probabilities: softmax outputs, shape (n, num_classes), row i for image i.
        classes: the class names, item i naming label i.
        split: what was evaluated, for the report ("test" or a split file name).

    Top-5 is top-min(5, num_classes), counting ties at the boundary as hits, like Keras's metric.
    A class never predicted has precision 0.0 and a class absent from the split recall 0.0, so the
    JSON never holds NaN; macro F1 leaves out the absent classes.

    Raises:
        ValueError: for empty input, shapes that disagree, non-integer or out-of-range labels, or
            probabilities that are not finite.
    """
    true, scores = _checked(labels, probabilities, len(classes))
    num_images, num_classes = scores.shape
    predicted = scores.argmax(axis=1)
    confusion = np.bincount(true * num_classes + predicted, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    true_scores = scores[np.arange(num_images), true]
    rank = (scores > true_scores[:, None]).sum(axis=1)

    hits = np.diag(confusion)
    support = confusion.sum(axis=1)
    precision = _ratio(hits, confusion.sum(axis=0))
    recall = _ratio(hits, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    per_class = [
        {
            "label_id": i,
            "label": str(classes[i]),
            "support": int(support[i]),
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
        }
        for i in range(num_classes)
    ]
    return Evaluation(
        split=split,
        num_images=num_images,
        top1=float(np.mean(predicted == true)),
        top5=float(np.mean(rank < min(TOP_K, num_classes))),
        log_loss=float(-np.mean(np.log(np.clip(true_scores, _MIN_PROBABILITY, 1.0)))),
        per_class=per_class,
        macro_f1=float(f1[support > 0].mean()),
        most_confused=_most_confused(confusion, classes),
        confusion=confusion.tolist(),
    )


def write_evaluation(evaluation: Evaluation, folder: Path, prefix: str = "test") -> list[Path]:
    """Writes `<prefix>_evaluation.json` and `<prefix>_confusion_matrix.png` into folder.

    Returns:
        The paths written, JSON first.
    """
    json_path = folder / f"{prefix}_evaluation.json"
    files.write_json(json_path, evaluation.to_dict())
    png_path = _save_png_atomic(_confusion_figure(evaluation), folder / f"{prefix}_confusion_matrix.png")
    return [json_path, png_path]


def plot_training_curves(epochs: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Draws loss, accuracy (with top-5 when recorded) and learning rate per epoch, into a PNG.

    Args:
        epochs: the records of stats/stats.json: "epoch", "loss", "accuracy", "lr", and optionally
            "val_loss", "val_accuracy", "top5_accuracy", "val_top5_accuracy", "seconds". A key
            missing from some records (validation every few epochs) is drawn where it was recorded.
        path: the PNG to write.

    Raises:
        ValueError: when there is no epoch to draw.
    """
    if not epochs:
        raise ValueError("Expected at least one epoch record. Received: epochs=[]")
    panels = [
        ("Loss", [("loss", "train", "C0"), ("val_loss", "validation", "C0")]),
        (
            "Accuracy",
            [
                ("accuracy", "top-1 train", "C1"),
                ("val_accuracy", "top-1 validation", "C1"),
                ("top5_accuracy", "top-5 train", "C2"),
                ("val_top5_accuracy", "top-5 validation", "C2"),
            ],
        ),
    ]
    if any("lr" in record for record in epochs):
        panels.append(("Learning rate", [("lr", "learning rate", "C3")]))

    figure = Figure(figsize=(5.2 * len(panels), 4.2), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    markers = len(epochs) <= 30
    for ax, (title, series) in zip(axes, panels, strict=True):
        for key, label, color in series:
            points = [(record["epoch"], record[key]) for record in epochs if key in record]
            if points:
                x, y = zip(*points, strict=True)
                ax.plot(
                    x,
                    y,
                    color=color,
                    linestyle="--" if key.startswith("val_") else "-",
                    marker="o" if markers else None,
                    markersize=3.5,
                    # The rate holds for a whole epoch: a step shows where it changed.
                    drawstyle="steps-mid" if key == "lr" else "default",
                    label=label,
                )
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if title == "Accuracy":
            ax.set_ylim(0, 1.02)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if title == "Learning rate":
            _log_scale_rates(ax, [record["lr"] for record in epochs if "lr" in record])
        elif ax.get_lines():
            ax.legend(fontsize=8, loc="best")
    figure.suptitle(_curves_title(epochs))
    return _save_png_atomic(figure, path)


def plot_reliability(
    before: Sequence[Mapping[str, Any]],
    after: Sequence[Mapping[str, Any]],
    *,
    ece_before: float,
    ece_after: float,
    temperature: float,
    path: Path,
    title: str = "",
) -> Path:
    """Draws the reliability diagram of a calibration, into a PNG: two panels, before and after the
    temperature, each with the accuracy of every bin of top-1 confidence as a bar, the gap to the bin's
    mean confidence in red, the diagonal of perfect calibration, and the ECE in the legend.

    Args:
        before, after: the tables of seeds_tf.prediction.calibration.reliability_bins (low, high,
            confidence, accuracy, count; None for an empty bin), before and after scaling.
        ece_before, ece_after: their expected calibration errors.
        temperature: the temperature fitted, for the second panel's title.
        path: the PNG to write.
        title: the figure's title; default none.

    Raises:
        ValueError: when a table is empty.
    """
    if not before or not after:
        raise ValueError(
            f"Expected reliability tables with bins. Received: {len(before)} and {len(after)} bins"
        )
    figure = Figure(figsize=(10.4, 5.0), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    panels = [("Before: T = 1", before, ece_before), (f"After: T = {temperature:.3g}", after, ece_after)]
    for ax, (name, table, ece) in zip(axes, panels, strict=True):
        filled = [row for row in table if row["count"]]
        lows = [row["low"] for row in filled]
        widths = [row["high"] - row["low"] for row in filled]
        accuracy = [row["accuracy"] for row in filled]
        confidence = [row["confidence"] for row in filled]
        ax.bar(lows, accuracy, width=widths, align="edge", color="C0", edgecolor="white", label="accuracy")
        # The gap from each bar to the bin's mean confidence: what the ECE adds up, weighted by count.
        ax.bar(
            lows,
            [c - a for c, a in zip(confidence, accuracy, strict=True)],
            bottom=accuracy,
            width=widths,
            align="edge",
            color="C3",
            alpha=0.35,
            edgecolor="C3",
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=1, label="perfect calibration")
        ax.plot([], [], " ", label=f"ECE {ece:.1%} ({sum(row['count'] for row in table)} images)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("top-1 confidence")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("accuracy")
    if title:
        figure.suptitle(title)
    return _save_png_atomic(figure, path)


def _log_scale_rates(ax: Axes, rates: list[float]) -> None:
    """Puts the rates on a log scale, where a division by 10 is one step, when all are positive.

    The limits are set first: a constant rate would give a log axis of zero height and a warning.
    """
    if min(rates) > 0:
        ax.set_ylim(min(rates) / 2, max(rates) * 2)
        ax.set_yscale("log")


def _checked(
    labels: Sequence[int], probabilities: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """The arguments of `evaluate` as arrays, or a ValueError that says what is wrong with them."""
    if num_classes < 1:
        raise ValueError("Expected at least one class name. Received: classes=[]")
    true = np.asarray(labels)
    if true.ndim != 1 or true.size == 0:
        raise ValueError(f"Expected a non-empty 1-D sequence of label ids. Received: shape={true.shape}")
    if not np.issubdtype(true.dtype, np.integer):
        raise ValueError(f"Expected integer label ids. Received: dtype={true.dtype}")
    scores = np.asarray(probabilities, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise ValueError(
            f"Expected probabilities of shape (n, num_classes) = ({true.size}, {num_classes}). "
            f"Received: shape={scores.shape}"
        )
    if scores.shape[0] != true.size:
        raise ValueError(
            f"Expected one row of probabilities per label. Received: {true.size} labels and "
            f"{scores.shape[0]} rows"
        )
    outside = (true < 0) | (true >= num_classes)
    if outside.any():
        raise ValueError(
            f"Expected label ids in 0..{num_classes - 1}. Received: {int(true[outside][0])} "
            f"at position {int(np.flatnonzero(outside)[0])}"
        )
    if not np.isfinite(scores).all():
        raise ValueError("Expected finite probabilities. Received: NaN or infinity")
    return true.astype(np.int64), scores


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0.0 where the denominator is 0 (no NaN, no warning)."""
    result = np.zeros(len(numerator), dtype=np.float64)
    np.divide(numerator, denominator, out=result, where=denominator > 0)
    return result


def _most_confused(confusion: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """The most frequent off-diagonal cells, most frequent first, ties in label order."""
    off_diagonal = confusion.copy()
    np.fill_diagonal(off_diagonal, 0)
    true_ids, predicted_ids = np.nonzero(off_diagonal)
    counts = off_diagonal[true_ids, predicted_ids]
    order = np.lexsort((predicted_ids, true_ids, -counts))[:_MOST_CONFUSED]
    return [
        {
            "true_id": int(true_ids[i]),
            "true": str(classes[true_ids[i]]),
            "predicted_id": int(predicted_ids[i]),
            "predicted": str(classes[predicted_ids[i]]),
            "count": int(counts[i]),
        }
        for i in order
    ]


def _confusion_figure(evaluation: Evaluation) -> Figure:
    """Rows coloured by share of the true class (recall on the diagonal), so rare and common classes
    read alike; counts in the cells while they fit, class names on the axes while they fit."""
    counts = np.asarray(evaluation.confusion)
    num_classes = len(counts)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    large = num_classes > _MAX_COUNTS_SHOWN
    side = 5.0 + 0.22 * min(num_classes, 50)
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = figure.subplots()
    # The square-root scale makes the few images of a confusion visible beside a dark diagonal.
    image = ax.imshow(shares, cmap="Blues", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
    colorbar = figure.colorbar(image, ax=ax, shrink=0.5 if large else 0.8, format=PercentFormatter(1.0))
    colorbar.set_label("share of the true class's images", fontsize=11)

    if num_classes <= _MAX_NAMES_SHOWN:
        names = [_short(entry["label"]) for entry in evaluation.per_class]
        font = 7 if large else 9
        ax.set_xticks(range(num_classes), names, fontsize=font, rotation=90 if large else 45)
        ax.set_yticks(range(num_classes), names, fontsize=font)
        if not large:
            for tick in ax.get_xticklabels():
                tick.set_horizontalalignment("right")
                tick.set_rotation_mode("anchor")
        edges = np.arange(num_classes + 1) - 0.5
        lines = {"colors": "white", "linewidth": 0.6 if large else 1.5}
        ax.hlines(edges, edges[0], edges[-1], **lines)
        ax.vlines(edges, edges[0], edges[-1], **lines)
        ax.set_xlabel("predicted class", fontsize=11)
        ax.set_ylabel("true class", fontsize=11)
    else:
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("predicted label id", fontsize=11)
        ax.set_ylabel("true label id", fontsize=11)
    if not large:
        for (row, column), count in np.ndenumerate(counts):
            ax.text(
                column,
                row,
                str(count),
                ha="center",
                va="center",
                fontsize=10 if num_classes <= 10 else 8,
                color="white" if image.norm(shares[row, column]) > 0.6 else ("black" if count else "0.7"),
            )
    ax.set_title(
        f"Confusion matrix: {evaluation.split}\n"
        f"top-1 {evaluation.top1:.1%}, top-5 {evaluation.top5:.1%}, {evaluation.num_images} images",
        fontsize=14 if large else 12,
    )
    return figure


def _short(name: str) -> str:
    """A class name cut to fit beside the matrix; the JSON keeps it whole."""
    return name if len(name) <= _MAX_NAME_CHARS else name[: _MAX_NAME_CHARS - 1] + "…"


def _curves_title(epochs: Sequence[Mapping[str, float]]) -> str:
    """Says how long training ran and, when validated, where validation accuracy peaked."""
    title = f"Training: {len(epochs)} epoch{'s' * (len(epochs) != 1)}"
    seconds = sum(record.get("seconds", 0.0) for record in epochs)
    if seconds:
        title += f" in {_duration(seconds)}"
    validated = [record for record in epochs if "val_accuracy" in record]
    if validated:
        best = max(validated, key=lambda record: record["val_accuracy"])
        title += f"; best validation accuracy {best['val_accuracy']:.1%} at epoch {best['epoch']}"
    return title


def _duration(seconds: float) -> str:
    minutes, rest = divmod(math.ceil(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _save_png_atomic(figure: Figure, path: Path) -> Path:
    """Renders `figure` to a PNG at `path`, atomically."""
    FigureCanvasAgg(figure)  # attaches itself to the figure: rendering needs no pyplot backend
    with files.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=_DPI, facecolor="white")
    return path
