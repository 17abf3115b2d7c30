"""The split-file dataset format of the original service, read robustly.

A splits folder holds `classes.txt` (line i names label i, "Genus species"), optional `info.txt` (one
line per class, blank for a class without a description), and `train.txt`, `val.txt`, `test.txt`
with one image per line: `<path relative to the images folder> <label id>`. Paths may contain
spaces and '#'; blank lines, a UTF-8 byte-order mark and Windows line ends are tolerated; test.txt
may omit the labels. A run's own copy may hold `calibration.txt` too (CALIBRATION_SPLIT).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import shutil
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import numpy as np

from seeds_tf.core import files
from seeds_tf.core.errors import InputError

SPLIT_NAMES = ("train", "val", "test")

CALIBRATION_SPLIT = "calibration"
"""The labelled images a training holds out of train.txt to calibrate the run on when the dataset has
no validation split (stratified_hold_out): `calibration.txt` in the run's dataset files, beside the
train.txt it was taken from, so the run records that the model never trained on them."""

_READ_SPLITS = (*SPLIT_NAMES, CALIBRATION_SPLIT)
"""The split files read_dataset reads and copy_split_files copies, where present."""

_LABEL = re.compile(r"-?[0-9]+")
"""A label id as split files write it: ASCII digits (str.isdigit also takes "²"), one sign at most."""


@dataclasses.dataclass(frozen=True)
class Split:
    """The images of one split, with their labels (None for an unlabelled test split)."""

    name: str
    paths: tuple[Path, ...]
    labels: tuple[int, ...] | None

    def without(self, excluded: Collection[Path]) -> Split:
        """This split less the images in `excluded`."""
        keep = [i for i, path in enumerate(self.paths) if path not in excluded]
        labels = None if self.labels is None else tuple(self.labels[i] for i in keep)
        return Split(self.name, tuple(self.paths[i] for i in keep), labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset as the split files describe it; every listed image exists."""

    splits_dir: Path
    images_dir: Path
    classes: tuple[str, ...]
    info: tuple[str, ...] | None
    splits: dict[str, Split]

    def split(self, name: str) -> Split | None:
        return self.splits.get(name)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset's files. `splits.read_dataset` stops at the first one;
    `datasets.check_dataset` collects them all.

    Attributes:
        kind: "file" (the dataset files themselves), "label" (missing or out of range), "outside"
            (a path leaving the images folder) or "missing" (no such image).
        message: what is wrong, naming the file (relative to the splits folder) and the entry.
        split, line, path, label: the entry at fault ("line" counts non-blank lines), for entries.
    """

    kind: str
    message: str
    split: str | None = None
    line: int | None = None
    path: str | None = None
    label: int | None = None


def parse_split_line(line: str) -> tuple[str, int | None]:
    """Splits `<path> <label id>` at its last whitespace; a line without a trailing integer is
    a path alone (an unlabelled test image), spaces included."""
    head, _, tail = line.replace("\t", " ").rpartition(" ")
    if head.strip() and _LABEL.fullmatch(tail):
        return head.rstrip(), int(tail)
    return line, None


def parse_split_file(path: Path, field: str = "splits_directory") -> list[tuple[str, int | None]]:
    """The (path, label or None) entries of a split file.

    Raises:
        InputError: naming `field`, for a file that is not UTF-8 text.
    """
    return [parse_split_line(line) for line in _text_lines(path, field)]


def _text_lines(path: Path, field: str, keep_blank: int = 0) -> list[str]:
    """files.read_lines of a dataset file; one written in another encoding (cp1252 from an old
    Windows tool) is refused naming it, rather than a UnicodeDecodeError's traceback."""
    try:
        return files.read_lines(path, keep_blank=keep_blank)
    except UnicodeDecodeError as error:
        raise InputError(
            field, f"{path} is not UTF-8 text (at byte {error.start}): save it as UTF-8"
        ) from None


