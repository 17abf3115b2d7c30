"""Calibrating a trained run on a held-out split: `seeds-tf calibrate`.

Fits the temperature, the decision thresholds and the OOD threshold (seeds_tf.prediction.calibration)
on the run's validation split by default, saves them as the run's calibration.json, and reports how
well they fit: `reports/calibration.json` and `reports/reliability_diagram.png`. A run with an index
of its training images is calibrated with its reference specimens too
(seeds_tf.prediction.calibration.Evidence): the thresholds are chosen under the neighbour rule and
the specimen distance gets its threshold. When the run's test split has labels (and was not the split
fitted on), the report also holds the honest figures, on images that played no part in the fit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from seeds_tf.core import files, runs
from seeds_tf.core.config import option_specs
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import Roots
from seeds_tf.data import datasets
from seeds_tf.data.splits import CALIBRATION_SPLIT, SPLIT_NAMES, Split, parse_split_file, read_split
from seeds_tf.learning import reports
from seeds_tf.learning.evaluation import predict_split
from seeds_tf.prediction import calibration, neighbours
from seeds_tf.prediction.inference import LoadedRun, load_run

_LOGGER = logging.getLogger(__name__)

REPORT_FILE = "calibration.json"
DIAGRAM_FILE = "reliability_diagram.png"
_HELD_OUT_SPLIT = "test"


def calibrate_run(
    roots: Roots, run_id: str, split: str = "val", target_precision: float = 0.95, batch_size: int = 32
) -> calibration.Calibration:
    """Calibrates a complete run on one of its labelled splits and saves the result in the run.

    Args:
        roots: where the run and its images are.
        run_id: the run; empty for the default one (the promoted, else the newest).
        split: "val" (the default: held out from training, not the test split that reports the run),
            "calibration" (what a training without validation split held out of its training images
            for this, splits.CALIBRATION_SPLIT), "train", "test", or the path of a split file
            (paths relative to the run's images folder), as `seeds-tf evaluate` takes. The training split
            gives too low a temperature: the network is most confident on the images it learnt from.
        target_precision: the precision the species and genus answers are chosen to reach; default
            0.95.
        batch_size: images per prediction batch.

    Returns:
        The calibration, also written to the run's calibration.json.

    Raises:
        InputError: naming `run` for an unknown run, `split` for a missing split, one without labels
            or with fewer than 2 images, `target_precision` outside its range in etc/config.yaml.
    """
    target_precision = option_specs("training")["target_precision"].check(target_precision)
    layout = runs.resolve_run(roots.models, run_id, field="run")
    images_dir = roots.data_path(layout.config().training.images_directory, "images_directory")
    return calibrate_layout(layout, images_dir, split, target_precision, batch_size)


def calibrate_layout(
    layout: runs.RunLayout, images_dir: Path, split: str, target_precision: float, batch_size: int = 32
) -> calibration.Calibration:
    """calibrate_run for a run folder: `split` names one of its splits or is a split file."""
    # The split is checked before the model loads: a mistake in it is reported in an instant.
    fitting = _labelled_split(layout, split, images_dir, len(layout.classes()))
    held_out = _held_out_split(layout, images_dir, len(layout.classes()), fitting.name)
    return calibrate_splits(
        layout,
        load_run(layout),
        fitting,
        held_out,
        target_precision=target_precision,
        batch_size=batch_size,
        trained_on=_training_images(layout, fitting, images_dir),
    )


def _training_images(layout: runs.RunLayout, split: Split, images_dir: Path) -> int:
    """How many images of `split` the run trained on (its train.txt lists them)."""
    train = layout.dataset_dir / "train.txt"
    if not train.is_file():
        return 0
    trained = {(images_dir / relative).resolve() for relative, _ in parse_split_file(train)}
    return sum(path in trained for path in split.paths)


def calibrate_splits(
    layout: runs.RunLayout,
    run: LoadedRun,
    fitting: Split,
    held_out: Split | None,
    *,
    target_precision: float,
    batch_size: int = 32,
    trained_on: int = 0,
) -> calibration.Calibration:
    """Fits the calibration of `run`, the final model of a run folder, complete or not (the
    training calibrates its run before marking it complete, so no request sees it uncalibrated),
    on `fitting`; reports it, and on `held_out` (labelled, or None) the honest figures. The run's
    index, where it has one (the training indexes its run first), adds the reference specimens,
    unless `fitting` holds `trained_on` > 0 of the run's training images (default 0): those are
    references of themselves, at distance 0, and would set the specimen threshold far too tight."""
    index = neighbours.load_index(layout.index_dir)
    if trained_on:
        _LOGGER.warning(
            "Calibrating run %s on %d of its training images (of %d): the temperature will be too "
            "low, and the reference specimens (the training images) are left out",
            layout.run_id,
            trained_on,
            len(fitting.paths),
        )
        index = None
    probabilities, evidence = _observed(run, fitting, index, batch_size)
    fitted = calibration.fit_calibration(
        probabilities, fitting.labels, run.classes, fitting.name, target_precision, evidence=evidence
    )
    fitted.save(layout)

    report = {**_report(fitted, probabilities, fitting, run), "training_images": trained_on}
    if held_out is not None and held_out.labels is not None and held_out.paths:
        held_out_probabilities, held_out_evidence = _observed(run, held_out, index, batch_size)
        report["held_out"] = calibration.evaluate_calibration(
            fitted,
            held_out_probabilities,
            held_out.labels,
            run.classes,
            held_out.name,
            evidence=held_out_evidence,
        )
    files.write_json(layout.reports_dir / REPORT_FILE, report)
    reports.plot_reliability(
        report["reliability_before"],
        report["reliability_after"],
        ece_before=fitted.ece_before,
        ece_after=fitted.ece_after,
        temperature=fitted.temperature,
        path=layout.reports_dir / DIAGRAM_FILE,
        title=f"Run {layout.run_id} on {fitting.name} ({fitted.images} images)",
    )
    _LOGGER.info(
        "Run %s calibrated on %s: T %.3f, NLL %.4f -> %.4f, ECE %.4f -> %.4f",
        layout.run_id,
        fitting.name,
        fitted.temperature,
        fitted.nll_before,
        fitted.nll_after,
        fitted.ece_before,
        fitted.ece_after,
    )
    return fitted


def _observed(
    run: LoadedRun, split: Split, index: neighbours.ReferenceIndex | None, batch_size: int
) -> tuple[np.ndarray, calibration.Evidence | None]:
    """The raw probabilities of `split`'s images and, with an index, what their reference specimens
    say, from one forward pass per image."""
    if index is None:
        return predict_split(run.model, split, run.config.image_size, batch_size), None
    embeddings, probabilities = neighbours.split_outputs(
        run.engine("keras"), split, run.config.image_size, batch_size
    )
    return probabilities, evidence_of(index, embeddings)


def evidence_of(index: neighbours.ReferenceIndex, embeddings: np.ndarray) -> calibration.Evidence:
    """What the reference specimens in `index` say of images with these embeddings."""
    voted, distances = neighbours.specimen_evidence(index, *index.search(embeddings, neighbours.EVIDENCE_K))
    return calibration.Evidence(voted, distances, neighbours.AGREEMENT_NEIGHBOURS, neighbours.KNN_RANK)


def _labelled_split(layout: runs.RunLayout, split: str, images_dir: Path, num_classes: int) -> Split:
    """The split named (one of the run's own) or given as a file, with labels and at least 2 images.

    Raises:
        InputError: naming `split`.
    """
    if split in (*SPLIT_NAMES, CALIBRATION_SPLIT):
        path, name = layout.dataset_dir / f"{split}.txt", split
        if not path.is_file():
            raise InputError("split", f"run {layout.run_id} has no {split!r} split ({path} is missing)")
    else:
        path, name = Path(split), Path(split).stem
        if not path.is_file():
            raise InputError("split", f"{split!r} is neither a split name {SPLIT_NAMES} nor a split file")
    found = datasets.readable(read_split(path, name, images_dir, num_classes, "split"))
    if found.labels is None:
        raise InputError(
            "split", f"the {name!r} split ({path}) has images without labels; calibration needs labels"
        )
    if len(found.paths) < 2:
        raise InputError(
            "split", f"the {name!r} split ({path}) has {len(found.paths)} image(s); calibration needs 2"
        )
    return found


def _held_out_split(
    layout: runs.RunLayout, images_dir: Path, num_classes: int, fitted_on: str
) -> Split | None:
    """The run's labelled test split, unless it is the one fitted on: where the report's honest
    figures come from. None when there is none."""
    path = layout.dataset_dir / f"{_HELD_OUT_SPLIT}.txt"
    if fitted_on == _HELD_OUT_SPLIT or not path.is_file():
        return None
    found = datasets.readable(read_split(path, _HELD_OUT_SPLIT, images_dir, num_classes, "split"))
    return found if found.labels is not None and found.paths else None


def _report(
    fitted: calibration.Calibration, probabilities: np.ndarray, split: Split, run: LoadedRun
) -> dict[str, Any]:
    """The report of a calibration on the split it was fitted on: the fit, and the reliability
    tables before and after the temperature."""
    calibrated = fitted.scale(probabilities)
    return {
        "run_id": run.run_id,
        "checkpoint": run.checkpoint,
        **fitted.to_dict(),
        "reliability_before": calibration.reliability_bins(probabilities, split.labels, fitted.ece_bins),
        "reliability_after": calibration.reliability_bins(calibrated, split.labels, fitted.ece_bins),
        "note": (
            "abstention is measured on the images the thresholds were chosen on, so it is optimistic; "
            "held_out (when present) is measured on the test split, which played no part in the fit"
        ),
    }
