"""How far a run's answers can be trusted on images it was not trained on: how well its
out-of-distribution score tells unseen images (species never trained, photos without a seed) from
the test images of its own classes, and whether the reference specimens agree with the classifier.

The test split is the in-distribution side: it played no part in training or calibration.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from seeds_tf.core import files, runs
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import Roots
from seeds_tf.data.datasets import IMAGE_EXTENSIONS
from seeds_tf.data.pipeline import images_only, make_dataset
from seeds_tf.data.splits import Split, read_split
from seeds_tf.learning.evaluation import predict_split
from seeds_tf.prediction import calibration, neighbours
from seeds_tf.prediction.inference import LoadedRun, load_run

_LOGGER = logging.getLogger(__name__)

REPORT_FILE = "trust.json"
AGREEMENT_NEIGHBOURS = 5
"""Reference specimens whose majority species is compared with the classifier's answer."""
KNN_RANK = 5
"""The rank of the training image whose distance scores how unfamiliar an image is (measured on the
demo: the 5th nearest told unseen images apart better than the 1st)."""


def evaluate_trust(
    roots: Roots, run_id: str, unseen: Mapping[str, Path], batch_size: int = 32
) -> dict[str, Any]:
    """Measures a complete run on its test split against folders of unseen images and writes
    `reports/trust.json`.

    Args:
        roots: where the run and its images are.
        run_id: the run.
        unseen: a name (e.g. "unseen species", "not seeds") for each folder of images unlike the
            run's classes (searched recursively); may be empty.
        batch_size: images per prediction batch.

    Returns:
        The report: for each unseen folder, the AUROC and the false-positive rate at 95% true-positive
        rate of the OOD score, before and after the run's temperature, and the share the run's OOD
        threshold flags; and the agreement of the reference specimens with the classifier (when the
        run has an index).

    Raises:
        InputError: naming `run` for a run without a labelled test split, `unseen` for a folder
            without images.
    """
    layout = runs.resolve_run(roots.models, run_id, field="run")
    images_dir = roots.data_path(layout.config().training.images_directory, "images_directory")
    run = load_run(layout)
    test_file = layout.dataset_dir / "test.txt"
    if not test_file.is_file():
        raise InputError("run", f"run {layout.run_id} has no test split to measure against")
    test = read_split(test_file, "test", images_dir, len(run.classes), "run")
    if test.labels is None or len(test.paths) < 2:
        raise InputError("run", f"run {layout.run_id}'s test split needs at least 2 labelled images")
    raw = predict_split(run.model, test, run.config.image_size, batch_size)
    index = neighbours.load_index(run.index_dir) if run.index_dir else None
    test_embeddings = _embeddings(run, test, batch_size) if index is not None else None
    report: dict[str, Any] = {
        "run_id": layout.run_id,
        "in_distribution": {"split": "test", "images": len(test.paths)},
        "ood_score": calibration.OOD_SCORE_NAME,
        "calibrated": run.calibration is not None,
        "unseen": {
            name: _unseen_figures(
                run,
                raw,
                _unseen_split(name, folder),
                batch_size,
                index=index,
                test_embeddings=test_embeddings,
            )
            for name, folder in unseen.items()
        },
        "neighbour_agreement": _agreement(run, test, raw, index, test_embeddings),
    }
    files.write_json(layout.reports_dir / REPORT_FILE, report)
    _LOGGER.info("Run %s: trust report in %s", layout.run_id, layout.reports_dir / REPORT_FILE)
    return report


def _unseen_split(name: str, folder: Path) -> Split:
    paths = sorted(
        path for path in Path(folder).rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not paths:
        raise InputError("unseen", f"{name}: no images in {folder}")
    return Split(name, tuple(paths), None)


def _embeddings(run: LoadedRun, split: Split, batch_size: int) -> np.ndarray:
    batches = images_only(make_dataset(split, run.config.image_size, batch_size, len(run.classes)))
    return np.asarray(neighbours.feature_model(run.model).predict(batches, verbose=0), dtype=np.float32)


def _specimen_distance(index: neighbours.ReferenceIndex, embeddings: np.ndarray) -> np.ndarray:
    """1 - the cosine similarity of the KNN_RANK-th most similar training image (the deep nearest
    neighbour score of Sun et al., 2022): a distance in feature space, which sees what the
    probabilities cannot, such as a photo of no seed that the network is sure about."""
    _, similarities = index.search(embeddings, KNN_RANK)
    return 1.0 - similarities[:, -1].astype(np.float64)


def _unseen_figures(
    run: LoadedRun,
    test_raw: np.ndarray,
    split: Split,
    batch_size: int,
    *,
    index: neighbours.ReferenceIndex | None,
    test_embeddings: np.ndarray | None,
) -> dict[str, Any]:
    """OOD detection of `split` against the test images, by the run's OOD score before and after
    the temperature, and by the distance to the reference specimens where the run has an index."""
    raw = predict_split(run.model, split, run.config.image_size, batch_size)
    figures: dict[str, Any] = {
        "images": len(split.paths),
        "before": calibration.ood_metrics(calibration.ood_score(test_raw), calibration.ood_score(raw)),
    }
    if run.calibration is not None:
        test_scores = calibration.ood_score(run.calibration.scale(test_raw))
        scores = calibration.ood_score(run.calibration.scale(raw))
        figures["after"] = calibration.ood_metrics(test_scores, scores)
        figures["flagged_share"] = float(np.mean(scores > run.calibration.ood_threshold))
        figures["test_flagged_share"] = float(np.mean(test_scores > run.calibration.ood_threshold))
    if index is not None and test_embeddings is not None:
        figures[f"specimen_distance_k{KNN_RANK}"] = calibration.ood_metrics(
            _specimen_distance(index, test_embeddings),
            _specimen_distance(index, _embeddings(run, split, batch_size)),
        )
    return figures


def _agreement(
    run: LoadedRun,
    test: Split,
    raw: np.ndarray,
    index: neighbours.ReferenceIndex | None,
    embeddings: np.ndarray | None,
) -> dict[str, Any] | None:
    """Whether the majority species of each test image's reference specimens agrees with the
    classifier's top-1, and how precise the classifier is where they agree and where they do not:
    a second signal for the decision is worth using only if the two precisions differ."""
    if index is None or embeddings is None:
        return None
    found, _ = index.search(embeddings, AGREEMENT_NEIGHBOURS)
    majority = np.asarray([np.bincount(index.labels[row]).argmax() for row in found])
    probabilities = run.calibration.scale(raw) if run.calibration else raw
    top1 = probabilities.argmax(axis=1)
    right = top1 == np.asarray(test.labels)
    agree = majority == top1
    figures: dict[str, Any] = {
        "neighbours": AGREEMENT_NEIGHBOURS,
        "images": len(right),
        "agreement_share": float(agree.mean()),
        "top1_precision_where_agreeing": float(right[agree].mean()) if agree.any() else None,
        "top1_precision_where_disagreeing": float(right[~agree].mean()) if (~agree).any() else None,
        "neighbour_majority_top1": float(np.mean(majority == np.asarray(test.labels))),
    }
    if run.calibration is not None:
        _, genus_of_class = calibration.genus_index(run.classes)
        species = calibration.decide(probabilities, genus_of_class, run.calibration.thresholds) == "species"
        both = species & agree
        figures["species_answers"] = {
            "coverage": float(species.mean()),
            "precision": float(right[species].mean()) if species.any() else None,
            "coverage_if_neighbours_must_agree": float(both.mean()),
            "precision_if_neighbours_must_agree": float(right[both].mean()) if both.any() else None,
        }
    return figures