def read_labels(splits_dir: Path) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """The class names (classes.txt) and their descriptions (info.txt, optional), unchecked.

    Raises:
        InputError: naming `splits_directory` when there is no classes.txt.
    """
    if not (splits_dir / "classes.txt").is_file():
        raise InputError("splits_directory", f"{splits_dir} has no classes.txt")
    classes = tuple(_text_lines(splits_dir / "classes.txt", "splits_directory"))
    info_file = splits_dir / "info.txt"
    info = tuple(_text_lines(info_file, "splits_directory", len(classes))) if info_file.is_file() else None
    return classes, info


def folder_problems(
    splits_dir: Path, classes: tuple[str, ...], info: tuple[str, ...] | None
) -> Iterator[Problem]:
    """Problems of the dataset files as a whole: those of label_problems, and no train.txt."""
    yield from label_problems(classes, info)
    if not (splits_dir / "train.txt").is_file():
        yield Problem("file", "there is no train.txt")


def label_problems(classes: tuple[str, ...], info: tuple[str, ...] | None) -> Iterator[Problem]:
    """Problems of the class names and descriptions: too few or repeated classes, an info.txt of
    the wrong length. A trained model's (an imported run's) too, which needs no train.txt."""
    if len(classes) < 2:
        yield Problem("file", f"classes.txt names {len(classes)} class(es): fewer than 2 classes")
    for name, count in collections.Counter(classes).items():
        if count > 1:
            yield Problem("file", f"classes.txt repeats {name!r}")
    if info is not None and len(info) != len(classes):
        yield Problem("file", f"info.txt has {len(info)} lines for {len(classes)} classes")


def entry_problems(
    split: str, entries: list[tuple[str, int | None]], num_classes: int, images_dir: Path
) -> Iterator[Problem]:
    """Problems of one split file's entries, in file order: an empty file, a missing or
    out-of-range label (only test.txt may omit all its labels), a path leaving `images_dir`, a
    missing image."""
    if not entries:
        yield Problem("file", f"{split}.txt lists no images", split)
    unlabelled = [label is None for _, label in entries]
    labels_optional = split == "test" and all(unlabelled)
    why_unlabelled = "unlike the others" if not all(unlabelled) else "only test.txt may omit them"
    root = images_dir.resolve()
    for line, (relative, label) in enumerate(entries, start=1):
        entry = {"split": split, "line": line, "path": relative}
        if label is None and not labels_optional:
            yield Problem("label", f"{split}.txt entry {line} has no label, {why_unlabelled}", **entry)
        elif label is not None and not 0 <= label < num_classes:
            message = f"{split}.txt entry {line} has label {label}, outside 0..{num_classes - 1}"
            yield Problem("label", message, label=label, **entry)
        image = within(root, relative)
        if image is None:
            yield Problem("outside", f"{split}.txt entry {line} points outside the images folder", **entry)
        elif not image.is_file():
            yield Problem("missing", f"{split}.txt entry {line} names a missing image {relative!r}", **entry)


def within(root: Path, relative: str) -> Path | None:
    """The image at `relative` under the resolved images folder `root`, resolved; None when it lies
    outside (`..`, or a symbolic link leading out): the data folder's guard, for split files and
    class folders alike."""
    image = (root / relative).resolve()
    return image if image.is_relative_to(root) else None


def read_split(path: Path, name: str, images_dir: Path, num_classes: int, field: str) -> Split:
    """Reads one split file and checks every image exists and every label is in range.

    Raises:
        InputError: naming `field`, with the file and entry of the first problem found.
    """
    entries = parse_split_file(path, field)
    problem = next(entry_problems(name, entries, num_classes, images_dir), None)
    if problem is not None:
        raise InputError(field, f"{path.parent}: {problem.message}")
    paths = tuple((images_dir / relative).resolve() for relative, _ in entries)
    labels = tuple(label for _, label in entries)
    return Split(name, paths, None if None in labels else labels)


