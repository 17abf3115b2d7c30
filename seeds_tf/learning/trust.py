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
from seeds_tf.data import datasets, images
from seeds_tf.data.splits import Split, read_split
from seeds_tf.learning.calibrate import evidence_of
from seeds_tf.learning.evaluation import predict_split
from seeds_tf.prediction import calibration, neighbours
from seeds_tf.prediction.inference import LoadedRun, load_run
from seeds_tf.prediction.neighbours import AGREEMENT_NEIGHBOURS, KNN_RANK

_LOGGER = logging.getLogger(__name__)

REPORT_FILE = "trust.json"


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
        threshold flags; with an index, the same for the specimen distance, and for the flag answers
        give (either score past its threshold, where the calibration has specimens); and the
        agreement of the reference specimens with the classifier, with the species answers with and
        without the neighbour rule.

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
    test = datasets.readable(read_split(test_file, "test", images_dir, len(run.classes), "run"))
    if test.labels is None or len(test.paths) < 2:
        raise InputError("run", f"run {layout.run_id}'s test split needs at least 2 labelled images")
    index = run.reference_index()
    raw, test_evidence = _observed(run, test, index, batch_size)
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
                test_evidence=test_evidence,
            )
            for name, folder in unseen.items()
        },
        "neighbour_agreement": _agreement(run, test, raw, test_evidence),
    }
    files.write_json(layout.reports_dir / REPORT_FILE, report)
    _LOGGER.info("Run %s: trust report in %s", layout.run_id, layout.reports_dir / REPORT_FILE)
    return report


def _unseen_split(name: str, folder: Path) -> Split:
    paths = sorted(
        path for path in images.files_under(Path(folder)) if images.is_image_name(path) and path.is_file()
    )
    if not paths:
        raise InputError("unseen", f"{name}: no images in {folder}")
    return Split(name, tuple(paths), None)


def _observed(
    run: LoadedRun, split: Split, index: neighbours.ReferenceIndex | None, batch_size: int
) -> tuple[np.ndarray, calibration.Evidence | None]:
    """The raw probabilities of `split` and, with an index, what the reference specimens say of
    its images: the specimen distance (1 - the cosine similarity of the KNN_RANK-th most similar
    training image, the deep nearest neighbour score of Sun et al., 2022, which sees what the
    probabilities cannot, such as a photo of no seed that the network is sure about) and the
    majority species of the AGREEMENT_NEIGHBOURS nearest."""
    if index is None:
        return predict_split(run.model, split, run.config.image_size, batch_size), None
    embeddings, probabilities = neighbours.split_outputs(
        run.engine("keras"), split, run.config.image_size, batch_size
    )
    return probabilities, evidence_of(index, embeddings)


def _unseen_figures(
    run: LoadedRun,
    test_raw: np.ndarray,
    split: Split,
    batch_size: int,
    *,
    index: neighbours.ReferenceIndex | None,
    test_evidence: calibration.Evidence | None,
) -> dict[str, Any]:
    """OOD detection of `split` against the test images, by the run's OOD score before and after
    the temperature, by the distance to the reference specimens where the run has an index, and
    by the flag the answers give (its AUROC is that of a yes/no score: the mean of the shares of
    unseen images flagged and of test images not flagged)."""
    raw, evidence = _observed(run, split, index, batch_size)
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
    if evidence is not None and test_evidence is not None:
        figures[f"specimen_distance_k{KNN_RANK}"] = calibration.ood_metrics(
            test_evidence.distances, evidence.distances
        )
        if run.calibration is not None and run.calibration.specimens is not None:
            test_flags = run.calibration.out_of_distribution(
                run.calibration.scale(test_raw), test_evidence.distances
            )
            flags = run.calibration.out_of_distribution(run.calibration.scale(raw), evidence.distances)
            figures["combined_flag"] = {
                "auroc": calibration.ood_metrics(test_flags, flags)["auroc"],
                "flagged_share": float(np.mean(flags)),
                "test_flagged_share": float(np.mean(test_flags)),
            }
    return figures


def _agreement(
    run: LoadedRun, test: Split, raw: np.ndarray, evidence: calibration.Evidence | None
) -> dict[str, Any] | None:
    """Whether the majority species of each test image's reference specimens agrees with the
    classifier's top-1, and how precise the classifier is where they agree and where they do not:
    a second signal for the decision is worth using only if the two precisions differ. With a
    calibration, the species answers (coverage, precision) as the run gives them: under the
    neighbour rule where its calibration has specimens (its thresholds were chosen under it)."""
    if evidence is None:
        return None
    majority = evidence.neighbour_species
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
        voted = majority if run.calibration.specimens is not None else None
        species = (
            calibration.decide(probabilities, genus_of_class, run.calibration.thresholds, voted) == "species"
        )
        both = species & agree
        figures["species_answers"] = {
            "neighbour_rule": voted is not None,
            "coverage": float(species.mean()),
            "precision": float(right[species].mean()) if species.any() else None,
            "coverage_if_neighbours_must_agree": float(both.mean()),
            "precision_if_neighbours_must_agree": float(right[both].mean()) if both.any() else None,
        }
    return figures
