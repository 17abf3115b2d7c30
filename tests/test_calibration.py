"""Calibration: temperature scaling, the species/genus/unknown decision, the OOD score, a run's
calibration.json and `calibrate_run` on the session's tiny run."""

from __future__ import annotations

import json

import keras
import numpy as np
import PIL.Image
import pytest

from seeds_tf.core import runs
from seeds_tf.core.errors import InputError
from seeds_tf.data import splits
from seeds_tf.learning.calibrate import DIAGRAM_FILE, REPORT_FILE, calibrate_run
from seeds_tf.prediction import calibration

# Species of two genera: the decision's genus level has something to sum.
CLASSES = ("Lens culinaris", "Lens orientalis", "Lens nigricans", "Triticum durum", "Triticum spelta", "Zea")


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _calibrated_sample(
    images: int, classes: int = len(CLASSES), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from the softmax of those logits: probabilities that are perfectly
    calibrated by construction (each label is a draw from its own probability vector)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (images, classes))
    probabilities = _softmax(logits)
    labels = np.array([rng.choice(classes, p=row) for row in probabilities])
    return logits, labels


def _top_k(probabilities: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-probabilities, axis=1, kind="stable")[:, :k]


# Temperature scaling.


def test_scale_is_softmax_of_the_logits_divided_by_t_and_t1_is_the_identity():
    logits, _ = _calibrated_sample(50)
    probabilities = _softmax(logits)
    for temperature in (0.5, 2.0, 7.0):
        np.testing.assert_allclose(
            calibration.scale(probabilities, temperature), _softmax(logits / temperature), atol=1e-12
        )
    np.testing.assert_array_equal(calibration.scale(probabilities, 1.0), probabilities)
    # A float32 output of exactly 0 stays finite and the rows sum to 1.
    saturated = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    softened = calibration.scale(saturated, 20.0)
    assert np.isfinite(softened).all() and softened.sum() == pytest.approx(1.0) and softened[0, 1] > 0
    np.testing.assert_allclose(
        calibration.scale(probabilities, np.float32(2.0)), _softmax(logits / 2), atol=1e-12
    )
    with pytest.raises(ValueError, match="Received: temperature=0"):
        calibration.scale(probabilities, 0)


def test_the_fitted_temperature_lowers_held_out_nll_and_keeps_the_ranking():
    """Overconfident probabilities (the calibrated logits times 5): T is fitted on one half and
    judged on the other, which took no part in the fit."""
    logits, labels = _calibrated_sample(2400)
    overconfident = _softmax(5.0 * logits)
    fit, held_out = slice(0, 1200), slice(1200, None)
    temperature = calibration.fit_temperature(overconfident[fit], labels[fit])
    assert temperature == pytest.approx(5.0, rel=0.1)
    scaled = calibration.scale(overconfident[held_out], temperature)
    before = calibration.negative_log_likelihood(overconfident[held_out], labels[held_out])
    after = calibration.negative_log_likelihood(scaled, labels[held_out])
    assert after < 0.6 * before
    assert calibration.expected_calibration_error(scaled, labels[held_out]) < 0.05
    for k in (1, 5):
        np.testing.assert_array_equal(_top_k(scaled, k), _top_k(overconfident[held_out], k))


def test_a_split_answered_all_right_leaves_the_temperature_at_one():
    """With no mistake the NLL falls all the way to the bound (T = 0.05), which showed a 55% answer
    as 98%: such a split cannot tell the temperature."""
    top = np.linspace(0.5, 0.95, 20)
    probabilities = np.stack([top, (1 - top) * 0.6, (1 - top) * 0.4], axis=1)
    assert calibration.fit_temperature(probabilities, np.zeros(20, dtype=int)) == 1.0
    one_wrong = np.zeros(20, dtype=int)
    one_wrong[0] = 1
    # One mistake, on the least sure image: these probabilities are underconfident, and sharpened.
    assert 0.1 < calibration.fit_temperature(probabilities, one_wrong) < 1.0


