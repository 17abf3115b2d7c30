"""Run folders under models/: creating them, writing into them atomically, finding complete ones.

A run is `models/<YYYY-mm-dd_HHMMSS>/` with the layout of the original service (ckpts/, conf/, stats/,
logs/, dataset_files/) plus reports/ and `run.json`. `run.json` is written last, by an atomic rename:
a run without it died half-way and is never offered for prediction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from seeds_tf import __version__
from seeds_tf.errors import InputError

RUN_ID_FORMAT = "%Y-%m-%d_%H%M%S"
_RUN_ID_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}_\d{6}")


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """The paths inside one run folder."""

    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def conf_file(self) -> Path:
        return self.root / "conf" / "conf.json"

    @property
    def stats_file(self) -> Path:
        return self.root / "stats" / "stats.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def dataset_dir(self) -> Path:
        return self.root / "dataset_files"

    @property
    def ckpts_dir(self) -> Path:
        return self.root / "ckpts"

    @property
    def final_model(self) -> Path:
        return self.ckpts_dir / "final.keras"

    @property
    def best_model(self) -> Path:
        return self.ckpts_dir / "best.keras"

    @property
    def backup_dir(self) -> Path:
        """Training state of an unfinished run, from which it resumes."""
        return self.ckpts_dir / "backup"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def summary_file(self) -> Path:
        return self.root / "run.json"

    def is_complete(self) -> bool:
        return self.summary_file.is_file()


def create_run(models_dir: Path, now: datetime.datetime | None = None) -> RunLayout:
    """Makes a new, empty run folder named after the current time.

    Two runs started in the same second (two DEEPaaS workers) get consecutive seconds: `mkdir` is
    atomic, so the first one to claim a name keeps it.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    moment = (now or datetime.datetime.now()).replace(microsecond=0)
    while True:
        root = models_dir / moment.strftime(RUN_ID_FORMAT)
        try:
            root.mkdir()
        except FileExistsError:
            moment += datetime.timedelta(seconds=1)
            continue
        layout = RunLayout(root)
        for folder in (
            layout.conf_file.parent,
            layout.stats_file.parent,
            layout.logs_dir,
            layout.dataset_dir,
            layout.ckpts_dir,
            layout.reports_dir,
        ):
            folder.mkdir()
        return layout


def complete_runs(models_dir: Path) -> list[str]:
    """Ids of the complete runs inside models_dir, oldest first."""
    return [layout.run_id for layout in _run_folders(models_dir) if layout.is_complete()]


def incomplete_runs(models_dir: Path) -> list[str]:
    """Ids of the runs that died or are still training (no run.json), oldest first."""
    return [
        layout.run_id
        for layout in _run_folders(models_dir)
        if not layout.is_complete() and layout.conf_file.is_file()
    ]


def resolve_checkpoint(layout: RunLayout, name: str, field: str = "ckpt_name") -> Path:
    """The model file of checkpoint `name` of a run; only names from the listing are accepted.

    Raises:
        InputError: naming `field`, listing the checkpoints that exist.
    """
    available = checkpoint_names(layout)
    if name not in available:
        raise InputError(field, f"run {layout.run_id} has no checkpoint {name!r}. Available: {available}")
    return layout.ckpts_dir / f"{name}.keras"


def checkpoint_names(layout: RunLayout) -> list[str]:
    """The models saved in a run's ckpts/, by name without extension ("final", "best", "epoch_0005")."""
    return sorted(path.stem for path in layout.ckpts_dir.glob("*.keras") if not path.name.startswith("."))


def resolve_run(models_dir: Path, run_id: str, field: str = "timestamp") -> RunLayout:
    """The complete run called `run_id`, or the newest one when `run_id` is empty.

    Raises:
        InputError: naming `field`, when no such complete run exists; the message lists the runs that do.
    """
    available = complete_runs(models_dir)
    if not run_id:
        if not available:
            raise InputError(field, f"no trained run in {models_dir}; train one first")
        return RunLayout(models_dir / available[-1])
    if run_id not in available:
        # Only names from the listing are accepted: '..', absolute paths and links out of models/
        # never match, so they cannot reach the file system.
        raise InputError(field, f"unknown run {run_id!r}. Available: {available or 'none'}")
    return RunLayout(models_dir / run_id)


def resolve_interrupted_run(models_dir: Path, run_id: str, field: str = "resume") -> RunLayout:
    """The interrupted run called `run_id` (it has a conf.json but no run.json), to resume.

    Raises:
        InputError: naming `field`, when `run_id` is complete or not an interrupted run of models_dir.
    """
    if run_id not in incomplete_runs(models_dir):
        if run_id in complete_runs(models_dir):
            raise InputError(field, f"run {run_id!r} is complete")
        raise InputError(
            field, f"no interrupted run {run_id!r}. Interrupted: {incomplete_runs(models_dir) or 'none'}"
        )
    return RunLayout(models_dir / run_id)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; renamed over `path` when the block
    succeeds, removed when it fails. Readers never see half a file, and a crash leaves the previous
    version in place. Every artifact of a run (models, JSON, pictures) is written through this."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
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


def write_conf(layout: RunLayout, conf: dict[str, Any]) -> None:
    """Writes the run's resolved configuration, with the seeds_tf version that made it."""
    write_json_atomic(layout.conf_file, {**conf, "seeds_tf_version": __version__})


def mark_complete(
    layout: RunLayout, *, modelname: str, image_size: int, num_classes: int, metrics: dict, **details: Any
) -> None:
    """Writes run.json, the last step of a run: from then on the run is offered for prediction.

    It records what the prediction side and the metadata need: the model, its classes, its
    checkpoints and test metrics, plus any `details` of how the run came to be.
    """
    write_json_atomic(
        layout.summary_file,
        {
            "run_id": layout.run_id,
            "created": layout.run_id,
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "modelname": modelname,
            "image_size": image_size,
            "num_classes": num_classes,
            "checkpoints": checkpoint_names(layout),
            "metrics": metrics,
            "seeds_tf_version": __version__,
            **details,
        },
    )


def _run_folders(models_dir: Path) -> list[RunLayout]:
    if not models_dir.is_dir():
        return []
    return sorted(
        (
            RunLayout(entry)
            for entry in models_dir.iterdir()
            if _RUN_ID_PATTERN.fullmatch(entry.name) and _inside(entry, models_dir)
        ),
        key=lambda layout: layout.run_id,
    )


def _inside(entry: Path, models_dir: Path) -> bool:
    """False for a symbolic link that leads out of models_dir."""
    return entry.resolve().parent == models_dir.resolve()