def read_dataset(splits_dir: Path, images_dir: Path) -> Dataset:
    """Reads and checks a whole splits folder: classes.txt and train.txt are required.

    Raises:
        InputError: naming `splits_directory` or `images_directory`, before any training starts.
    """
    if not images_dir.is_dir():
        raise InputError("images_directory", f"{images_dir} is not a folder")
    classes, info = read_labels(splits_dir)
    problem = next(folder_problems(splits_dir, classes, info), None)
    if problem is not None:
        raise InputError("splits_directory", f"{splits_dir}: {problem.message}")
    splits = {
        name: read_split(splits_dir / f"{name}.txt", name, images_dir, len(classes), "splits_directory")
        for name in _READ_SPLITS
        if (splits_dir / f"{name}.txt").is_file()
    }
    return Dataset(splits_dir, images_dir, classes, info, splits)


def write_split_files(
    destination: Path,
    classes: list[str],
    entries: dict[str, list[tuple[str, int]]],
    info: list[str] | None = None,
) -> None:
    """Writes classes.txt, info.txt (when given) and one `<split>.txt` per non-empty split of
    `entries` (split name -> (path relative to the images folder, label)), atomically. The one
    writer of the format: what it writes, `read_dataset` reads back unchanged."""
    named = {
        "classes": classes,
        "info": info or [],
        **{split: [f"{path} {label}" for path, label in lines] for split, lines in entries.items()},
    }
    for name, lines in named.items():
        if lines:
            files.write_text(destination / f"{name}.txt", "".join(f"{line}\n" for line in lines))


def stratified_hold_out(
    entries: Sequence[tuple[str, int]], fraction: float, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Splits labelled entries into (kept, held out), the held-out part a seeded, stratified share.

    About `fraction` of the entries are held out, at least 2 (a calibration needs 2 images) when
    `fraction` > 0, each class in proportion to its size: an entry's rank in its class (shuffled by
    a generator seeded with `seed`), plus a half, divided by the class's size orders all entries, and
    the lowest are held out. The last entry of every class is never held out, so no class leaves training.
    An image listed more than once (weighed more in training) is held out, or kept, with all its
    lines: a copy left in training would be calibrated on. Both parts keep the entries' order.

    Args:
        entries: (path, label) pairs, as parse_split_file reads them from a labelled split.
        fraction: the share to hold out, in [0, 1); 0 holds nothing out.
        seed: the same seed and entries hold out the same images.

    Returns:
        The kept entries and the held-out ones; nothing is held out when fewer than 2 entries can be.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"Expected 0 <= fraction < 1. Received: fraction={fraction!r}")
    images = list(dict.fromkeys(entries))  # each (path, label) once, in the entries' order
    labels = np.asarray([label for _, label in images], dtype=np.int64)
    rng = np.random.default_rng(seed)
    position = np.full(len(images), np.inf)  # inf: never held out
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        ranks = np.arange(len(members))
        position[members[:-1]] = (ranks[:-1] + 0.5) / len(members)
    available = int(np.isfinite(position).sum())
    count = min(max(2, round(fraction * len(images))), available) if fraction > 0 else 0
    if count < 2:
        return list(entries), []
    # Ties (equal shares of classes of equal size) are broken at random too, not by file order.
    held = {images[i] for i in np.lexsort((rng.random(len(images)), position))[:count].tolist()}
    return [entry for entry in entries if entry not in held], [entry for entry in entries if entry in held]


def listable(text: str) -> bool:
    """Whether text reads back unchanged from a split file, which strips lines, treats tabs as spaces
    and is UTF-8: a file name in another encoding (a Latin-1 'caf\\xe9.jpg' from an old archive),
    which Python holds with surrogates, cannot be written to one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return text == text.strip() and len(text.splitlines()) == 1 and "\t" not in text


def copy_split_files(splits_dir: Path, destination: Path) -> None:
    """Copies the files that define a dataset into a run, so the run records what it used. Each
    copy is atomic, as every artifact of a run."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("classes", "info", *_READ_SPLITS):
        source = splits_dir / f"{name}.txt"
        if source.is_file():
            with files.atomic_path(destination / source.name) as temporary:
                shutil.copyfile(source, temporary)
