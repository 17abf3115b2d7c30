"""Folder-per-class datasets split into split files, and the check that runs before training."""

import io
import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from seeds_tf.core.errors import InputError
from seeds_tf.data.datasets import DatasetReport, check_dataset, is_folder_dataset, split_folder_dataset
from seeds_tf.data.splits import read_dataset, read_labels


def _photo(seed: int, fmt: str = "JPEG") -> bytes:
    """A small noise image, different for each seed, so no two are identical by accident."""
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _folder_dataset(root: Path, sizes: dict[str, int]) -> Path:
    """images/<class>/<n>.jpg with sizes[class] images per class."""
    images = root / "images"
    seed = 0
    for name, size in sizes.items():
        for index in range(size):
            seed += 1
            _write(images / name / f"{index:03d}.jpg", _photo(seed))
    return images


def _labels_per_split(dataset) -> dict[str, list[int]]:
    return {name: sorted(split.labels) for name, split in dataset.splits.items()}


# --- folder-per-class datasets -------------------------------------------------------------------------


def test_classes_are_sorted_and_each_class_is_cut_by_the_fractions(tmp_path):
    images = _folder_dataset(tmp_path, {"Zea mays": 20, "Abies alba": 3, "Lens culinaris": 7})
    destination = split_folder_dataset(images, tmp_path / "splits")

    assert sorted(p.name for p in destination.iterdir()) == [
        "classes.txt",
        "test.txt",
        "train.txt",
        "val.txt",
    ]
    dataset = read_dataset(destination, images)
    assert dataset.classes == ("Abies alba", "Lens culinaris", "Zea mays")
    labels = _labels_per_split(dataset)
    for split in ("train", "val", "test"):
        assert set(labels[split]) == {0, 1, 2}
    # 15 % of 20 is 3 images each for val and test.
    assert [labels[split].count(2) for split in ("train", "val", "test")] == [14, 3, 3]
    assert [labels[split].count(0) for split in ("train", "val", "test")] == [1, 1, 1]
    assert sum(len(split.paths) for split in dataset.splits.values()) == 30
    every_path = [path for split in dataset.splits.values() for path in split.paths]
    assert len(set(every_path)) == 30


def test_copies_of_a_photo_end_in_one_split(tmp_path):
    """A copy in test of a photo trained on (the same file under two names, as collections gather
    them) inflated the run's figures: the copies follow the first one's split."""
    images = _folder_dataset(tmp_path, {"Genus a": 20, "Genus b": 20})
    first = (images / "Genus a" / "000.jpg").read_bytes()
    for index in range(1, 20):  # copied 19 times: every split would draw some
        (images / "Genus a" / f"copy{index:02d}.jpg").write_bytes(first)
    dataset = read_dataset(split_folder_dataset(images, tmp_path / "splits"), images)
    copies = {images / "Genus a" / "000.jpg", *(images / "Genus a").glob("copy*.jpg")}
    holding = [name for name, split in dataset.splits.items() if copies & set(split.paths)]
    assert len(holding) == 1
    assert sum(len(split.paths) for split in dataset.splits.values()) == 59
    assert check_dataset(tmp_path / "splits", images).copies_in_several_splits == []


def test_copies_drawn_for_training_keep_their_class_in_training(tmp_path):
    """Copies followed the first copy's split, out of train too: a class of three images, two of
    them copies, could keep nothing to train on, and nothing refused it."""
    images = _folder_dataset(tmp_path, {"Genus a": 3, "Genus b": 3})
    (images / "Genus a" / "001.jpg").write_bytes((images / "Genus a" / "000.jpg").read_bytes())
    for seed in range(20):
        splits = split_folder_dataset(images, tmp_path / f"splits{seed}", seed=seed)
        assert set(read_dataset(splits, images).split("train").labels) == {0, 1}, seed


def test_the_split_is_reproducible_and_depends_on_the_seed(tmp_path):
    images = _folder_dataset(tmp_path, {"Genus a": 20, "Genus b": 20})
    first = split_folder_dataset(images, tmp_path / "one")
    second = split_folder_dataset(images, tmp_path / "two")
    other = split_folder_dataset(images, tmp_path / "other", seed=7)
    for name in ("classes.txt", "train.txt", "val.txt", "test.txt"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / "val.txt").read_bytes() != (other / "val.txt").read_bytes()
    assert (first / "classes.txt").read_bytes() == b"Genus a\nGenus b\n"


