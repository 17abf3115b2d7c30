"""The split-file dataset format of the original service, read robustly.

A splits folder holds `classes.txt` (line i names label i, "Genus species"), optional `info.txt` (one
line per class), and `train.txt`, `val.txt`, `test.txt` with one image per line:
`<path relative to the images folder> <label id>`. Paths may contain spaces and '#'; blank lines,
a UTF-8 byte-order mark and Windows line ends are tolerated; test.txt may omit the labels.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Collection
from pathlib import Path

from seeds_tf.core import atomic
from seeds_tf.core.errors import InputError

SPLIT_NAMES = ("train", "val", "test")


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


def read_lines(path: Path) -> list[str]:
    """Non-blank lines of a UTF-8 text file, without line ends or surrounding whitespace."""
    text = path.read_text(encoding="utf-8-sig")
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_split_line(line: str) -> tuple[str, int | None]:
    """Splits `<path> <label id>` at its last whitespace; a line without a trailing integer is
    a path alone (an unlabelled test image), spaces included."""
    head, _, tail = line.replace("\t", " ").rpartition(" ")
    if head.strip() and tail.lstrip("-").isdigit():
        return head.rstrip(), int(tail)
    return line, None


def read_split(path: Path, name: str, images_dir: Path, num_classes: int, field: str) -> Split:
    """Reads one split file and checks every image exists and every label is in range.

    Raises:
        InputError: naming `field`, with the file and line of the first problem found.
    """
    entries = [parse_split_line(line) for line in read_lines(path)]
    if not entries:
        raise InputError(field, f"{path} lists no images")
    labelled = [label is not None for _, label in entries]
    if any(labelled) and not all(labelled):
        line = labelled.index(False) + 1
        raise InputError(field, f"{path}: entry {line} has no label, unlike the others")
    if not all(labelled) and name != "test":
        raise InputError(field, f"{path} has no labels; only test.txt may omit them")
    paths = []
    for number, (relative, label) in enumerate(entries, start=1):
        if label is not None and not 0 <= label < num_classes:
            raise InputError(field, f"{path}: entry {number} has label {label}, outside 0..{num_classes - 1}")
        image = (images_dir / relative).resolve()
        if not image.is_relative_to(images_dir.resolve()):
            raise InputError(field, f"{path}: entry {number} points outside the images folder")
        if not image.is_file():
            raise InputError(field, f"{path}: entry {number} names a missing image {relative!r}")
        paths.append(image)
    labels = tuple(label for _, label in entries) if all(labelled) else None
    return Split(name, tuple(paths), labels)


def read_dataset(splits_dir: Path, images_dir: Path) -> Dataset:
    """Reads and checks a whole splits folder: classes.txt and train.txt are required.

    Raises:
        InputError: naming `splits_directory` or `images_directory`, before any training starts.
    """
    if not images_dir.is_dir():
        raise InputError("images_directory", f"{images_dir} is not a folder")
    if not (splits_dir / "classes.txt").is_file():
        raise InputError("splits_directory", f"{splits_dir} has no classes.txt")
    if not (splits_dir / "train.txt").is_file():
        raise InputError("splits_directory", f"{splits_dir} has no train.txt")
    classes = tuple(read_lines(splits_dir / "classes.txt"))
    if len(classes) < 2:
        raise InputError("splits_directory", f"{splits_dir}/classes.txt names fewer than 2 classes")
    if len(set(classes)) != len(classes):
        raise InputError("splits_directory", f"{splits_dir}/classes.txt repeats a class name")
    info = None
    if (splits_dir / "info.txt").is_file():
        info = tuple(read_lines(splits_dir / "info.txt"))
        if len(info) != len(classes):
            raise InputError(
                "splits_directory",
                f"{splits_dir}/info.txt has {len(info)} lines for {len(classes)} classes",
            )
    splits = {
        name: read_split(splits_dir / f"{name}.txt", name, images_dir, len(classes), "splits_directory")
        for name in SPLIT_NAMES
        if (splits_dir / f"{name}.txt").is_file()
    }
    return Dataset(splits_dir, images_dir, classes, info, splits)


def copy_split_files(splits_dir: Path, destination: Path) -> None:
    """Copies the files that define a dataset into a run, so the run records what it used. Each
    copy is atomic, as every artifact of a run."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("classes", "info", *SPLIT_NAMES):
        source = splits_dir / f"{name}.txt"
        if source.is_file():
            with atomic.replacement(destination / source.name) as temporary:
                shutil.copyfile(source, temporary)
