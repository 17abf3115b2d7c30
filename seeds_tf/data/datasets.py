"""Datasets as users have them: folder-per-class photos turned into split files, and the report that
`seeds-tf check-dataset` prints before any training.

Folder-per-class means `images/<Genus species>/<any name>.jpg` (any common image format, nested
folders allowed, hidden files and folders ignored). `split_folder_dataset` writes it out in the split-file
format of `seeds_tf.data.splits`, so a run records exactly which images it trained, validated and tested on.

`check_dataset` inspects either layout and collects every problem at once, where `splits.read_dataset`
stops at the first: users fix their data in one pass instead of one training attempt per problem.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from seeds_tf.core import config
from seeds_tf.core.errors import InputError
from seeds_tf.data import images
from seeds_tf.data.splits import (
    SPLIT_NAMES,
    Dataset,
    Problem,
    Split,
    entry_problems,
    folder_problems,
    listable,
    parse_split_file,
    read_labels,
    within,
    write_split_files,
)

_LOGGER = logging.getLogger(__name__)

ALL = "all"
"""The pseudo-split of a folder-per-class dataset in a `DatasetReport`."""

_EXAMPLES = 10
"""Problems of one kind that `DatasetReport.summary` spells out; the rest are counted."""

_HASH_CHUNK = 1 << 20


def readable(split: Split) -> Split:
    """`split` less the images that cannot be decoded (images.find_unreadable), each named in a
    warning: one bad file among thousands should not end a training, an evaluation, an index or a
    calibration, which would otherwise fail on it in the middle of their pipeline."""
    unreadable = images.find_unreadable(split.paths)
    for path, problem in unreadable.items():
        _LOGGER.warning("Skipping unreadable image %s: %s", path, problem)
    return split.without(unreadable) if unreadable else split


def is_folder_dataset(images_dir: Path) -> bool:
    """True when images_dir has a sub-folder containing images: the folder-per-class layout, which
    split_folder_dataset splits or refuses saying why (a single class folder, or the class folders
    one level too deep in one), rather than a complaint about split files the user never meant to have."""
    if not images_dir.is_dir():
        return False
    return any(next(_images_in(folder), None) for folder in _class_folders(images_dir))


def split_folder_dataset(
    images_dir: Path,
    destination: Path,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
) -> Path:
    """Writes classes.txt, train.txt, val.txt and test.txt for a folder-per-class dataset into
    destination (created if needed) and returns destination.

    Classes are the sub-folders holding images, sorted by name; split files list paths relative to
    images_dir with '/' separators. Each class is shuffled by a generator seeded with (seed, class index)
    and cut by the fractions, so the split is stratified and byte-for-byte reproducible. Rounding leaves
    every class of 3 or more images at least one image in each split, train getting the rest; smaller
    classes go to train only, with a warning. Copies of one photo (identical files) end in one split,
    train if one was drawn for it, else the first copy's: a copy in test of a photo trained on would
    inflate the run's figures. A split
    whose fraction is 0, or that ends up empty, is not written (and a stale one in destination is
    removed), since `splits.read_dataset` refuses empty splits.

    Raises:
        InputError: naming `images_directory`, `val_fraction`, `test_fraction` or `seed`.
    """
    fractions = {"val": val_fraction, "test": test_fraction}
    _check_split_options(fractions, seed)
    if not images_dir.is_dir():
        raise InputError("images_directory", f"{images_dir} is not a folder")
    classes = _folder_classes(images_dir)
    problems = _folder_problems(images_dir, classes)
    if problems:
        raise InputError("images_directory", problems[0])
    for line in _left_out_lines(*_left_out(images_dir)):
        _LOGGER.warning("%s: left out %s", images_dir, line)

    entries: dict[str, list[tuple[str, int]]] = {name: [] for name in SPLIT_NAMES}
    for label, (name, paths) in enumerate(classes.items()):
        rng = np.random.default_rng([seed, label])
        chosen = _together(_split_class(name, paths, fractions, rng), images_dir)
        for split in SPLIT_NAMES:
            entries[split] += [(path, label) for path in chosen.get(split, [])]

    destination.mkdir(parents=True, exist_ok=True)
    for split, split_entries in entries.items():
        target = destination / f"{split}.txt"
        if not split_entries:
            if fractions.get(split):
                _LOGGER.warning("No class has enough images for a %s split; %s is not written", split, target)
            target.unlink(missing_ok=True)
    write_split_files(destination, list(classes), entries)
    return destination


@dataclasses.dataclass(frozen=True)
class DatasetReport:
    """What `check_dataset` found. Paths are relative to the images folder, with '/' separators;
    "line" counts the non-blank lines of a split file, as `splits.read_split` does."""

    classes: tuple[str, ...]
    images_per_class: dict[str, dict[str, int]]
    """Split name -> {class name: usable images}; usable means listed with a valid label, inside the
    images folder, present and decodable. A folder-per-class dataset has the one split "all"."""
    unreadable: list[dict]
    """{"path", "reason"}: files that cannot be decoded as images."""
    missing: list[dict]
    """{"split", "line", "path"}: entries naming no file."""
    bad_labels: list[dict]
    """{"split", "line", "path", "label"}: a label out of range, or None where a label is required."""
    empty_classes: list[str]
    """Classes without a usable image in train (in "all" for a folder-per-class dataset)."""
    duplicates: list[list[str]]
    """Groups of two or more files with identical content: reported, not fatal within a split."""
    in_several_splits: list[dict]
    """{"path", "splits"}: images listed in two or more splits, which leaks them into evaluation."""
    outside: list[dict]
    """{"split", "line", "path"}: entries whose path leaves the images folder."""
    file_problems: list[str] = dataclasses.field(default_factory=list)
    """Problems of the dataset files themselves: no train.txt, an empty split file, fewer than two
    classes, a repeated class name, an info.txt of the wrong length, a name a split file cannot hold."""
    unlabelled: dict[str, int] = dataclasses.field(default_factory=dict)
    """Split name -> usable images listed without labels, for a test.txt that omits them all."""
    not_images: dict[str, int] = dataclasses.field(default_factory=dict)
    """Suffix -> files of the class folders left out as no images (a folder-per-class dataset): not fatal."""
    folders_without_images: list[str] = dataclasses.field(default_factory=list)
    """Class folders left out for holding no image (a folder-per-class dataset): not fatal."""
    repeated: list[dict] = dataclasses.field(default_factory=list)
    """{"split", "path", "labels"}: images listed more than once in one split (merged lists do it),
    with the label of each listing. Different labels train one photo as several species (fatal); the
    same label only weighs it double (not fatal)."""
    copies_in_several_splits: list[dict] = dataclasses.field(default_factory=list)
    """{"paths", "splits"}: identical files under different names in more than one split, which
    leaks the photo into evaluation as `in_several_splits` does (fatal)."""

    @property
    def conflicting_labels(self) -> list[dict]:
        """The entries of `repeated` whose labels differ."""
        return [entry for entry in self.repeated if len(set(entry["labels"])) > 1]

    @property
    def ok(self) -> bool:
        """True when nothing would stop or distort training (duplicates alone do not)."""
        return not (
            self.missing
            or self.bad_labels
            or self.outside
            or self.unreadable
            or self.in_several_splits
            or self.copies_in_several_splits
            or self.empty_classes
            or self.file_problems
            or self.conflicting_labels
        )

    def to_dict(self) -> dict:
        """The report as JSON-ready data, "ok" included."""
        return {**dataclasses.asdict(self), "classes": list(self.classes), "ok": self.ok}

    def summary(self) -> str:
        """The report as text: usable images per class and split, then each kind of problem."""
        splits = list(self.images_per_class)
        rows = [["class", *splits]]
        rows += [[name, *(str(self.images_per_class[s][name]) for s in splits)] for name in self.classes]
        rows.append(["total", *(str(sum(self.images_per_class[s].values())) for s in splits)])
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        text = [
            "  ".join(
                cell.rjust(width) if column else cell.ljust(width)
                for column, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        text += [f"{split}: {count} unlabelled images" for split, count in self.unlabelled.items()]
        text.append("")
        sections = [
            ("Dataset file problems", self.file_problems),
            ("Missing images", [f"{e['split']}.txt line {e['line']}: {e['path']}" for e in self.missing]),
            (
                "Paths outside the images folder",
                [f"{e['split']}.txt line {e['line']}: {e['path']}" for e in self.outside],
            ),
            (
                "Bad labels",
                [
                    f"{e['split']}.txt line {e['line']}: {e['path']} "
                    + ("has no label" if e["label"] is None else f"has label {e['label']}")
                    for e in self.bad_labels
                ],
            ),
            ("Unreadable images", [f"{e['path']}: {e['reason']}" for e in self.unreadable]),
            (
                "Images in several splits",
                [f"{e['path']}: {', '.join(e['splits'])}" for e in self.in_several_splits],
            ),
            (
                "Identical images in several splits",
                [
                    f"{' = '.join(e['paths'])}: {', '.join(e['splits'])}"
                    for e in self.copies_in_several_splits
                ],
            ),
            ("Classes without training images", self.empty_classes),
            (
                "Images listed more than once in a split (fatal where the labels differ)",
                [
                    f"{e['split']}.txt: {e['path']} with labels {', '.join(map(str, e['labels']))}"
                    for e in self.repeated
                ],
            ),
            ("Identical images (not fatal within a split)", [" = ".join(group) for group in self.duplicates]),
            ("Left out (not fatal)", _left_out_lines(self.not_images, self.folders_without_images)),
        ]
        for title, items in sections:
            if items:
                text.append(f"{title} ({len(items)}):")
                text += [f"  {item}" for item in items[:_EXAMPLES]]
                if len(items) > _EXAMPLES:
                    text.append(f"  ... and {len(items) - _EXAMPLES} more")
        text.append(
            "OK: nothing would stop or distort training." if self.ok else "NOT OK: fix the problems above."
        )
        return "\n".join(text)


def check_dataset(splits_dir: Path | None, images_dir: Path) -> DatasetReport:
    """Inspects a split-file dataset (splits_dir with classes.txt and train/val/test.txt) or, when
    splits_dir is None, a folder-per-class dataset under images_dir.

    It parses split files exactly as `splits.read_dataset` does, but never raises for a problem in the
    data: it reports them all, in one linear pass plus a decode and a hash per distinct file.

    Raises:
        InputError: only when there is nothing to inspect: images_dir is not a folder, or splits_dir
            has no classes.txt.
    """
    if not images_dir.is_dir():
        raise InputError("images_directory", f"{images_dir} is not a folder")
    root = images_dir.resolve()
    if splits_dir is None:
        folders = _folder_classes(images_dir)
        scan = _Scan(tuple(folders), _folder_problems(images_dir, folders))
        for label, paths in enumerate(folders.values()):
            scan.entries[ALL] += [(root / path, label) for path in paths if within(root, path) is not None]
        split_names: tuple[str, ...] = (ALL,)
    else:
        scan = _scan_split_files(splits_dir, root)
        split_names = tuple(name for name in SPLIT_NAMES if name in scan.entries)
    report = _report(scan, root, split_names, empty_in=ALL if splits_dir is None else "train")
    if splits_dir is None:
        not_images, without_images = _left_out(images_dir)
        report = dataclasses.replace(report, not_images=not_images, folders_without_images=without_images)
    return report


@dataclasses.dataclass
class _Scan:
    """What reading the dataset files yields, before any image is opened."""

    classes: tuple[str, ...]
    file_problems: list[str]
    entries: dict[str, list[tuple[Path, int | None]]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list)
    )
    """Split name -> (resolved image inside the images folder, label if valid) for each entry."""
    missing: list[dict] = dataclasses.field(default_factory=list)
    bad_labels: list[dict] = dataclasses.field(default_factory=list)
    outside: list[dict] = dataclasses.field(default_factory=list)
    unlabelled_splits: set[str] = dataclasses.field(default_factory=set)


def _scan_split_files(splits_dir: Path, root: Path) -> _Scan:
    """Every problem of the split files, found by the rules `splits.read_dataset` stops at."""
    classes, info = read_labels(splits_dir)
    scan = _Scan(classes, [])
    problems = list(folder_problems(splits_dir, classes, info))
    for split in SPLIT_NAMES:
        path = splits_dir / f"{split}.txt"
        if path.is_file():
            entries = parse_split_file(path)
            split_problems = list(entry_problems(split, entries, len(classes), root))
            _scan_split(scan, split, entries, split_problems, root)
            problems += split_problems
    scan.file_problems += [problem.message for problem in problems if problem.kind == "file"]
    return scan


def _scan_split(
    scan: _Scan, split: str, entries: list[tuple[str, int | None]], problems: list[Problem], root: Path
) -> None:
    """Adds one split file's problems to scan, and its entries that name an image in the folder
    (with their label when it is valid)."""
    found = {kind: [problem for problem in problems if problem.kind == kind] for kind in _ENTRY_KINDS}
    scan.bad_labels += [_entry(problem, label=problem.label) for problem in found["label"]]
    scan.outside += [_entry(problem) for problem in found["outside"]]
    scan.missing += [_entry(problem) for problem in found["missing"]]
    absent = {problem.line for problem in found["outside"] + found["missing"]}
    bad_label = {problem.line for problem in found["label"]}
    if entries and all(label is None for _, label in entries) and not bad_label:
        scan.unlabelled_splits.add(split)
    scan.entries[split] = [
        ((root / relative).resolve(), None if line in bad_label else label)
        for line, (relative, label) in enumerate(entries, start=1)
        if line not in absent
    ]


_ENTRY_KINDS = ("label", "outside", "missing")


def _entry(problem: Problem, **extra: object) -> dict:
    return {"split": problem.split, "line": problem.line, "path": problem.path, **extra}


def _report(scan: _Scan, root: Path, split_names: tuple[str, ...], empty_in: str) -> DatasetReport:
    listed = {split: scan.entries[split] for split in split_names}
    splits_of = _splits_of(listed)
    files = list(splits_of)
    unreadable = images.find_unreadable(files)
    identical = _identical_groups(files)

    counts = {split: dict.fromkeys(scan.classes, 0) for split in split_names}
    unlabelled: dict[str, int] = collections.Counter()
    for split in split_names:
        for image, label in scan.entries[split]:
            if image in unreadable:
                continue
            if label is not None:
                counts[split][scan.classes[label]] += 1
            elif split in scan.unlabelled_splits:
                unlabelled[split] += 1

    def relative(image: Path) -> str:
        return image.relative_to(root).as_posix()

    return DatasetReport(
        classes=scan.classes,
        images_per_class=counts,
        unreadable=[{"path": relative(image), "reason": reason} for image, reason in unreadable.items()],
        missing=scan.missing,
        bad_labels=scan.bad_labels,
        empty_classes=[name for name in scan.classes if not counts.get(empty_in, {}).get(name)],
        duplicates=[sorted(relative(image) for image in group) for group in identical],
        copies_in_several_splits=_copies_in_several_splits(identical, splits_of, root),
        in_several_splits=[
            {"path": relative(image), "splits": splits}
            for image, splits in splits_of.items()
            if len(splits) > 1
        ],
        outside=scan.outside,
        file_problems=scan.file_problems,
        unlabelled=dict(unlabelled),
        repeated=[
            {"split": split, "path": relative(image), "labels": labels}
            for split, image, labels in _repeated(listed)
        ],
    )


def mixing_problems(dataset: Dataset) -> list[str]:
    """What check-dataset reports as fatal though every image reads: an image in several splits,
    by its name or as identical files under other names (a test image the network trained on
    inflates the run's test figures, a validation one its early stopping), and an image listed
    twice in one split with different labels (trained as two species). The training refuses a
    dataset with any, before it starts.
    """
    listed = {
        name: list(zip(split.paths, split.labels or [None] * len(split.paths), strict=True))
        for name, split in dataset.splits.items()
    }
    root = dataset.images_dir.resolve()
    splits_of = _splits_of(listed)
    return [
        *(
            f"{image.relative_to(root).as_posix()!r} is listed in {' and '.join(splits)}"
            for image, splits in splits_of.items()
            if len(splits) > 1
        ),
        *(
            f"{' and '.join(map(repr, copy['paths']))} are identical files in {' and '.join(copy['splits'])}"
            for copy in _copies_in_several_splits(_identical_groups(list(splits_of)), splits_of, root)
        ),
        *(
            f"{split}.txt lists {image.relative_to(root).as_posix()!r} with labels "
            f"{', '.join(map(str, labels))}"
            for split, image, labels in _repeated(listed)
            if len(set(labels)) > 1
        ),
    ]


def _splits_of(listed: dict[str, list[tuple[Path, int | None]]]) -> dict[Path, list[str]]:
    """Each image listed, with the splits that list it, in order."""
    splits_of: dict[Path, list[str]] = collections.defaultdict(list)
    for split, entries in listed.items():
        for image, _ in entries:
            if split not in splits_of[image]:
                splits_of[image].append(split)
    return splits_of


def _repeated(listed: dict[str, list[tuple[Path, int | None]]]) -> Iterator[tuple[str, Path, list]]:
    """(split, image, the label of each of its entries) of the images listed more than once in a split."""
    for split, entries in listed.items():
        labels: dict[Path, list[int | None]] = collections.defaultdict(list)
        for image, label in entries:
            labels[image].append(label)
        yield from ((split, image, found) for image, found in labels.items() if len(found) > 1)


def _copies_in_several_splits(
    identical: list[list[Path]], splits_of: dict[Path, list[str]], root: Path
) -> list[dict]:
    """{"paths", "splits"}: each group of `identical` files (under different names) that the splits
    list in more than one of them (one name in several splits is `splits_of`'s own case)."""
    copies = []
    for group in identical:
        splits = [split for split in (*SPLIT_NAMES, ALL) if any(split in splits_of[path] for path in group)]
        if len(splits) > 1:
            paths = sorted(path.relative_to(root).as_posix() for path in group)
            copies.append({"paths": paths, "splits": splits})
    return copies


def _identical_groups(files: list[Path], threads: int = 8) -> list[list[Path]]:
    """Groups of files with identical bytes. Only files sharing their size with another are hashed,
    which on real photos is few of them."""
    by_size: dict[int, list[Path]] = collections.defaultdict(list)
    for path in files:
        by_size[path.stat().st_size].append(path)
    candidates = [path for group in by_size.values() if len(group) > 1 for path in group]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        digests = dict(zip(candidates, pool.map(_sha256, candidates), strict=True))
    by_digest: dict[str, list[Path]] = collections.defaultdict(list)
    for path, digest in digests.items():
        by_digest[digest].append(path)
    return sorted((group for group in by_digest.values() if len(group) > 1), key=min)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _class_folders(images_dir: Path) -> list[Path]:
    return sorted(
        (child for child in images_dir.iterdir() if child.is_dir() and not child.name.startswith(".")),
        key=lambda child: child.name,
    )


def _images_in(folder: Path) -> Iterator[Path]:
    """Image files under folder, at any depth (images.files_under: no hidden ones, no links followed)."""
    return (path for path in images.files_under(folder) if images.is_image_name(path))


def _left_out(images_dir: Path) -> tuple[dict[str, int], list[str]]:
    """What the folder layout leaves out that a botanist may count on: the files of the class folders
    that are no images by their suffix (images.not_images), and the class folders without any
    image, whose species drops out of the classes."""
    files = {folder.name: list(images.files_under(folder)) for folder in _class_folders(images_dir)}
    without_images = [name for name, found in files.items() if not any(map(images.is_image_name, found))]
    return images.not_images(path for found in files.values() for path in found), without_images


def _left_out_lines(not_images: dict[str, int], folders_without_images: list[str]) -> list[str]:
    """The report's and the folder split's account of what `_left_out` found."""
    lines = [f"class folder without images: {name}" for name in folders_without_images]
    if not_images:
        lines.append(f"files that are {images.not_images_text(not_images)}")
    return lines


def _folder_classes(images_dir: Path) -> dict[str, list[str]]:
    """Class name -> sorted image paths relative to images_dir, for the sub-folders that hold images."""
    classes = {}
    for folder in _class_folders(images_dir):
        paths = sorted(path.relative_to(images_dir).as_posix() for path in _images_in(folder))
        if paths:
            classes[folder.name] = paths
    return classes


def _folder_problems(images_dir: Path, classes: dict[str, list[str]]) -> list[str]:
    """What keeps a folder-per-class dataset from being written as split files."""
    problems = []
    if len(classes) < 2:
        problems.append(
            f"{images_dir} has {len(classes)} sub-folder(s) with images {sorted(classes)}; at least 2 "
            "are needed, one per class, right under it"
        )
    for name, paths in classes.items():
        problems += [
            f"{text!r} cannot be written to a split file: rename it without leading or trailing spaces, "
            "tabs, line breaks or characters that are not UTF-8"
            for text in (name, *paths)
            if not listable(text)
        ]
    return problems + _links_out(images_dir, classes)


def _links_out(images_dir: Path, classes: dict[str, list[str]]) -> list[str]:
    """The images that symbolic links lead out of images_dir: reading a split refuses them (the
    data folder's guard, splits.entry_problems), so the folder check and split must refuse them too,
    before any training, rather than write split files the training then stops at."""
    root = images_dir.resolve()
    return [
        f"{path!r} leads outside the images folder {images_dir} (a symbolic link): copy the photos into it"
        for paths in classes.values()
        for path in paths
        if within(root, path) is None
    ]


def _check_split_options(fractions: dict[str, float], seed: int) -> None:
    """The training options' own checks (etc/config.yaml), and the one rule across them."""
    specs = config.option_specs("training")
    for name, value in {
        **{f"{split}_fraction": value for split, value in fractions.items()},
        "seed": seed,
    }.items():
        specs[name].check(value)
    if sum(fractions.values()) >= 1:
        raise InputError("test_fraction", "val_fraction + test_fraction must be less than 1")


def _split_class(
    name: str, paths: list[str], fractions: dict[str, float], rng: np.random.Generator
) -> dict[str, list[str]]:
    """One class's images for each split, each part in path order."""
    if len(paths) < 3:
        _LOGGER.warning("Class %r has only %d image(s); all go to train", name, len(paths))
        return {"train": paths}
    counts = _split_counts(len(paths), fractions)
    order = rng.permutation(len(paths))
    parts = np.split(order, np.cumsum([counts["val"], counts["test"]]))
    return {
        split: [paths[i] for i in sorted(part)]
        for split, part in zip(("val", "test", "train"), parts, strict=True)
    }


def _together(parts: dict[str, list[str]], images_dir: Path) -> dict[str, list[str]]:
    """`parts` (one class's images by split) with the copies of each photo moved together: to train
    when one was drawn for it (moving them out could leave the class nothing to train on), else to
    the split of the first copy in path order; each part kept in path order."""
    split_of = {path: split for split, paths in parts.items() for path in paths}
    for group in _identical_groups([images_dir / path for path in split_of]):
        copies = sorted(path.relative_to(images_dir).as_posix() for path in group)
        drawn = [split_of[path] for path in copies]
        for path in copies:
            split_of[path] = "train" if "train" in drawn else drawn[0]
    together: dict[str, list[str]] = collections.defaultdict(list)
    for path in sorted(split_of):
        together[split_of[path]].append(path)
    return together


def _split_counts(count: int, fractions: dict[str, float]) -> dict[str, int]:
    """Images of a class of `count` >= 3 for each non-zero fraction: rounded half up, at least one each,
    and at least one left for train."""
    counts = {
        name: max(1, int(count * fraction + 0.5)) if fraction else 0 for name, fraction in fractions.items()
    }
    while count - sum(counts.values()) < 1:
        largest = max(counts, key=lambda name: counts[name])
        counts[largest] -= 1
    return counts