def test_fit_temperature_checks_its_arguments():
    probabilities = np.full((3, 4), 0.25)
    with pytest.raises(ValueError, match=r"one label per row of probabilities \(3\).*shape=\(2,\)"):
        calibration.fit_temperature(probabilities, [0, 1])
    with pytest.raises(ValueError, match=r"label ids in 0\.\.3\. Received: 4 at position 2"):
        calibration.fit_temperature(probabilities, [0, 1, 4])
    with pytest.raises(ValueError, match=r"at least 2 images\. Received: 1"):
        calibration.fit_temperature(probabilities[:1], [0])
    with pytest.raises(ValueError, match="classes >= 2"):
        calibration.fit_temperature(np.ones((3,)), [0, 0, 0])


def test_ece_is_near_zero_when_calibrated_and_high_when_overconfident():
    logits, labels = _calibrated_sample(4000, seed=1)
    assert calibration.expected_calibration_error(_softmax(logits), labels) < 0.03
    assert calibration.expected_calibration_error(_softmax(5.0 * logits), labels) > 0.15
    table = calibration.reliability_bins(_softmax(logits), labels, calibration.ECE_BINS)
    assert len(table) == 15 and sum(row["count"] for row in table) == 4000
    assert table[0] == {"low": 0.0, "high": 1 / 15, "confidence": None, "accuracy": None, "count": 0}
    # ECE by hand: one bin (0.8, 0.867] holding 0.85 and 0.85, one right, one wrong.
    two = np.array([[0.85, 0.15], [0.85, 0.15]])
    assert calibration.expected_calibration_error(two, [0, 1]) == pytest.approx(0.35)


# The decision.


def test_genus_index_takes_the_first_word():
    names, genus_of_class = calibration.genus_index(CLASSES)
    assert names == ("Lens", "Triticum", "Zea")
    assert genus_of_class.tolist() == [0, 0, 0, 1, 1, 2]
    probabilities = np.array([[0.1, 0.2, 0.3, 0.15, 0.05, 0.2]])
    np.testing.assert_allclose(
        calibration.genus_probabilities(probabilities, genus_of_class), [[0.6, 0.2, 0.2]]
    )


def test_decide_returns_the_three_kinds():
    _, genus_of_class = calibration.genus_index(CLASSES)
    thresholds = calibration.Thresholds(species=0.8, genus=0.8, target_precision=0.95)
    probabilities = np.array(
        [
            [0.9, 0.02, 0.02, 0.02, 0.02, 0.02],  # sure of the species
            [0.45, 0.4, 0.05, 0.05, 0.03, 0.02],  # a Lens, not sure which
            [0.2, 0.2, 0.1, 0.2, 0.2, 0.1],  # nothing
        ]
    )
    assert calibration.decide(probabilities, genus_of_class, thresholds).tolist() == [
        "species",
        "genus",
        "unknown",
    ]
    assert calibration.decide(probabilities[0], genus_of_class, thresholds) == "species"


def test_thresholds_reach_the_target_precision_on_the_images_they_were_chosen_on():
    logits, labels = _calibrated_sample(3000, seed=2)
    probabilities = _softmax(logits)
    _, genus_of_class = calibration.genus_index(CLASSES)
    thresholds = calibration.choose_thresholds(probabilities, labels, genus_of_class, target_precision=0.9)
    report = calibration.abstention_report(probabilities, labels, genus_of_class, thresholds)
    assert report["species_precision"] >= 0.9 and report["genus_precision"] >= 0.9
    assert 0 < report["species_coverage"] < 1 and report["genus_coverage"] > 0 and report["unknown_share"] > 0
    total = report["species_coverage"] + report["genus_coverage"] + report["unknown_share"]
    assert total == pytest.approx(1.0)
    # The lowest such threshold: one step lower on the species level misses the target.
    confidence = probabilities.max(axis=1)
    below = confidence < thresholds.species
    lower = confidence[below].max()
    accepted = confidence >= lower
    assert (probabilities.argmax(axis=1) == labels)[accepted].mean() < 0.9
    decisions = calibration.decide(probabilities, genus_of_class, thresholds)
    assert set(decisions.tolist()) == set(calibration.DECISIONS)


