"""The package's plain files: written atomically, read back with one rule per format.

Writing is atomic (readers never see half a file, and a crash leaves the previous version): every
artifact of a run (models, JSON, pictures, split files, progress) is written through here.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> None:
    """Writes `data` as indented JSON with sorted keys (stable diffs between runs)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(path: Path, text: str) -> None:
    """Writes `text` as UTF-8."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; renamed over `path` when the block
    succeeds, removed when it fails. For writers that need a file name (Keras, matplotlib)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_suffix(path))
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        # mkstemp makes the file private; runs are read by other processes and users.
        temporary.chmod(0o644)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def leftover_temporaries(path: Path) -> Iterator[Path]:
    """The temporaries of `atomic_path(path)` that writers killed mid-write left beside `path`
    (and nothing else there: an editor's `.answers.csv.swp` is not one)."""
    return path.parent.glob(f".{glob.escape(path.name)}.*{glob.escape(_suffix(path))}")


def _suffix(path: Path) -> str:
    """The temporary's suffix: the whole of `path`'s, as Keras insists on names ending in
    ".weights.h5". The temporary's leading dot keeps it out of every listing (runs, checkpoints)
    while it is written."""
    return "".join(path.suffixes)


def read_json(path: Path) -> Any:
    """The JSON document in `path` (UTF-8)."""
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


def read_lines(path: Path, errors: str = "strict", *, keep_blank: int = 0) -> list[str]:
    """Non-blank lines of a UTF-8 text file (a byte-order mark allowed), without line ends or
    surrounding whitespace: the format of classes.txt and the split files. `errors` is open()'s:
    "surrogateescape" keeps file names that are not UTF-8 as the file system has them. Blank lines
    are kept as "" among the first `keep_blank` lines and before the last text line: info.txt's
    line of a class without a description, the last class's too; blank lines after those end it."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig", errors=errors).splitlines()]
    if keep_blank:
        while len(lines) > keep_blank and not lines[-1]:
            lines.pop()
        return lines
    return [line for line in lines if line]