def test_paths_with_spaces_and_hashes_survive_the_split_files(tmp_path):
    images = tmp_path / "my images"
    names = ["seed 1.jpg", "#2.jpg", "lot #3/seed 3.png", "a  b.JPG"]
    for index, name in enumerate(names):
        _write(images / "Genus #1 sp" / name, _photo(index))
        _write(images / "Genus two" / name, _photo(index + 10))
    destination = split_folder_dataset(images, tmp_path / "splits")

    dataset = read_dataset(destination, images)
    assert dataset.classes == ("Genus #1 sp", "Genus two")
    listed = {path for split in dataset.splits.values() for path in split.paths}
    assert listed == {(images / folder / name).resolve() for folder in dataset.classes for name in names}
    assert (
        "lot #3/seed 3.png"
        in (destination / "train.txt").read_text()
        + (destination / "val.txt").read_text()
        + (destination / "test.txt").read_text()
    )


def test_tiny_classes_go_to_train_only_with_a_warning(tmp_path, caplog):
    images = _folder_dataset(tmp_path, {"Big one": 10, "Small one": 2, "Single one": 1})
    with caplog.at_level(logging.WARNING, logger="seeds_tf.data.datasets"):
        destination = split_folder_dataset(images, tmp_path / "splits")
    labels = _labels_per_split(read_dataset(destination, images))
    assert labels["train"].count(1) == 1
    assert labels["train"].count(2) == 2
    assert set(labels["val"]) == set(labels["test"]) == {0}
    assert "'Small one' has only 2 image(s)" in caplog.text
    assert "'Single one' has only 1 image(s)" in caplog.text


def test_hidden_files_and_other_extensions_are_ignored(tmp_path, caplog):
    images = tmp_path / "images"
    for name in ("a.jpg", "b.JPEG", "c.png", "d.webp", "e.tif", "f.TIFF", "g.bmp", "h.gif", "deep/i.jpg"):
        _write(images / "Genus a" / name, b"x")
        _write(images / "Genus b" / name, b"x")
    for name in (".hidden.jpg", ".thumbnails/j.jpg", "notes.txt", "k.jpg.bak", "Thumbs.db", "l.raw"):
        _write(images / "Genus a" / name, b"x")
    _write(images / ".git" / "m.jpg", b"x")
    _write(images / "loose.jpg", b"x")
    (images / "Empty folder").mkdir()
    _write(images / "Only notes" / "notes.txt", b"x")

    with caplog.at_level(logging.WARNING, logger="seeds_tf.data.datasets"):
        destination = split_folder_dataset(images, tmp_path / "splits", val_fraction=0, test_fraction=0)

    # iPhone (.heic) or raw photos, a species' folder of them: a botanist must hear what is left out.
    report = check_dataset(None, images)
    assert report.not_images == {".txt": 2, ".bak": 1, ".db": 1, ".raw": 1}
    assert report.folders_without_images == ["Empty folder", "Only notes"]
    assert "class folder without images: Only notes" in report.summary()
    assert "left out class folder without images: Empty folder" in caplog.text
    assert "(.txt: 2, .bak: 1, .db: 1, .raw: 1)" in caplog.text
    assert (destination / "classes.txt").read_text() == "Genus a\nGenus b\n"
    assert sorted(p.name for p in destination.iterdir()) == ["classes.txt", "train.txt"]
    train = (destination / "train.txt").read_text().splitlines()
    assert len(train) == 18
    assert "Genus a/deep/i.jpg 0" in train
    assert "Genus b/f.TIFF 1" in train


def test_a_zero_fraction_writes_no_split_file_and_removes_a_stale_one(tmp_path):
    images = _folder_dataset(tmp_path, {"Genus a": 5, "Genus b": 5})
    destination = tmp_path / "splits"
    split_folder_dataset(images, destination)
    split_folder_dataset(images, destination, val_fraction=0.2, test_fraction=0)
    assert sorted(p.name for p in destination.iterdir()) == ["classes.txt", "train.txt", "val.txt"]
    assert _labels_per_split(read_dataset(destination, images)) == {"train": [0] * 4 + [1] * 4, "val": [0, 1]}


