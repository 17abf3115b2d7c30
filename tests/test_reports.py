"""Run reports: metrics checked against answers worked out by hand, JSON of plain types, real PNGs."""

import json
import math

import numpy as np
import PIL.Image
import pytest

from seeds_tf.core import runs
from seeds_tf.learning import evaluation, reports

CLASSES = ["Avena sativa", "Hordeum vulgare", "Triticum aestivum"]

# Eight images, prediction = the largest probability: confusion [[2, 1, 0], [0, 1, 1], [0, 3, 0]].
LABELS = [0, 0, 0, 1, 1, 2, 2, 2]
PROBABILITIES = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.8, 0.1],
        [0.1, 0.4, 0.5],
        [0.2, 0.5, 0.3],
        [0.2, 0.5, 0.3],
        [0.0, 1.0, 0.0],  # the true class has probability 0: clipped to 1e-7 in the log loss
    ]
)


def _epochs(count=10, validation=True):
    """Records like stats/stats.json's, with the learning rate divided by 10 at 70% and 90%."""
    records = []
    for epoch in range(1, count + 1):
        record = {
            "epoch": epoch,
            "loss": 2.5 * 0.75**epoch + 0.1,
            "accuracy": 1 - 0.9 * 0.78**epoch,
            "top5_accuracy": 1 - 0.6 * 0.6**epoch,
            "lr": 1e-3 * 0.1 ** ((epoch > 0.7 * count) + (epoch > 0.9 * count)),
            "seconds": 12.5,
        }
        if validation:
            record |= {
                "val_loss": 2.6 * 0.8**epoch + 0.3,
                "val_accuracy": 0.92 - 0.8 * 0.75**epoch,
                "val_top5_accuracy": 0.99 - 0.6 * 0.65**epoch,
            }
        records.append(record)
    return records


def _random_evaluation(num_classes, num_images, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_images)
    logits = rng.normal(size=(num_images, num_classes))
    logits[np.arange(num_images), labels] += 3.0
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    names = [f"Genus{i // 5} species{i % 5}" for i in range(num_classes)]
    return reports.evaluate(labels, probabilities, names, "test")


def _assert_png(path):
    with PIL.Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with PIL.Image.open(path) as image:
        return image.size


def _plain(value):
    if isinstance(value, dict):
        return all(isinstance(key, str) and _plain(item) for key, item in value.items())
    if isinstance(value, list):
        return all(_plain(item) for item in value)
    return type(value) in (str, int, float, bool)


def test_hand_made_example_gives_the_known_answers():
    evaluation = reports.evaluate(LABELS, PROBABILITIES, CLASSES, "test")

    assert evaluation.split == "test"
    assert evaluation.num_images == 8
    assert evaluation.confusion == [[2, 1, 0], [0, 1, 1], [0, 3, 0]]
    assert evaluation.top1 == 3 / 8
    assert evaluation.top5 == 1.0
    true_probabilities = [0.7, 0.7, 0.3, 0.8, 0.4, 0.3, 0.3, 1e-7]
    assert evaluation.log_loss == pytest.approx(-sum(map(math.log, true_probabilities)) / 8)
    assert [c["support"] for c in evaluation.per_class] == [3, 2, 3]
    assert [c["precision"] for c in evaluation.per_class] == pytest.approx([1.0, 1 / 5, 0.0])
    assert [c["recall"] for c in evaluation.per_class] == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert [c["f1"] for c in evaluation.per_class] == pytest.approx([0.8, 2 / 7, 0.0])
    assert [(c["label_id"], c["label"]) for c in evaluation.per_class] == list(enumerate(CLASSES))
    assert evaluation.macro_f1 == pytest.approx((0.8 + 2 / 7 + 0.0) / 3)
    assert evaluation.most_confused == [
        {"true_id": 2, "true": CLASSES[2], "predicted_id": 1, "predicted": CLASSES[1], "count": 3},
        {"true_id": 0, "true": CLASSES[0], "predicted_id": 1, "predicted": CLASSES[1], "count": 1},
        {"true_id": 1, "true": CLASSES[1], "predicted_id": 2, "predicted": CLASSES[2], "count": 1},
    ]


def test_top5_counts_the_five_most_probable_classes():
    # The true class (0) ranks 5th in the first row, 6th in the second, of 7 classes.
    probabilities = np.array(
        [
            [0.10, 0.20, 0.19, 0.18, 0.17, 0.09, 0.07],
            [0.08, 0.20, 0.19, 0.18, 0.17, 0.10, 0.08],
        ]
    )
    evaluation = reports.evaluate([0, 0], probabilities, [f"c{i}" for i in range(7)], "val")
    assert (evaluation.top1, evaluation.top5) == (0.0, 0.5)
    assert evaluation.most_confused == [
        {"true_id": 0, "true": "c0", "predicted_id": 1, "predicted": "c1", "count": 2}
    ]


def test_a_class_never_predicted_has_precision_zero_and_absent_classes_leave_macro_f1():
    # Four classes: class 1 is never predicted; class 3 has no image and is never predicted.
    probabilities = np.eye(4)[[0, 0, 2, 2]]
    evaluation = reports.evaluate([0, 1, 2, 2], probabilities, ["a", "b", "c", "d"], "test")
    never = evaluation.per_class[1]
    assert (never["precision"], never["recall"], never["f1"]) == (0.0, 0.0, 0.0)
    absent = evaluation.per_class[3]
    assert (absent["support"], absent["precision"], absent["recall"], absent["f1"]) == (0, 0.0, 0.0, 0.0)
    f1_a = 2 * 0.5 * 1.0 / 1.5
    assert evaluation.macro_f1 == pytest.approx((f1_a + 0.0 + 1.0) / 3)
    assert evaluation.top5 == 1.0


