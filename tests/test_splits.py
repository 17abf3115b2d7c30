"""The split-file format: parsed robustly, checked before training."""

import pytest

from seeds_tf.core.errors import InputError
from seeds_tf.data.splits import (
    entry_problems,
    parse_split_file,
    parse_split_line,
    read_dataset,
    write_split_files,
)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Genus_a/0001.jpg 3", ("Genus_a/0001.jpg", 3)),
        ("my photos/seed 12.jpg 0", ("my photos/seed 12.jpg", 0)),
        ("lot #4/seed.jpg 7", ("lot #4/seed.jpg", 7)),
        ("seed.jpg\t2", ("seed.jpg", 2)),
        ("unlabelled seed.jpg", ("unlabelled seed.jpg", None)),
        ("seed.jpg", ("seed.jpg", None)),
        ("seed.jpg -1", ("seed.jpg", -1)),  # a label out of range, which the reader reports
        ("seed.jpg --1", ("seed.jpg --1", None)),  # not a label: a path without one
        ("seed.jpg 1\u00b2", ("seed.jpg 1\u00b2", None)),
    ],
)
def test_split_lines(line, expected):
    assert parse_split_line(line) == expected


def _dataset(tmp_path, files: dict[str, str], images=("a b.jpg", "#c.jpg")):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    for name in images:
        (images_dir / name).write_bytes(b"x")
    splits = tmp_path / "splits"
    splits.mkdir()
    for name, text in files.items():
        (splits / name).write_bytes(text.encode())
    return splits, images_dir


def test_windows_line_ends_bom_blank_lines_and_a_one_line_file(tmp_path):
    splits, images = _dataset(
        tmp_path,
        {
            "classes.txt": "\ufeffGenus one\r\nGenus two\r\n\r\n",
            "train.txt": "a b.jpg 0\r\n\r\n#c.jpg 1\r\n",
            "val.txt": "a b.jpg 1",
            "test.txt": "#c.jpg\n",
        },
    )
    dataset = read_dataset(splits, images)
    assert dataset.classes == ("Genus one", "Genus two")
    assert dataset.split("train").labels == (0, 1)
    assert [p.name for p in dataset.split("train").paths] == ["a b.jpg", "#c.jpg"]
    assert dataset.split("val").labels == (1,)
    assert dataset.split("test").labels is None


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"train.txt": "a b.jpg 0"}, "no classes.txt"),
        ({"classes.txt": "A a\nB b"}, "no train.txt"),
        ({"classes.txt": "A a", "train.txt": "a b.jpg 0"}, "fewer than 2 classes"),
        ({"classes.txt": "A a\nA a", "train.txt": "a b.jpg 0"}, "repeats"),
        ({"classes.txt": "A a\nB b", "train.txt": "a b.jpg 2"}, "label 2, outside 0..1"),
        ({"classes.txt": "A a\nB b", "train.txt": "a b.jpg -1"}, "label -1"),
        ({"classes.txt": "A a\nB b", "train.txt": "missing.jpg 0"}, "missing image 'missing.jpg'"),
        ({"classes.txt": "A a\nB b", "train.txt": "../../etc/passwd 0"}, "outside the images folder"),
        ({"classes.txt": "A a\nB b", "train.txt": "a b.jpg"}, "only test.txt may omit"),
        ({"classes.txt": "A a\nB b", "train.txt": "a b.jpg 0\n#c.jpg"}, "entry 2 has no label"),
        ({"classes.txt": "A a\nB b", "train.txt": "\n\n"}, "lists no images"),
        ({"classes.txt": "A a\nB b", "info.txt": "one", "train.txt": "a b.jpg 0"}, "info.txt has 1 lines"),
    ],
)
def test_bad_datasets_are_refused_before_training(tmp_path, files, message):
    splits, images = _dataset(tmp_path, files)
    with pytest.raises(InputError) as raised:
        read_dataset(splits, images)
    assert raised.value.field == "splits_directory"
    assert message in raised.value.problem


def test_a_missing_images_folder_is_named(tmp_path):
    with pytest.raises(InputError) as raised:
        read_dataset(tmp_path, tmp_path / "nowhere")
    assert raised.value.field == "images_directory"


def test_what_the_writer_writes_the_reader_reads_back(tmp_path):
    images = tmp_path / "images"
    for name in ("Genus a/one #1.jpg", "Genus b/two.jpg", "Genus b/three.jpg"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(b"x")
    entries = {
        "train": [("Genus a/one #1.jpg", 0), ("Genus b/two.jpg", 1)],
        "val": [("Genus b/three.jpg", 1)],
        "test": [],
    }
    write_split_files(tmp_path / "splits", ["Genus a", "Genus b"], entries, info=["first", "second"])
    dataset = read_dataset(tmp_path / "splits", images)
    assert dataset.classes == ("Genus a", "Genus b")
    assert dataset.info == ("first", "second")
    assert dataset.split("train").paths == (
        (images / "Genus a/one #1.jpg").resolve(),
        (images / "Genus b/two.jpg").resolve(),
    )
    assert dataset.split("val").labels == (1,)
    assert not (tmp_path / "splits" / "test.txt").exists()  # an empty split is not written


def test_the_reader_stops_at_the_first_problem_the_checker_lists(tmp_path):
    """One rule book: read_dataset refuses with the first of the problems check_dataset collects."""
    splits, images = _dataset(
        tmp_path, {"classes.txt": "A a\nB b", "train.txt": "a b.jpg 5\nnope.jpg 0\n../../x.jpg 1\n#c.jpg"}
    )
    problems = list(entry_problems("train", parse_split_file(splits / "train.txt"), 2, images))
    assert [(problem.kind, problem.line) for problem in problems] == [
        ("label", 1),
        ("missing", 2),
        ("outside", 3),
        ("label", 4),
    ]
    with pytest.raises(InputError) as raised:
        read_dataset(splits, images)
    assert raised.value.problem.endswith(problems[0].message)