@pytest.mark.parametrize(
    ("sizes", "options", "field", "message"),
    [
        ({"Genus a": 3}, {}, "images_directory", "1 sub-folder(s) with images"),
        ({}, {}, "images_directory", "0 sub-folder(s)"),
        ({"Genus a": 3, " Genus b": 3}, {}, "images_directory", "cannot be written to a split file"),
        # A Latin-1 folder name from an old archive: not UTF-8, so no split file can hold it.
        ({"Genus a": 3, "Caf\udce9 b": 3}, {}, "images_directory", "characters that are not UTF-8"),
        ({"Genus a": 3, "Genus b": 3}, {"val_fraction": 0.6}, "val_fraction", "expected <= 0.5"),
        ({"Genus a": 3, "Genus b": 3}, {"test_fraction": -0.1}, "test_fraction", "expected >= 0.0"),
        ({"Genus a": 3, "Genus b": 3}, {"test_fraction": float("nan")}, "test_fraction", "expected >= 0.0"),
        (
            {"Genus a": 3, "Genus b": 3},
            {"val_fraction": 0.5, "test_fraction": 0.5},
            "test_fraction",
            "less than 1",
        ),
        ({"Genus a": 3, "Genus b": 3}, {"seed": -1}, "seed", "expected >= 0"),
    ],
)
def test_bad_folder_datasets_and_options_are_refused(tmp_path, sizes, options, field, message):
    images = _folder_dataset(tmp_path, sizes)
    images.mkdir(exist_ok=True)
    with pytest.raises(InputError) as raised:
        split_folder_dataset(images, tmp_path / "splits", **options)
    assert raised.value.field == field
    assert message in raised.value.problem
    assert not (tmp_path / "splits").exists()


def test_a_missing_images_folder_is_refused(tmp_path):
    with pytest.raises(InputError) as raised:
        split_folder_dataset(tmp_path / "nowhere", tmp_path / "splits")
    assert raised.value.field == "images_directory"


def test_the_folder_layout_is_recognised(tmp_path):
    assert is_folder_dataset(_folder_dataset(tmp_path / "two", {"Genus a": 1, "Genus b": 1}))
    # One class folder, or the class folders nested in one: split_folder_dataset says what is wrong.
    assert is_folder_dataset(_folder_dataset(tmp_path / "one", {"Genus a": 3}))
    assert is_folder_dataset(_folder_dataset(tmp_path / "nested", {"Seeds/Genus a": 1, "Seeds/Genus b": 1}))
    flat = _write(tmp_path / "flat" / "a.jpg", b"x").parent
    _write(flat / "notes" / "a.txt", b"x")
    _write(flat / "more notes" / "b.txt", b"x")
    assert not is_folder_dataset(flat)
    assert not is_folder_dataset(tmp_path / "nowhere")


# --- check_dataset on split files -------------------------------------------------------------------------


def _split_dataset(root: Path, files: dict[str, str], images: dict[str, bytes]) -> tuple[Path, Path]:
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    for name, data in images.items():
        _write(images_dir / name, data)
    splits = root / "splits"
    splits.mkdir()
    for name, text in files.items():
        (splits / name).write_bytes(text.encode())
    return splits, images_dir