def test_a_level_that_never_reaches_the_target_is_never_answered():
    probabilities = np.tile([0.7, 0.1, 0.1, 0.05, 0.05, 0.0], (4, 1))
    labels = [3, 3, 4, 5]  # the top species and its genus are always wrong
    _, genus_of_class = calibration.genus_index(CLASSES)
    thresholds = calibration.choose_thresholds(probabilities, labels, genus_of_class)
    assert thresholds.species == thresholds.genus == calibration.NEVER > 1
    report = calibration.abstention_report(probabilities, labels, genus_of_class, thresholds)
    assert report["unknown_share"] == 1.0 and report["species_precision"] is None


# Out-of-distribution.


def test_ood_metrics_of_separated_and_identical_scores():
    rng = np.random.default_rng(3)
    familiar = rng.uniform(0.0, 0.4, 200)
    assert calibration.ood_metrics(familiar, rng.uniform(0.5, 1.0, 100)) == {
        "auroc": 1.0,
        "fpr_at_95_tpr": 0.0,
    }
    identical = calibration.ood_metrics(familiar, familiar.copy())
    assert identical["auroc"] == 0.5 and identical["fpr_at_95_tpr"] == pytest.approx(0.95)
    assert calibration.ood_metrics(familiar, familiar - 1.0)["auroc"] == 0.0
    np.testing.assert_allclose(
        calibration.ood_score(np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])), [0.0, 1.0]
    )
    threshold = calibration.ood_threshold(familiar, 0.95)
    assert np.mean(familiar <= threshold) >= 0.95 > np.mean(familiar < threshold)


