"""Calibrated probabilities, a per-image decision (species, genus or unknown) and an out-of-distribution
score, all from softmax probabilities.

Every engine (Keras, TFLite, ONNX) outputs probabilities, not logits, so everything here works on
probabilities: temperature scaling is softmax(log(p) / T), which equals softmax(z / T) because
log p = z - logsumexp(z) differs from the logits z by a constant per image. A run's calibration is
fitted after training on a held-out split (`seeds-tf calibrate`, seeds_tf.learning.calibrate) and
kept in its calibration.json; a run without one answers uncalibrated.

A run with an index of its training images adds what its reference specimens say (Evidence): the
decision then also needs the nearest references to agree with the answer, and the distance to them
is a second out-of-distribution score.

NumPy only (SciPy for the one-dimensional search): the server imports this without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from seeds_tf.core import files, runs

_LOGGER = logging.getLogger(__name__)

ECE_BINS = 15
"""Equal-width bins of top-1 confidence for the expected calibration error, as in Guo et al. (2017),
"On Calibration of Modern Neural Networks"."""

TEMPERATURE_BOUNDS = (0.05, 20.0)
"""The temperatures searched: wide enough for any network trained with cross-entropy (typical fitted
values are 1 to 3), bounded so that a degenerate split (all correct, or all wrong) cannot send the
search to 0 or infinity."""

NEVER = 1.001
"""A threshold no probability reaches (probabilities are at most 1, plus rounding): the decision level
it guards is never answered, because no threshold reached the target precision."""

DECISIONS = ("species", "genus", "unknown")

OOD_SCORE_NAME = "normalized_entropy"
"""The out-of-distribution score ood_score computes, recorded with each calibration."""

_TINY = float(np.finfo(np.float32).tiny)
"""Probabilities are clipped here before the logarithm: the engines compute in float32, where a 0 means
"below float32's smallest normal number", so this is the largest value it can stand for."""


def scale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities: softmax(log(p) / temperature), row by row.

    Args:
        probabilities: softmax outputs, shape (n, num_classes) or (num_classes,).
        temperature: above 1 softens (less confident), below 1 sharpens. 1 returns the probabilities
            unchanged (as float64), so an uncalibrated run and T = 1 answer identically.

    Raises:
        ValueError: for a temperature that is not a positive finite number.
    """
    _check_temperature(temperature)
    p = np.asarray(probabilities, dtype=np.float64)
    if temperature == 1.0:
        return p.copy()
    return np.exp(_log_scaled(np.log(np.clip(p, _TINY, None)), temperature))


def fit_temperature(probabilities: np.ndarray, labels: Sequence[int]) -> float:
    """The temperature that minimises the negative log-likelihood of `labels` under the scaled
    probabilities, searched in TEMPERATURE_BOUNDS.

    The NLL is convex in 1 / T, hence unimodal in log T, where a bounded Brent search (SciPy) finds
    the minimum to about 1e-4 relative. Scaling by one T never changes an image's ranking of the
    classes: top-1 and top-5 accuracy stay as they are.

    Where every image's top-1 is right, the NLL falls as T does, down to the bound, which would
    sharpen every answer to near-certainty (a 55% answer shown as 98%): the split says nothing of
    how overconfident the network is, and T stays 1 (a warning says so).

    Args:
        probabilities: softmax outputs of held-out images, shape (n, num_classes), n >= 2.
        labels: their true label ids, shape (n,).

    Raises:
        ValueError: for shapes that disagree, fewer than 2 images, labels out of range, or
            probabilities that are not finite and non-negative.
    """
    p, y = _checked(probabilities, labels, minimum_images=2)
    if (p.argmax(axis=1) == y).all():
        _LOGGER.warning(
            "All %d images are answered right: they cannot tell how overconfident the network is, and "
            "the temperature stays 1; calibrate on a split with some mistakes (more images)",
            len(y),
        )
        return 1.0
    # Imported here: serving only scales and decides, and SciPy's optimizer costs a few hundred ms.
    from scipy.optimize import minimize_scalar

    log_p = np.log(np.clip(p, _TINY, None))
    rows = np.arange(len(y))

    def nll(log_temperature: float) -> float:
        return float(-_log_scaled(log_p, math.exp(log_temperature))[rows, y].mean())

    low, high = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    result = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    temperature = float(math.exp(result.x))
    if min(abs(result.x - low), abs(result.x - high)) < 0.01:
        _LOGGER.warning(
            "The temperature %.3g is at the edge of %s: the network answers at chance, or the %d "
            "images are (almost) all wrong",
            temperature,
            TEMPERATURE_BOUNDS,
            len(y),
        )
    return temperature