def test_to_dict_holds_only_plain_types_and_round_trips_through_json():
    evaluation = reports.evaluate(np.array(LABELS, dtype=np.int32), PROBABILITIES, CLASSES, "test.txt")
    data = evaluation.to_dict()
    assert _plain(data)
    assert json.loads(json.dumps(data)) == data
    assert set(data) == {
        "split",
        "num_images",
        "top1",
        "top5",
        "log_loss",
        "per_class",
        "macro_f1",
        "most_confused",
        "confusion",
    }


@pytest.mark.parametrize(
    ("labels", "probabilities", "message"),
    [
        (
            [0] * 12,
            np.full((12, 15), 1 / 15),
            r"Expected probabilities of shape \(n, num_classes\) = \(12, 16\). Received: shape=\(12, 15\)",
        ),
        ([0, 1], np.full(16, 1 / 16), r"shape \(n, num_classes\) = \(2, 16\). Received: shape=\(16,\)"),
        ([0, 1, 2], np.full((2, 16), 1 / 16), "one row of probabilities per label. Received: 3 labels and 2"),
        ([0, 16], np.full((2, 16), 1 / 16), r"label ids in 0\.\.15. Received: 16 at position 1"),
        ([-1, 0], np.full((2, 16), 1 / 16), r"label ids in 0\.\.15. Received: -1 at position 0"),
        ([], np.zeros((0, 16)), r"non-empty 1-D sequence of label ids. Received: shape=\(0,\)"),
        ([0.0, 1.0], np.full((2, 16), 1 / 16), "integer label ids. Received: dtype=float64"),
        ([0, 1], np.full((2, 16), np.nan), "finite probabilities"),
    ],
)
def test_bad_inputs_raise_value_errors_that_name_the_problem(labels, probabilities, message):
    with pytest.raises(ValueError, match=message):
        reports.evaluate(labels, probabilities, [f"c{i}" for i in range(16)], "test")


def test_no_classes_or_no_epochs_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one class name"):
        reports.evaluate([0], np.ones((1, 0)), [], "test")
    with pytest.raises(ValueError, match="at least one epoch record"):
        reports.plot_training_curves([], tmp_path / "training_curves.png")
    assert list(tmp_path.iterdir()) == []


def test_write_evaluation_writes_the_json_and_a_confusion_matrix_that_grows_with_the_classes(tmp_path):
    small = reports.evaluate(LABELS, PROBABILITIES, CLASSES, "test")
    written = reports.write_evaluation(small, tmp_path / "reports")
    assert written == [
        tmp_path / "reports" / "test_evaluation.json",
        tmp_path / "reports" / "test_confusion_matrix.png",
    ]
    assert json.loads(written[0].read_text(encoding="utf-8")) == small.to_dict()
    small_size = _assert_png(written[1])

    large_size = _assert_png(reports.write_evaluation(_random_evaluation(50, 600), tmp_path, "val")[1])
    assert large_size[0] > small_size[0] and large_size[1] > small_size[1]
    _assert_png(reports.write_evaluation(_random_evaluation(90, 400), tmp_path, "many")[1])

    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "many_confusion_matrix.png",
        "many_evaluation.json",
        "reports",
        "val_confusion_matrix.png",
        "val_evaluation.json",
    ]
    assert sorted(path.name for path in (tmp_path / "reports").iterdir()) == [
        "test_confusion_matrix.png",
        "test_evaluation.json",
    ]


@pytest.mark.parametrize(
    ("records", "panels"),
    [(_epochs(10), 3), (_epochs(1), 3), (_epochs(10, validation=False), 3), ([{"epoch": 1, "loss": 1.0}], 2)],
)
def test_training_curves_are_a_png_with_a_panel_per_quantity(tmp_path, records, panels):
    path = reports.plot_training_curves(records, tmp_path / "training_curves.png")
    assert path == tmp_path / "training_curves.png"
    width, height = _assert_png(path)
    assert width > panels * height * 0.9
    assert [entry.name for entry in tmp_path.iterdir()] == ["training_curves.png"]


def test_a_failed_save_leaves_neither_the_picture_nor_a_temporary_file(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(reports.Figure, "savefig", fail)
    with pytest.raises(OSError, match="disk full"):
        reports.plot_training_curves(_epochs(3), tmp_path / "training_curves.png")
    assert list(tmp_path.iterdir()) == []


def test_evaluating_another_datasets_test_split_keeps_the_runs_own_test_report(tmp_path):
    """`seeds-tf evaluate RUN elsewhere/test.txt` wrote reports/test_evaluation.json over the run's
    own test report, which its run.json figures come from."""
    layout = runs.RunLayout(tmp_path / "run")
    layout.dataset_dir.mkdir(parents=True)
    (layout.dataset_dir / "test.txt").write_text("a/1.jpg 0\nb/2.jpg 1\n")
    other = tmp_path / "other" / "test.txt"
    other.parent.mkdir()
    other.write_text("c/3.jpg 0\n")
    assert evaluation.report_name(layout, other) == "other_test"
    # The run's own split, wherever it is read from, and any other split keep their names.
    same = tmp_path / "test.txt"
    same.write_bytes((layout.dataset_dir / "test.txt").read_bytes())
    assert evaluation.report_name(layout, same) == "test"
    assert evaluation.report_name(layout, other.with_name("my_split.txt")) == "my_split"