def test_the_ood_score_tells_unknown_classes_apart_at_least_as_well_as_max_softmax():
    """The comparison behind ood_score's choice, small: a real Keras network trained on 4 of 6
    Gaussian classes in 8 dimensions; the 2 others are the unknown species."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(4)
    centres = rng.normal(0.0, 1.6, (6, 8))

    def sample(classes, per_class):
        points = np.concatenate([rng.normal(centres[c], 1.0, (per_class, 8)) for c in classes])
        return points.astype(np.float32), np.repeat(np.arange(len(classes)), per_class)

    known, unknown = [0, 1, 2, 3], [4, 5]
    train_x, train_y = sample(known, 150)
    val_x, val_y = sample(known, 100)
    test_x, _ = sample(known, 100)
    unknown_x, _ = sample(unknown, 150)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    model.compile(keras.optimizers.Adam(0.02), "sparse_categorical_crossentropy")
    model.fit(train_x, train_y, epochs=40, batch_size=len(train_x), verbose=0)
    temperature = calibration.fit_temperature(model.predict_on_batch(val_x), val_y)
    familiar, strange = (
        calibration.scale(model.predict_on_batch(x), temperature) for x in (test_x, unknown_x)
    )
    chosen = calibration.ood_metrics(calibration.ood_score(familiar), calibration.ood_score(strange))
    alternative = calibration.ood_metrics(
        calibration.max_softmax_score(familiar), calibration.max_softmax_score(strange)
    )
    print(f"T {temperature:.3f}; entropy {chosen}; max-softmax {alternative}")
    assert chosen["auroc"] > 0.85 and alternative["auroc"] > 0.85
    assert chosen["auroc"] >= alternative["auroc"] - 0.01


# A run's calibration.


def test_a_calibration_round_trips_through_calibration_json(tmp_path):
    logits, labels = _calibrated_sample(400, seed=5)
    fitted = calibration.fit_calibration(_softmax(3.0 * logits), labels, CLASSES, "val", target_precision=0.9)
    assert fitted.nll_after < fitted.nll_before and fitted.ece_after < fitted.ece_before
    assert fitted.temperature == pytest.approx(3.0, rel=0.25) and fitted.images == 400
    layout = runs.RunLayout(tmp_path / "2024-01-01_000000")
    assert calibration.load_calibration(layout) is None
    fitted.save(layout)
    assert calibration.load_calibration(layout) == fitted
    layout.calibration_file.write_text(json.dumps({"temperature": 2.0}))
    with pytest.raises(ValueError, match="Expected a calibration"):
        calibration.load_calibration(layout)


def test_calibrate_run_writes_the_calibration_the_report_and_the_diagram(roots, tiny_run, caplog):
    fitted = calibrate_run(roots, tiny_run, target_precision=0.9)
    layout = runs.RunLayout(roots.models / tiny_run)
    assert calibration.load_calibration(layout) == fitted
    assert fitted.fitted_on == "val" and fitted.images == 16
    assert fitted.specimens is not None  # the run's reference specimens set their threshold
    report = json.loads((layout.reports_dir / REPORT_FILE).read_text())
    assert report["temperature"] == fitted.temperature and len(report["reliability_after"]) == 15
    assert report["training_images"] == 0
    assert report["held_out"]["split"] == "test" and report["held_out"]["images"] == 16
    with PIL.Image.open(layout.reports_dir / DIAGRAM_FILE) as diagram:
        diagram.verify()
        assert diagram.format == "PNG"

    # A split file with training images: each is its own reference at distance 0, which set the
    # specimen threshold far too tight; they are counted and the references left out, as for "train".
    (roots.data / "elsewhere").mkdir()
    mixed = roots.data / "elsewhere" / "mixed.txt"
    trained = (layout.dataset_dir / "train.txt").read_text().splitlines()[:3]
    mixed.write_text("\n".join([*trained, *(layout.dataset_dir / "val.txt").read_text().splitlines()]))
    with caplog.at_level("WARNING", logger="seeds_tf.learning.calibrate"):
        fitted = calibrate_run(roots, tiny_run, split=str(mixed))
    assert fitted.specimens is None and fitted.images == 19
    assert "on 3 of its training images (of 19)" in caplog.text
    assert json.loads((layout.reports_dir / REPORT_FILE).read_text())["training_images"] == 3

    # Only a test split may omit its labels (seeds_tf.data.splits).
    unlabelled = roots.data / "elsewhere" / "test.txt"
    lines = (layout.dataset_dir / "val.txt").read_text().splitlines()
    unlabelled.write_text("".join(line.rsplit(" ", 1)[0] + "\n" for line in lines))
    with pytest.raises(InputError, match=r"'test' split .* without labels") as error:
        calibrate_run(roots, tiny_run, split=str(unlabelled))
    assert error.value.field == "split"
    (layout.dataset_dir / "val.txt").unlink()
    with pytest.raises(InputError, match="has no 'val' split") as error:
        calibrate_run(roots, tiny_run)
    assert error.value.field == "split"


# The reference specimens in the decision, and the calibration split of a run without validation split.


def test_the_neighbour_rule_demotes_a_species_its_references_do_not_confirm():
    _, genus_of_class = calibration.genus_index(CLASSES)
    sure = np.array([0.9, 0.05, 0.01, 0.01, 0.01, 0.02])  # Lens culinaris, and its genus, trusted
    thresholds = calibration.Thresholds(species=0.8, genus=0.8, target_precision=0.95)
    rows = np.stack([sure] * 4)
    # References agreeing; naming another Lens; naming a Triticum; none given.
    decided = calibration.decide(rows[:3], genus_of_class, thresholds, np.array([0, 1, 3]))
    assert decided.tolist() == ["species", "genus", "unknown"]
    assert calibration.decide(sure, genus_of_class, thresholds) == "species"
    assert calibration.decide(sure, genus_of_class, thresholds, np.int64(1)) == "genus"
    with pytest.raises(ValueError, match="species id below 6"):
        calibration.decide(rows, genus_of_class, thresholds, np.array([0, 1, 2, 6]))


def test_thresholds_chosen_under_the_neighbour_rule_reach_the_target_among_its_answers():
    """References that agree mostly where the classifier is right (as on the demo) let the species
    threshold drop: more images answered at the same target precision."""
    logits, labels = _calibrated_sample(3000, seed=3)
    probabilities = _softmax(1.5 * logits)
    _, genus_of_class = calibration.genus_index(CLASSES)
    top1 = probabilities.argmax(axis=1)
    rng = np.random.default_rng(4)
    # The references' majority: the true species 90% of the time, else a random one.
    voted = np.where(rng.random(len(labels)) < 0.9, labels, rng.integers(0, len(CLASSES), len(labels)))
    plain = calibration.choose_thresholds(probabilities, labels, genus_of_class, 0.9)
    ruled = calibration.choose_thresholds(probabilities, labels, genus_of_class, 0.9, voted)
    assert ruled.species < plain.species
    report = calibration.abstention_report(probabilities, labels, genus_of_class, ruled, voted)
    assert report["species_precision"] >= 0.9 and report["genus_precision"] >= 0.9
    species = calibration.decide(probabilities, genus_of_class, ruled, voted) == "species"
    assert (voted[species] == top1[species]).all()
    before = calibration.abstention_report(probabilities, labels, genus_of_class, plain)
    assert report["species_coverage"] > before["species_coverage"]


def test_a_calibration_with_specimens_flags_either_score_and_older_files_still_load(tmp_path):
    logits, labels = _calibrated_sample(400, seed=5)
    probabilities = _softmax(3.0 * logits)
    distances = np.random.default_rng(6).uniform(0.0, 0.5, len(labels))
    evidence = calibration.Evidence(labels, distances, neighbours=5, distance_rank=5)
    fitted = calibration.fit_calibration(probabilities, labels, CLASSES, "calibration", evidence=evidence)
    assert fitted.specimens == calibration.Specimens(5, 5, calibration.ood_threshold(distances))
    layout = runs.RunLayout(tmp_path)
    fitted.save(layout)
    assert calibration.load_calibration(layout) == fitted
    older = {key: value for key, value in fitted.to_dict().items() if key != "specimens"}
    assert calibration.Calibration.from_dict(older).specimens is None
    familiar = np.array([[0.9, 0.02, 0.02, 0.02, 0.02, 0.02]])
    assert fitted.out_of_distribution(familiar, np.array([0.0])).tolist() == [False]
    assert fitted.out_of_distribution(familiar, np.array([0.6])).tolist() == [True]
    assert fitted.out_of_distribution(np.full((1, 6), 1 / 6), np.array([0.0])).tolist() == [True]
    with pytest.raises(ValueError, match="evidence of 400 images"):
        calibration.fit_calibration(
            probabilities, labels, CLASSES, "val", evidence=calibration.Evidence(labels[:5], distances, 5, 5)
        )


def test_the_calibration_split_is_a_seeded_stratified_share_that_leaves_every_class_in_training():
    entries = [(f"a/{i}.jpg", 0) for i in range(40)] + [(f"b/{i}.jpg", 1) for i in range(20)]
    entries += [("c/only.jpg", 2)]
    kept, held = splits.stratified_hold_out(entries, 0.15, seed=7)
    assert len(held) == 9 and sorted(kept + held) == sorted(entries)
    assert [label for _, label in held].count(0) == 6 and [label for _, label in held].count(1) == 3
    assert ("c/only.jpg", 2) in kept
    assert kept == [entry for entry in entries if entry in kept]  # file order kept
    assert splits.stratified_hold_out(entries, 0.15, seed=7) == (kept, held)
    assert splits.stratified_hold_out(entries, 0.15, seed=8) != (kept, held)
    assert len(splits.stratified_hold_out(entries, 0.01, seed=7)[1]) == 2  # a calibration needs 2
    assert splits.stratified_hold_out(entries, 0.0, seed=7) == (entries, [])
    assert splits.stratified_hold_out(entries[-2:], 0.5, seed=7) == (entries[-2:], [])


def test_an_image_listed_twice_in_training_is_never_both_calibrated_on_and_trained_on():
    """A line repeated in train.txt weighs an image double; one copy held out and one kept was an
    image the calibration had been trained on."""
    entries = [("a/1.jpg", 0), ("a/1.jpg", 0), ("a/2.jpg", 0), ("b/1.jpg", 1), ("b/2.jpg", 1), ("b/3.jpg", 1)]
    for seed in range(20):
        kept, held = splits.stratified_hold_out(entries, 0.34, seed=seed)
        assert sorted(kept + held) == sorted(entries)
        assert not {path for path, _ in kept} & {path for path, _ in held}, seed
        assert {label for _, label in kept} == {0, 1}