def negative_log_likelihood(probabilities: np.ndarray, labels: Sequence[int]) -> float:
    """The mean of -log p(true class); probabilities clipped at float32's smallest normal number
    (reports.evaluate's `log_loss` clips at 1e-7: the two differ only where p < 1e-7)."""
    p, y = _checked(probabilities, labels)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], _TINY, None)).mean())


def expected_calibration_error(
    probabilities: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS
) -> float:
    """The expected calibration error: sum over bins of (images in bin / images) * |accuracy - mean
    confidence| of the bin, where confidence is the top-1 probability and the `bins` (default ECE_BINS
    = 15) bins are equal-width on [0, 1], each holding (low, high] (the first also holds 0). 0 is
    perfect; an overconfident network scores its average excess of confidence over accuracy.

    Raises:
        ValueError: as fit_temperature, or for bins < 1.
    """
    table = reliability_bins(probabilities, labels, bins)
    total = sum(row["count"] for row in table)
    return float(
        sum(row["count"] / total * abs(row["accuracy"] - row["confidence"]) for row in table if row["count"])
    )


def reliability_bins(
    probabilities: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS
) -> list[dict[str, Any]]:
    """The reliability table behind the ECE and its diagram: per equal-width bin of top-1 confidence
    (see expected_calibration_error), {low, high, confidence (mean top-1 probability), accuracy
    (share of top-1 answers that are right), count}. Empty bins have count 0 and None for
    confidence and accuracy (JSON never holds NaN).

    Raises:
        ValueError: as fit_temperature, or for bins < 1.
    """
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"Expected a positive number of bins. Received: bins={bins!r}")
    p, y = _checked(probabilities, labels)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    table = []
    for index in range(bins):
        inside = which == index
        count = int(inside.sum())
        table.append(
            {
                "low": index / bins,
                "high": (index + 1) / bins,
                "confidence": float(confidence[inside].mean()) if count else None,
                "accuracy": float(correct[inside].mean()) if count else None,
                "count": count,
            }
        )
    return table


# The decision: species, genus or unknown.