def test_every_problem_of_a_broken_dataset_is_reported(tmp_path):
    twin = _photo(99)
    splits, images = _split_dataset(
        tmp_path,
        {
            "classes.txt": "Genus a\nGenus b\nGenus c\n",
            "train.txt": "\n".join(
                [
                    "a/good.jpg 0",
                    "b/good.jpg 1",
                    "a/truncated.jpg 0",
                    "b/text.jpg 1",
                    "a/missing.jpg 0",
                    "b/label out.jpg 3",
                    "b/no label.jpg",
                    "a/leak.jpg 0",
                    "a/twin one.jpg 0",
                    "b/twin two.jpg 1",
                    "../outside.jpg 0",
                ]
            ),
            "val.txt": "c/only val.jpg 2\n",
            "test.txt": "a/leak.jpg 0\nb/test.jpg 1\na/twin three.jpg 0\n",
        },
        {
            "a/good.jpg": _photo(1),
            "b/good.jpg": _photo(2),
            "a/truncated.jpg": _photo(3)[:400],
            "b/text.jpg": b"not an image at all",
            "b/label out.jpg": _photo(4),
            "b/no label.jpg": _photo(5),
            "a/leak.jpg": _photo(6),
            "a/twin one.jpg": twin,
            "b/twin two.jpg": twin,
            "a/twin three.jpg": twin,
            "c/only val.jpg": _photo(7),
            "b/test.jpg": _photo(8),
        },
    )
    _write(tmp_path / "outside.jpg", _photo(9))

    report = check_dataset(splits, images)

    assert report.classes == ("Genus a", "Genus b", "Genus c")
    assert report.images_per_class == {
        "train": {"Genus a": 3, "Genus b": 2, "Genus c": 0},
        "val": {"Genus a": 0, "Genus b": 0, "Genus c": 1},
        "test": {"Genus a": 2, "Genus b": 1, "Genus c": 0},
    }
    assert sorted(entry["path"] for entry in report.unreadable) == ["a/truncated.jpg", "b/text.jpg"]
    assert report.missing == [{"split": "train", "line": 5, "path": "a/missing.jpg"}]
    assert report.bad_labels == [
        {"split": "train", "line": 6, "path": "b/label out.jpg", "label": 3},
        {"split": "train", "line": 7, "path": "b/no label.jpg", "label": None},
    ]
    assert report.empty_classes == ["Genus c"]
    twins = ["a/twin one.jpg", "a/twin three.jpg", "b/twin two.jpg"]
    assert report.duplicates == [twins]
    assert report.in_several_splits == [{"path": "a/leak.jpg", "splits": ["train", "test"]}]
    # A copy under another name leaks the photo as well: fatal, where copies within a split are not.
    assert report.copies_in_several_splits == [{"paths": twins, "splits": ["train", "test"]}]
    assert report.outside == [{"split": "train", "line": 11, "path": "../outside.jpg"}]
    assert report.file_problems == []
    assert not report.ok

    summary = report.summary()
    for text in (
        "a/truncated.jpg",
        "b/text.jpg",
        "train.txt line 5: a/missing.jpg",
        "b/label out.jpg has label 3",
        "b/no label.jpg has no label",
        "a/leak.jpg: train, test",
        "a/twin one.jpg = a/twin three.jpg = b/twin two.jpg",
        "Identical images in several splits (1):",
        "Genus c",
        "../outside.jpg",
        "NOT OK",
    ):
        assert text in summary
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False
    assert data["classes"] == ["Genus a", "Genus b", "Genus c"]
    assert data["bad_labels"][1]["label"] is None


@pytest.mark.parametrize(
    ("info", "descriptions"),
    [
        ("desc of A\n\n", ("desc of A", "")),  # the last class has none
        ("\ndesc of B\n", ("", "desc of B")),
        ("desc of A\ndesc of B\n\n\n", ("desc of A", "desc of B")),  # an editor's trailing blank lines
    ],
)
def test_a_class_without_a_description_is_a_blank_line_of_info_txt_the_last_one_too(
    tmp_path, info, descriptions
):
    """A blank last line of info.txt (the last class without a description) was dropped, and the
    dataset refused ("info.txt has 1 lines for 2 classes")."""
    (tmp_path / "classes.txt").write_text("Genus a\nGenus b\n")
    (tmp_path / "info.txt").write_text(info)
    assert read_labels(tmp_path) == (("Genus a", "Genus b"), descriptions)


@pytest.mark.parametrize("name", ["classes.txt", "info.txt", "train.txt"])
def test_a_dataset_file_in_another_encoding_is_named_not_a_traceback(tmp_path, name):
    """A file saved as cp1252 by an old Windows tool ended `seeds-tf train` and `check-dataset` in
    a UnicodeDecodeError's traceback."""
    splits, images = _split_dataset(
        tmp_path,
        {"classes.txt": "Genus a\nGenus b\n", "info.txt": "one\ntwo\n", "train.txt": "x.jpg 0\ny.jpg 1\n"},
        {"x.jpg": _photo(1), "y.jpg": _photo(2)},
    )
    (splits / name).write_bytes((splits / name).read_bytes().replace(b"\n", " caf\xe9\n".encode("cp1252"), 1))
    problem = f"{splits / name} is not UTF-8 text (at byte "
    for check in (lambda: read_dataset(splits, images), lambda: check_dataset(splits, images)):
        with pytest.raises(InputError, match="not UTF-8") as raised:
            check()
        assert raised.value.field == "splits_directory"
        assert raised.value.problem.startswith(problem), raised.value.problem