def genus_index(classes: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """The genera of a run's classes and each class's genus: the one home of the genus rule.

    A class named "Genus species" belongs to the genus of its first word (a one-word or blank name
    is its own genus). Genera are in order of first appearance.

    Returns:
        (genus names, genus index of each class as an int64 array of len(classes)).
    """
    genus_of = [name.split()[0] if name.split() else name for name in classes]
    names = tuple(dict.fromkeys(genus_of))
    index = {genus: i for i, genus in enumerate(names)}
    return names, np.asarray([index[genus] for genus in genus_of], dtype=np.int64)


def genus_probabilities(probabilities: np.ndarray, genus_of_class: np.ndarray) -> np.ndarray:
    """The probability of each genus, the sum over its species: shape (n, genera) for (n, classes),
    or (genera,) for one vector."""
    p = np.asarray(probabilities, dtype=np.float64)
    genus_of_class = np.asarray(genus_of_class, dtype=np.int64)
    if p.shape[-1] != len(genus_of_class):
        raise ValueError(
            f"Expected one genus per class ({p.shape[-1]} classes). "
            f"Received: {len(genus_of_class)} genus indices"
        )
    membership = np.zeros((len(genus_of_class), int(genus_of_class.max()) + 1))
    membership[np.arange(len(genus_of_class)), genus_of_class] = 1.0
    return p @ membership


@dataclasses.dataclass(frozen=True, eq=False)
class Evidence:
    """What the reference specimens say of each of n images (neighbours.specimen_evidence).

    Attributes:
        neighbour_species: the majority species of each image's `neighbours` nearest references,
            int (n,).
        distances: each image's specimen distance, 1 - the cosine similarity of its
            `distance_rank`-th nearest reference, float (n,).
        neighbours: how many references voted.
        distance_rank: the rank whose similarity the distances are from.
    """

    neighbour_species: np.ndarray
    distances: np.ndarray
    neighbours: int
    distance_rank: int


@dataclasses.dataclass(frozen=True)
class Specimens:
    """How a run's decisions use its reference specimens, recorded with the thresholds chosen
    under that rule (see decide).

    Attributes:
        neighbours: the nearest references whose majority species must agree with an answer.
        distance_rank: the rank of the reference whose distance is the specimen distance.
        distance_threshold: the specimen distance above which an image is flagged as unlike the
            training images: ood_threshold of the distances of the images fitted on.
    """

    neighbours: int
    distance_rank: int
    distance_threshold: float

    @property
    def references_needed(self) -> int:
        """References per search that the rule takes its evidence from."""
        return max(self.neighbours, self.distance_rank)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The decision thresholds of a run, chosen on held-out images by choose_thresholds.

    Attributes:
        species: the least top-1 species probability answered as a species.
        genus: the least top-1 genus probability answered as a genus, for images below `species`.
        target_precision: the precision both were chosen to reach.
    Either is NEVER (above 1) when no threshold reached the target.
    """

    species: float
    genus: float
    target_precision: float


def choose_thresholds(
    probabilities: np.ndarray,
    labels: Sequence[int],
    genus_of_class: np.ndarray,
    target_precision: float = 0.95,
    neighbour_species: np.ndarray | None = None,
) -> Thresholds:
    """The thresholds that answer as many images as possible at `target_precision`.

    The species threshold is the lowest top-1 confidence at which the images answered (those at or
    above it) are right at least `target_precision` of the time; the genus threshold is the same on
    the genus level (top-1 genus probability, right when it is the true species' genus), over the
    images the species threshold leaves unanswered. A level where no threshold reaches the target
    gets NEVER. The precision is reached on these images by construction; on new images it is an
    estimate (a few dozen images make a noisy one): evaluate it on another split (abstention_report).
    With `neighbour_species`, both are chosen under decide's neighbour rule: only images whose
    references agree can be answered at a level, so the precision is that of the answers decide gives.

    Args:
        probabilities: (calibrated) softmax outputs of held-out images, shape (n, num_classes).
        labels: their true label ids.
        genus_of_class: genus index of each class (genus_index).
        target_precision: in (0, 1]; default 0.95: one wrong species answer in twenty.
        neighbour_species: the majority species of each image's nearest references (Evidence), or
            None (the default) to choose without them.

    Raises:
        ValueError: for a target outside (0, 1], or arguments as fit_temperature refuses them.
    """
    _check_target(target_precision)
    p, y = _checked(probabilities, labels)
    genus_of_class = _checked_genera(genus_of_class, p.shape[1])
    species_agree, genus_agree = _agreement(p, genus_of_class, neighbour_species)
    confidence = p.max(axis=1)
    right = p.argmax(axis=1) == y
    species = _lowest_threshold(confidence[species_agree], right[species_agree], target_precision)
    rest = ~(species_agree & (confidence >= species)) & genus_agree
    genus_p = genus_probabilities(p[rest], genus_of_class)
    genus_right = genus_p.argmax(axis=1) == genus_of_class[y[rest]]
    genus = _lowest_threshold(genus_p.max(axis=1), genus_right, target_precision)
    return Thresholds(species=species, genus=genus, target_precision=float(target_precision))


def decide(
    probabilities: np.ndarray,
    genus_of_class: np.ndarray,
    thresholds: Thresholds,
    neighbour_species: np.ndarray | None = None,
) -> np.ndarray:
    """The decision for each image: "species" when its top species probability reaches the species
    threshold, else "genus" when its top genus probability reaches the genus threshold, else
    "unknown". Shape (n,) for (n, classes), () for one vector.

    The neighbour rule, with `neighbour_species` (the majority species of each image's nearest
    references, shape (n,) or ()): "species" also needs that majority to be the top species, and
    "genus" needs it to be of the top genus. An image whose references name another species of the
    same genus is answered at most "genus"; one whose references name another genus, "unknown".
    """
    p = np.asarray(probabilities, dtype=np.float64)
    genus_p = genus_probabilities(p, genus_of_class)
    species_agree, genus_agree = _agreement(p, genus_of_class, neighbour_species)
    return np.where(
        species_agree & (p.max(axis=-1) >= thresholds.species),
        "species",
        np.where(genus_agree & (genus_p.max(axis=-1) >= thresholds.genus), "genus", "unknown"),
    )


def abstention_report(
    probabilities: np.ndarray,
    labels: Sequence[int],
    genus_of_class: np.ndarray,
    thresholds: Thresholds,
    neighbour_species: np.ndarray | None = None,
) -> dict[str, Any]:
    """How the decisions fare against the truth (decide's, with the neighbour rule when
    `neighbour_species` is given).

    Returns:
        {"images", "species_coverage" (share of images answered as a species), "species_precision"
        (share of those right), "genus_coverage", "genus_precision" (share of genus answers naming
        the true genus), "unknown_share", "target_precision"}; a precision is None where no image
        got that answer.
    """
    p, y = _checked(probabilities, labels)
    genus_of_class = _checked_genera(genus_of_class, p.shape[1])
    decisions = decide(p, genus_of_class, thresholds, neighbour_species)
    species = decisions == "species"
    genus = decisions == "genus"
    species_right = p.argmax(axis=1) == y
    genus_right = genus_probabilities(p, genus_of_class).argmax(axis=1) == genus_of_class[y]
    return {
        "images": len(y),
        "species_coverage": float(species.mean()),
        "species_precision": float(species_right[species].mean()) if species.any() else None,
        "genus_coverage": float(genus.mean()),
        "genus_precision": float(genus_right[genus].mean()) if genus.any() else None,
        "unknown_share": float((decisions == "unknown").mean()),
        "target_precision": thresholds.target_precision,
    }


# Out-of-distribution: how unlike the training images an image is.


def ood_score(probabilities: np.ndarray) -> np.ndarray:
    """The out-of-distribution score of each image: the entropy of its probabilities divided by
    log(num_classes), in [0, 1] (0: all on one class; 1: spread evenly over all); higher means less
    like the training images.

    Why this score: with probabilities only (no logits, so no energy score, and no features, so no
    distances), the candidates are the entropy and 1 - max p (max_softmax_score, the baseline of
    Hendrycks & Gimpel, 2017). They were compared on what matters here, species the run was not
    trained on: a small CNN trained on 12 of the 16 synthetic species (48 px, 150 images each,
    40 epochs; one species per genus held out), on temperature-scaled probabilities of 360
    familiar test images and 600 images of the 4 unknown species, over 3 seeds. Entropy was ahead
    every time: AUROC 0.745 / 0.728 / 0.782 against 0.729 / 0.716 / 0.771, FPR at 95% TPR 0.76 /
    0.73 / 0.60 against 0.80 / 0.73 / 0.68 (tests/test_calibration.py repeats a small version).
    It sees the whole distribution: a seed split between three species is less familiar than one
    split between two, at the same top probability. Dividing by log(num_classes) changes no
    ranking within a run; it makes the threshold read alike in runs of any number of classes.

    Neither score catches images unlike any seed: the same network was more confident on uniform
    noise than on seeds (AUROC 0.00 to 0.05 for both). That takes the image's features (the
    distance to the training images' embeddings), not its probabilities.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    return _entropy(p) / math.log(p.shape[-1])


def max_softmax_score(probabilities: np.ndarray) -> np.ndarray:
    """1 - the top-1 probability of each image: the alternative to ood_score, kept to compare the
    two (see ood_score)."""
    return 1.0 - np.asarray(probabilities, dtype=np.float64).max(axis=-1)


def ood_threshold(in_distribution_scores: np.ndarray, tpr: float = 0.95) -> float:
    """The score at or below which a share `tpr` (default 0.95) of in-distribution held-out images
    fall: images scoring above it are flagged as unlike the training images, and 1 - tpr of
    familiar ones are flagged too. The smallest such observed score (inverted-CDF quantile).

    Raises:
        ValueError: for no scores, scores that are not finite, or tpr outside (0, 1].
    """
    scores = _checked_scores(in_distribution_scores, "in_distribution_scores")
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"Expected 0 < tpr <= 1. Received: tpr={tpr!r}")
    return float(np.quantile(scores, tpr, method="inverted_cdf"))


def ood_metrics(in_scores: np.ndarray, out_scores: np.ndarray) -> dict[str, float]:
    """How well scores tell in-distribution images (the positives) from out-of-distribution ones.

    Returns:
        {"auroc": the probability that a random out-of-distribution image scores higher than a
        random in-distribution one, ties counting half (Mann-Whitney, by average ranks): 1.0 for
        separated scores, 0.5 for none; "fpr_at_95_tpr": the share of out-of-distribution images
        at or below ood_threshold(in_scores, 0.95), i.e. taken as familiar}.

    Raises:
        ValueError: for an empty or non-finite array of scores.
    """
    from scipy.stats import rankdata

    positives = _checked_scores(in_scores, "in_scores")
    negatives = _checked_scores(out_scores, "out_scores")
    ranks = rankdata(np.concatenate([negatives, positives]))  # average ranks: ties count half
    n_out, n_in = len(negatives), len(positives)
    auroc = (ranks[:n_out].sum() - n_out * (n_out + 1) / 2) / (n_out * n_in)
    threshold = ood_threshold(positives, 0.95)
    return {"auroc": float(auroc), "fpr_at_95_tpr": float(np.mean(negatives <= threshold))}


# A run's calibration.


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What a run needs to answer calibrated, and how well it was fitted; a run's calibration.json.

    Attributes:
        temperature: divides the log-probabilities (scale).
        fitted_on: the split it was fitted on ("val", or a split file's name).
        images: how many images that split has.
        nll_before, nll_after: negative log-likelihood on that split, before and after scaling.
        ece_before, ece_after: expected calibration error on that split, with ece_bins bins.
        ece_bins: the number of bins.
        thresholds: the decision thresholds, chosen on the calibrated probabilities.
        abstention: abstention_report on that split (optimistic: the thresholds were chosen there).
        ood_threshold: ood_score above which an image is flagged as unlike the training images.
        ood_score_name: which score ood_threshold is for (OOD_SCORE_NAME).
        specimens: how the decisions use the reference specimens, for a run calibrated with its
            index (the thresholds were then chosen under decide's neighbour rule); None without
            (calibration files written before specimens were used have none).
    """

    temperature: float
    fitted_on: str
    images: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    ece_bins: int
    thresholds: Thresholds
    abstention: dict[str, Any]
    ood_threshold: float
    ood_score_name: str = OOD_SCORE_NAME
    specimens: Specimens | None = None

    def scale(self, probabilities: np.ndarray) -> np.ndarray:
        """The probabilities scaled by this calibration's temperature."""
        return scale(probabilities, self.temperature)

    def out_of_distribution(self, calibrated: np.ndarray, distances: np.ndarray | None = None) -> np.ndarray:
        """Whether each image is flagged as unlike the training images: its ood_score (of the
        calibrated probabilities) is above ood_threshold, or its specimen distance (`distances`,
        where the run has specimens) is above theirs. Shape (n,) for (n, classes), () for one."""
        flagged = ood_score(calibrated) > self.ood_threshold
        if distances is not None and self.specimens is not None:
            flagged = flagged | (np.asarray(distances, dtype=np.float64) > self.specimens.distance_threshold)
        return flagged

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """The calibration written by to_dict.

        Raises:
            ValueError: when `data` is not one (a field missing or of the wrong kind).
        """
        try:
            fields = {
                field.name: data[field.name]
                for field in dataclasses.fields(cls)
                if field.default is dataclasses.MISSING or field.name in data
            }
            fields["thresholds"] = Thresholds(**fields["thresholds"])
            if fields.get("specimens") is not None:
                fields["specimens"] = Specimens(**fields["specimens"])
            calibration = cls(**fields)
            _check_temperature(calibration.temperature)
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"Expected a calibration as Calibration.to_dict writes it. Received: {error!r}"
            ) from None
        return calibration

    def save(self, layout: runs.RunLayout) -> None:
        """Writes the run's calibration.json, atomically."""
        files.write_json(layout.calibration_file, self.to_dict())


class UnreadableCalibration(ValueError):
    """A run's calibration.json that is not JSON or not a calibration: the run cannot answer as
    it was calibrated, whatever its model."""


def load_calibration(layout: runs.RunLayout) -> Calibration | None:
    """The run's calibration, or None when it has none (it answers uncalibrated).

    Raises:
        UnreadableCalibration: for a calibration.json that is not JSON or not a calibration.
    """
    if not layout.calibration_file.is_file():
        return None
    try:
        return Calibration.from_dict(files.read_json(layout.calibration_file))
    except ValueError as error:  # not JSON, not UTF-8, or not a calibration
        raise UnreadableCalibration(f"{layout.calibration_file.name} is unreadable: {error}") from None


def fit_calibration(
    probabilities: np.ndarray,
    labels: Sequence[int],
    classes: Sequence[str],
    split_name: str,
    target_precision: float = 0.95,
    *,
    evidence: Evidence | None = None,
) -> Calibration:
    """Fits a run's calibration on the softmax outputs of one held-out split: the temperature
    first, then the decision thresholds and the OOD threshold on the scaled probabilities, and
    with `evidence` the thresholds under the neighbour rule and the specimen distance threshold.

    Args:
        probabilities: softmax outputs, shape (n, len(classes)), n >= 2.
        labels: the true label ids.
        classes: the run's class names (for their genera).
        split_name: recorded as `fitted_on`.
        target_precision: for choose_thresholds; default 0.95.
        evidence: what the reference specimens say of these images (none of them may be a
            reference: the distances would be 0), or None (the default) for a run without index.

    Raises:
        ValueError: as fit_temperature and choose_thresholds, or for evidence of other images.
    """
    _check_target(target_precision)
    p, y = _checked(probabilities, labels, minimum_images=2)
    if p.shape[1] != len(classes):
        raise ValueError(f"Expected probabilities for {len(classes)} classes. Received: shape={p.shape}")
    _, genus_of_class = genus_index(classes)
    voted = _checked_evidence(evidence, len(y))
    temperature = fit_temperature(p, y)
    calibrated = scale(p, temperature)
    thresholds = choose_thresholds(calibrated, y, genus_of_class, target_precision, voted)
    return Calibration(
        temperature=temperature,
        fitted_on=split_name,
        images=len(y),
        nll_before=negative_log_likelihood(p, y),
        nll_after=negative_log_likelihood(calibrated, y),
        ece_before=expected_calibration_error(p, y),
        ece_after=expected_calibration_error(calibrated, y),
        ece_bins=ECE_BINS,
        thresholds=thresholds,
        abstention=abstention_report(calibrated, y, genus_of_class, thresholds, voted),
        ood_threshold=ood_threshold(ood_score(calibrated)),
        specimens=None
        if evidence is None
        else Specimens(evidence.neighbours, evidence.distance_rank, ood_threshold(evidence.distances)),
    )


def evaluate_calibration(
    calibration: Calibration,
    probabilities: np.ndarray,
    labels: Sequence[int],
    classes: Sequence[str],
    split_name: str,
    *,
    evidence: Evidence | None = None,
) -> dict[str, Any]:
    """The honest figures of a calibration: on a split it was not fitted on, the NLL and ECE before
    and after scaling, the abstention report with its thresholds, and the share of these familiar
    images that the OOD flag flags (about 5% per score when it generalises). With `evidence` of
    these images, for a calibration with specimens, the abstention follows the neighbour rule and
    the flag takes the specimen distance too.

    Raises:
        ValueError: as negative_log_likelihood.
    """
    p, y = _checked(probabilities, labels)
    _, genus_of_class = genus_index(classes)
    calibrated = calibration.scale(p)
    used = evidence if calibration.specimens is not None else None
    voted = _checked_evidence(used, len(y))
    distances = None if used is None else used.distances
    return {
        "split": split_name,
        "images": len(y),
        "nll_before": negative_log_likelihood(p, y),
        "nll_after": negative_log_likelihood(calibrated, y),
        "ece_before": expected_calibration_error(p, y, calibration.ece_bins),
        "ece_after": expected_calibration_error(calibrated, y, calibration.ece_bins),
        "abstention": abstention_report(calibrated, y, genus_of_class, calibration.thresholds, voted),
        "ood_flagged_share": float(np.mean(calibration.out_of_distribution(calibrated, distances))),
    }


def _agreement(
    p: np.ndarray, genus_of_class: np.ndarray, neighbour_species: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Whether the nearest references agree with each image's top species, and with its top genus
    (all True without `neighbour_species`), shaped as p's rows."""
    if neighbour_species is None:
        agree = np.ones(p.shape[:-1], dtype=bool)
        return agree, agree
    voted = np.asarray(neighbour_species, dtype=np.int64)
    genus_of_class = np.asarray(genus_of_class, dtype=np.int64)
    if voted.shape != p.shape[:-1] or (voted < 0).any() or (voted >= p.shape[-1]).any():
        raise ValueError(
            f"Expected one species id below {p.shape[-1]} per image {p.shape[:-1]}. "
            f"Received: neighbour_species={voted!r}"
        )
    top_genus = genus_probabilities(p, genus_of_class).argmax(axis=-1)
    return voted == p.argmax(axis=-1), genus_of_class[voted] == top_genus


def _checked_evidence(evidence: Evidence | None, images: int) -> np.ndarray | None:
    """The neighbour species of `evidence` (None without), after checking it covers `images` images."""
    if evidence is None:
        return None
    shapes = (np.shape(evidence.neighbour_species), np.shape(evidence.distances))
    if shapes != ((images,), (images,)):
        raise ValueError(
            f"Expected evidence of {images} images. "
            f"Received: neighbour_species and distances of shapes {shapes}"
        )
    return np.asarray(evidence.neighbour_species, dtype=np.int64)


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats along the last axis; 0 log 0 counts as 0."""
    return -(p * np.log(np.clip(p, _TINY, None))).sum(axis=-1)


def _log_scaled(log_p: np.ndarray, temperature: float) -> np.ndarray:
    """log softmax(log_p / temperature) along the last axis, stable."""
    z = log_p / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _lowest_threshold(confidence: np.ndarray, right: np.ndarray, target: float) -> float:
    """The lowest confidence c such that the images with confidence >= c are right at least
    `target` of the time; NEVER when there is none (or no image)."""
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence = confidence[order]
    precision = np.cumsum(right[order]) / np.arange(1, len(order) + 1)
    # A threshold accepts every image of its value: only the last position of a run of ties counts.
    last_of_value = np.append(sorted_confidence[1:] != sorted_confidence[:-1], True)
    reaching = np.flatnonzero(last_of_value & (precision >= target - 1e-12))
    return float(sorted_confidence[reaching[-1]]) if len(reaching) else NEVER


def _checked(
    probabilities: np.ndarray, labels: Sequence[int], minimum_images: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The probabilities and labels as float64 and int64 arrays, or a ValueError saying what is wrong."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"Expected probabilities of shape (images, classes >= 2). Received: shape={p.shape}")
    if y.ndim != 1 or len(y) != len(p):
        raise ValueError(
            f"Expected one label per row of probabilities ({len(p)}). Received: labels of shape={y.shape}"
        )
    if len(y) < minimum_images:
        raise ValueError(f"Expected at least {minimum_images} images. Received: {len(y)}")
    if len(y) and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"Expected integer label ids. Received: dtype={y.dtype}")
    outside = (y < 0) | (y >= p.shape[1])
    if outside.any():
        raise ValueError(
            f"Expected label ids in 0..{p.shape[1] - 1}. Received: {int(y[outside][0])} "
            f"at position {int(np.flatnonzero(outside)[0])}"
        )
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError(
            "Expected finite, non-negative probabilities. Received: NaN, infinity or a negative value"
        )
    return p, y.astype(np.int64)


def _checked_genera(genus_of_class: np.ndarray, num_classes: int) -> np.ndarray:
    genera = np.asarray(genus_of_class)
    if genera.shape != (num_classes,) or not np.issubdtype(genera.dtype, np.integer) or (genera < 0).any():
        raise ValueError(
            f"Expected a non-negative genus index per class ({num_classes}). "
            f"Received: genus_of_class={genera!r}"
        )
    return genera.astype(np.int64)


def _checked_scores(scores: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError(
            f"Expected a non-empty array of finite scores. Received: {name} of {values.size} values"
        )
    return values


def _check_temperature(temperature: float) -> None:
    # numbers.Real: NumPy scalars (a float32 from an engine) are temperatures too; bool is not.
    real = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
    if not real or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"Expected a positive finite temperature. Received: temperature={temperature!r}")


def _check_target(target_precision: float) -> None:
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(
            f"Expected 0 < target_precision <= 1. Received: target_precision={target_precision!r}"
        )