def test_a_clean_dataset_is_ok_with_exact_counts(tmp_path):
    splits, images = _split_dataset(
        tmp_path,
        {
            "classes.txt": "\ufeffGenus one\r\nGenus two\r\n\r\n",
            "info.txt": "first\nsecond\n",
            "train.txt": "a b.jpg 0\r\n\r\n#c.jpg 1\r\nlot #4/d e.png 1\r\n",
            "val.txt": "v.jpg 0\nw.jpg 1",
            "test.txt": "t 1.jpg\nt 2.jpg\n",
        },
        {
            "a b.jpg": _photo(1),
            "#c.jpg": _photo(2),
            "lot #4/d e.png": _photo(3, "PNG"),
            "v.jpg": _photo(4),
            "w.jpg": _photo(5),
            "t 1.jpg": _photo(6),
            "t 2.jpg": _photo(7),
        },
    )
    report = check_dataset(splits, images)
    assert report.ok
    assert report.images_per_class == {
        "train": {"Genus one": 1, "Genus two": 2},
        "val": {"Genus one": 1, "Genus two": 1},
        "test": {"Genus one": 0, "Genus two": 0},
    }
    assert report.unlabelled == {"test": 2}
    assert not (report.unreadable or report.missing or report.bad_labels or report.duplicates)
    summary = report.summary()
    assert "Genus two      2    1     0" in summary
    assert "test: 2 unlabelled images" in summary
    assert summary.endswith("OK: nothing would stop or distort training.")
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({"classes.txt": "A a\nB b", "val.txt": "x.jpg 0"}, "there is no train.txt"),
        ({"classes.txt": "A a", "train.txt": "x.jpg 0"}, "classes.txt names 1 class(es)"),
        ({"classes.txt": "A a\nB b\nA a", "train.txt": "x.jpg 0\ny.jpg 1"}, "classes.txt repeats 'A a'"),
        (
            {"classes.txt": "A a\nB b", "info.txt": "one", "train.txt": "x.jpg 0\ny.jpg 1"},
            "info.txt has 1 lines",
        ),
        (
            {"classes.txt": "A a\nB b", "train.txt": "x.jpg 0\ny.jpg 1", "val.txt": "\n\n"},
            "val.txt lists no images",
        ),
    ],
)
def test_problems_of_the_dataset_files_are_reported_not_raised(tmp_path, files, problem):
    splits, images = _split_dataset(tmp_path, files, {"x.jpg": _photo(1), "y.jpg": _photo(2)})
    report = check_dataset(splits, images)
    assert any(problem in text for text in report.file_problems)
    assert not report.ok
    assert problem in report.summary()


def test_a_partly_labelled_test_split_reports_the_unlabelled_entries(tmp_path):
    splits, images = _split_dataset(
        tmp_path,
        {"classes.txt": "A a\nB b", "train.txt": "x.jpg 0\ny.jpg 1", "test.txt": "x.jpg 0\ny.jpg"},
        {"x.jpg": _photo(1), "y.jpg": _photo(2)},
    )
    report = check_dataset(splits, images)
    assert report.bad_labels == [{"split": "test", "line": 2, "path": "y.jpg", "label": None}]
    assert report.unlabelled == {}


def test_long_problem_lists_are_cut_in_the_summary(tmp_path):
    train = "\n".join(f"missing {i}.jpg 0" for i in range(12)) + "\nx.jpg 0\ny.jpg 1"
    splits, images = _split_dataset(
        tmp_path, {"classes.txt": "A a\nB b", "train.txt": train}, {"x.jpg": _photo(1), "y.jpg": _photo(2)}
    )
    summary = check_dataset(splits, images).summary()
    assert "Missing images (12):" in summary
    assert "missing 9.jpg" in summary
    assert "missing 10.jpg" not in summary
    assert "... and 2 more" in summary


def test_nothing_to_inspect_raises(tmp_path):
    splits, images = _split_dataset(tmp_path, {"train.txt": "x.jpg 0"}, {"x.jpg": _photo(1)})
    with pytest.raises(InputError) as raised:
        check_dataset(splits, images)
    assert raised.value.field == "splits_directory"
    with pytest.raises(InputError) as raised:
        check_dataset(None, tmp_path / "nowhere")
    assert raised.value.field == "images_directory"


# --- check_dataset on folder-per-class datasets ---------------------------------------------------------


def test_a_folder_dataset_is_checked_as_one_split(tmp_path):
    images = _folder_dataset(tmp_path, {"Genus b": 3, "Genus a": 2})
    _write(images / "Genus a" / "broken.png", b"\x89PNG not really")
    _write(images / "Genus c" / "only.jpg", b"")
    (images / "Genus b" / "copy.jpg").write_bytes((images / "Genus a" / "000.jpg").read_bytes())
    _write(images / "Genus b" / ".hidden.jpg", b"")

    report = check_dataset(None, images)

    assert report.classes == ("Genus a", "Genus b", "Genus c")
    assert report.images_per_class == {"all": {"Genus a": 2, "Genus b": 4, "Genus c": 0}}
    assert sorted(entry["path"] for entry in report.unreadable) == ["Genus a/broken.png", "Genus c/only.jpg"]
    assert report.empty_classes == ["Genus c"]
    assert report.duplicates == [["Genus a/000.jpg", "Genus b/copy.jpg"]]
    assert not report.ok
    assert "Genus c/only.jpg" in report.summary()


def test_a_split_folder_dataset_checks_clean_both_ways(tmp_path):
    images = _folder_dataset(tmp_path, {"Genus a": 8, "Genus b": 6})
    folder_report = check_dataset(None, images)
    assert folder_report.ok
    assert folder_report.images_per_class == {"all": {"Genus a": 8, "Genus b": 6}}

    split_report = check_dataset(split_folder_dataset(images, tmp_path / "splits"), images)
    assert split_report.ok
    totals = {
        name: sum(split[name] for split in split_report.images_per_class.values())
        for name in ("Genus a", "Genus b")
    }
    assert totals == {"Genus a": 8, "Genus b": 6}


def test_a_folder_with_one_class_is_reported(tmp_path):
    report = check_dataset(None, _folder_dataset(tmp_path, {"Genus a": 3}))
    assert isinstance(report, DatasetReport)
    assert report.file_problems == [
        f"{tmp_path / 'images'} has 1 sub-folder(s) with images ['Genus a']; at least 2 are needed, "
        "one per class, right under it"
    ]
    assert not report.ok


def test_images_linked_from_outside_are_refused_by_the_check_and_the_split_alike(tmp_path):
    """Reading a split refuses images that links lead out of the images folder; the folder check
    said OK and the split wrote them, so the training stopped at 'points outside the images folder'."""
    images = _folder_dataset(tmp_path, {"Genus a": 3})
    (images / "Genus b").symlink_to(_folder_dataset(tmp_path / "elsewhere", {"Genus b": 3}) / "Genus b")
    (images / "Genus c").symlink_to(images / "Genus a")  # a link that stays inside is fine

    report = check_dataset(None, images)
    assert report.images_per_class == {"all": {"Genus a": 3, "Genus b": 0, "Genus c": 3}}
    assert "'Genus b/000.jpg' leads outside the images folder" in report.file_problems[0]
    assert not report.ok
    with pytest.raises(InputError, match="leads outside the images folder"):
        split_folder_dataset(images, tmp_path / "splits")


def test_an_image_listed_twice_in_a_split_is_reported_and_fatal_with_two_labels(tmp_path):
    """Merged lists repeat images; one listed as two species was trained as both while the check said OK."""
    splits, images = _split_dataset(
        tmp_path,
        {
            "classes.txt": "Genus a\nGenus b\n",
            "train.txt": "a.jpg 0\nb.jpg 1\nc.jpg 1\n./a.jpg 0\nc.jpg 0\n",
            "val.txt": "d.jpg 0\nd.jpg 0\n",
        },
        {name: _photo(seed) for seed, name in enumerate(("a.jpg", "b.jpg", "c.jpg", "d.jpg"))},
    )
    report = check_dataset(splits, images)
    assert report.repeated == [
        {"split": "train", "path": "a.jpg", "labels": [0, 0]},
        {"split": "train", "path": "c.jpg", "labels": [1, 0]},
        {"split": "val", "path": "d.jpg", "labels": [0, 0]},
    ]
    assert report.conflicting_labels == [report.repeated[1]]
    assert not report.ok
    assert "train.txt: c.jpg with labels 1, 0" in report.summary()

    (splits / "train.txt").write_text("a.jpg 0\nb.jpg 1\nc.jpg 1\na.jpg 0\n")
    assert check_dataset(splits, images).ok  # the same label twice only weighs an image double
