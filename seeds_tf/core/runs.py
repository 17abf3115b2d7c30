"""Run folders under models/: creating them, writing into them atomically, finding complete ones.

A run is `models/<YYYY-mm-dd_HHMMSS>/` with the layout of the original service (ckpts/, conf/, stats/,
logs/, dataset_files/) plus reports/ and `run.json`. `run.json` is written last, by an atomic rename:
a run without it died half-way and is never offered for prediction. A complete run whose files were
damaged afterwards (a truncated model, a run.json that is not JSON) is listed as broken, with the
reason, and skipped: the other runs keep serving. A run without it is in progress only while a
process trains it (mark_in_progress); its stats/progress.json then says how far it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from seeds_tf import __version__
from seeds_tf.core import files
from seeds_tf.core.config import RunConfig
from seeds_tf.core.errors import InputError

RUN_ID_FORMAT = "%Y-%m-%d_%H%M%S"
_RUN_ID_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}_\d{6}")

STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
)
"""OS errors that mean the models folder cannot take what is written: full disk, exhausted quota,
file size limit, read-only file system, no permission, a file where the folder should be."""


PROMOTED_FILE = "promoted.json"
"""In the models folder: the run that serves by default, as chosen with `seeds-tf promote`."""

EXPORTS_INDEX = "exports.json"
"""In exports/: each export's agreement with the Keras model, and the engine the run serves with."""

INDEX_REFERENCES = "references.json"
"""In index/: the paths and labels of the reference specimens, written after their embeddings, so
an index without it is incomplete (seeds_tf.prediction.neighbours)."""


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """The paths inside one run folder, and the readers of what they hold: every part of seeds_tf
    reads a run's configuration, classes and summary through these."""

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
    def progress_file(self) -> Path:
        """How far the run's training is (seeds_tf.learning.progress), rewritten as it trains."""
        return self.root / "stats" / "progress.json"

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
    def exports_dir(self) -> Path:
        """The final model for other runtimes (`seeds-tf export`), and exports.json about them."""
        return self.root / "exports"

    @property
    def backup_dir(self) -> Path:
        """Training state of an unfinished run, from which it resumes."""
        return self.ckpts_dir / "backup"

    @property
    def backup_state(self) -> Path:
        """The last epoch backed up and the name of its weights file in backup_dir."""
        return self.backup_dir / "state.json"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def calibration_file(self) -> Path:
        """Optional: the temperature and the decision thresholds fitted after training
        (seeds_tf.prediction.calibration); a run without it answers uncalibrated."""
        return self.root / "calibration.json"

    @property
    def index_dir(self) -> Path:
        """Optional: the embeddings of the run's training images, the reference specimens behind
        an answer (seeds_tf.prediction.neighbours)."""
        return self.root / "index"

    @property
    def has_index(self) -> bool:
        """Whether the run's index is complete (its INDEX_REFERENCES, written last, is there)."""
        return (self.index_dir / INDEX_REFERENCES).is_file()

    @property
    def summary_file(self) -> Path:
        return self.root / "run.json"

    @property
    def classes_file(self) -> Path:
        return self.dataset_dir / "classes.txt"

    @property
    def info_file(self) -> Path:
        """Optional: one description per class, in the order of classes.txt."""
        return self.dataset_dir / "info.txt"

    def is_complete(self) -> bool:
        return self.summary_file.is_file()

    def config(self) -> RunConfig:
        """The run's resolved configuration (conf/conf.json); options added to seeds_tf since the
        run was made take their defaults."""
        return RunConfig.from_dict(files.read_json(self.conf_file))

    def classes(self) -> tuple[str, ...]:
        """The class names, in the order of the model's outputs."""
        return tuple(files.read_lines(self.classes_file))

    def info(self) -> tuple[str, ...] | None:
        """The classes' descriptions (info.txt), or None when the run has none."""
        if not self.info_file.is_file():
            return None
        return tuple(files.read_lines(self.info_file, keep_blank=len(self.classes())))

    def summary(self) -> dict[str, Any]:
        """run.json: how the run came to be, its checkpoints and test metrics."""
        return files.read_json(self.summary_file)


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


@dataclasses.dataclass(frozen=True)
class RunListing:
    """The complete runs of a models folder, sorted into those that can serve and those that cannot.

    Attributes:
        working: run id -> its run.json, oldest first.
        broken: run id -> why it cannot serve, oldest first.
    """

    working: dict[str, dict[str, Any]]
    broken: dict[str, str]

    def broken_list(self) -> list[dict[str, str]]:
        """The broken runs as [{"run_id", "reason"}], for JSON answers."""
        return [{"run_id": run_id, "reason": reason} for run_id, reason in self.broken.items()]


def list_runs(models_dir: Path) -> RunListing:
    """The complete runs of models_dir, each checked cheaply, without loading a model: run.json and
    conf/conf.json must be JSON objects, dataset_files/classes.txt must exist, and ckpts/final.keras
    must be a whole Keras archive (its zip directory is read). Damage these checks cannot see
    (corrupt weights inside a sound archive) shows when the model is loaded for prediction."""
    working: dict[str, dict[str, Any]] = {}
    broken: dict[str, str] = {}
    for layout in _run_folders(models_dir):
        if not layout.is_complete():
            continue
        problem, summary = _check_run(layout)
        if problem is None:
            working[layout.run_id] = summary
        else:
            broken[layout.run_id] = problem
    return RunListing(working, broken)


def complete_runs(models_dir: Path) -> list[str]:
    """Ids of the complete runs inside models_dir (broken ones included), oldest first."""
    return [layout.run_id for layout in _run_folders(models_dir) if layout.is_complete()]


def incomplete_runs(models_dir: Path) -> list[str]:
    """Ids of the runs that died or are still training (no run.json), oldest first."""
    return [
        layout.run_id
        for layout in _run_folders(models_dir)
        if not layout.is_complete() and layout.conf_file.is_file()
    ]


def interrupted_runs(models_dir: Path) -> list[str]:
    """Ids of the runs whose training died (killed, cancelled, crashed), oldest first: the runs to
    finish with `resume=<id>`, which no other listing names."""
    return [
        run_id for run_id in incomplete_runs(models_dir) if not _being_trained(RunLayout(models_dir / run_id))
    ]


def trainings_in_progress(models_dir: Path) -> list[dict[str, Any]]:
    """The progress of each run being trained now (its progress.json with its `run_id`), oldest
    first. A run whose training died (killed, cancelled, failed) is not among them, whatever its
    progress file says: it is in progress only while a process holds it (mark_in_progress)."""
    found = []
    for layout in _run_folders(models_dir):
        if layout.is_complete() or not _being_trained(layout):
            continue
        with contextlib.suppress(OSError, ValueError):  # not written yet, or not JSON
            found.append({**files.read_json(layout.progress_file), "run_id": layout.run_id})
    return found


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
    """The working run called `run_id`, or the newest working one when `run_id` is empty.

    Raises:
        InputError: naming `field`, when no such run exists or it is broken; the message lists the
            working runs.
    """
    listing = list_runs(models_dir)
    available = list(listing.working)
    if not run_id:
        if not available:
            broken = f" (broken: {listing.broken})" if listing.broken else ""
            raise InputError(field, f"no trained run in {models_dir}{broken}; train one first")
        return RunLayout(models_dir / default_order(models_dir, listing)[0])
    if run_id in listing.broken:
        raise InputError(
            field, f"run {run_id!r} is broken: {listing.broken[run_id]}. Working runs: {available or 'none'}"
        )
    if run_id not in available:
        # Only names from the listing are accepted: '..', absolute paths and links out of models/
        # never match, so they cannot reach the file system.
        raise InputError(field, f"unknown run {run_id!r}. Available: {available or 'none'}")
    return RunLayout(models_dir / run_id)


def promote(models_dir: Path, run_id: str) -> dict[str, str]:
    """Makes the working run `run_id` the one served when a request names none.

    Raises:
        InputError: naming `run`, for a run that is not a working run of models_dir.
    """
    if not run_id:
        raise InputError("run", "expected the id of a working run")
    layout = resolve_run(models_dir, run_id, field="run")
    record = {"run_id": layout.run_id, "promoted": datetime.datetime.now().isoformat(timespec="seconds")}
    files.write_json(models_dir / PROMOTED_FILE, record)
    return record


def promoted_run(models_dir: Path) -> str | None:
    """The promoted run's id, or None when none was promoted (or the record is unreadable)."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        return str(files.read_json(models_dir / PROMOTED_FILE)["run_id"])
    return None


def default_order(models_dir: Path, listing: RunListing) -> list[str]:
    """The working runs in the order a request that names no run tries them: the promoted run; then
    the newest runs trained by their operator (CLI, demo, import); then the newest candidates (runs
    trained through the API, which anyone who can reach it may start), so that a remote training
    never silently becomes what everyone is served while another run exists."""
    promoted = promoted_run(models_dir)
    newest_first = list(reversed(listing.working))
    operators = [run for run in newest_first if not listing.working[run].get("candidate")]
    candidates = [run for run in newest_first if listing.working[run].get("candidate")]
    first = [promoted] if promoted in listing.working else []
    return first + [run for run in operators + candidates if run != promoted]


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


@contextlib.contextmanager
def storage_errors(models_dir: Path) -> Iterator[None]:
    """Reports a failure to write into models_dir (disk full, quota, file size limit, read-only,
    no permission) as an InputError naming the folder and the OS error, instead of a traceback from
    deep inside Keras or h5py. The operator can fix it; the runs already there are untouched, since
    every artifact is written beside its final name and renamed.

    Raises:
        InputError: naming `models_dir`.
    """
    try:
        yield
    except InputError:
        raise
    except Exception as error:
        cause = _storage_cause(error, models_dir)
        if cause is None:
            raise
        code = errno.errorcode.get(cause.errno, str(cause.errno))
        where = f" while writing {cause.filename}" if cause.filename else ""
        raise InputError(
            "models_dir",
            f"cannot write into the models folder {models_dir}{where}: {os.strerror(cause.errno)} ({code})",
        ) from error


def write_conf(layout: RunLayout, conf: dict[str, Any]) -> None:
    """Writes the run's resolved configuration, with the seeds_tf version that made it."""
    files.write_json(layout.conf_file, {**conf, "seeds_tf_version": __version__})


@contextlib.contextmanager
def mark_in_progress(layout: RunLayout) -> Iterator[None]:
    """Marks the run as being trained for the block: a lock on a file of the run, which the kernel
    releases when the process ends, killed or not (trainings_in_progress)."""
    path = _progress_lock(layout)
    with open(path, "a+") as lock:
        # Blocks only while a reader checks the lock, for an instant.
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def mark_complete(layout: RunLayout, *, metrics: dict, **details: Any) -> None:
    """Writes run.json, the last step of a run: from then on the run is offered for prediction.

    It records the run's checkpoints and test metrics, plus any `details` of how the run came to
    be; the model and its classes stay in conf.json and classes.txt, read through RunLayout.
    """
    files.write_json(
        layout.summary_file,
        {
            "run_id": layout.run_id,
            "created": layout.run_id,
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "checkpoints": checkpoint_names(layout),
            "metrics": metrics,
            "seeds_tf_version": __version__,
            **details,
        },
    )


class _BrokenRun(Exception):
    """Why a complete run cannot serve."""


def _check_run(layout: RunLayout) -> tuple[str | None, dict[str, Any]]:
    """(problem or None, the run's description) of a complete run: its run.json with the model,
    image size and number of classes read from the run's configuration and classes."""
    try:
        summary = _read(layout.summary, "run.json")
        if not isinstance(summary, dict):
            raise _BrokenRun("run.json is not a JSON object")
        model = _read(lambda: layout.config().model, "conf/conf.json")
        classes = _read(layout.classes, "dataset_files/classes.txt")
        info = _read(layout.info, "dataset_files/info.txt")
        if info is not None and len(info) != len(classes):
            raise _BrokenRun(f"dataset_files/info.txt has {len(info)} lines for {len(classes)} classes")
    except _BrokenRun as broken:
        return str(broken), {}
    description = {**summary, "modelname": model.modelname, "image_size": model.image_size}
    return _model_file_problem(layout.final_model), {**description, "num_classes": len(classes)}


def _read(reader: Callable[[], Any], name: str) -> Any:
    """What `reader` reads from the run file `name`, or _BrokenRun saying why it cannot."""
    try:
        return reader()
    except FileNotFoundError:
        raise _BrokenRun(f"{name} is missing") from None
    except InputError as error:  # options that this seeds_tf refuses
        raise _BrokenRun(f"{name} holds an invalid configuration: {error}") from None
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
        raise _BrokenRun(f"{name} is unreadable: {error}") from None
    except (AttributeError, TypeError) as error:  # JSON of the wrong shape
        raise _BrokenRun(f"{name} is not a run's {name}: {error}") from None


def _progress_lock(layout: RunLayout) -> Path:
    return layout.progress_file.with_name(".progress.lock")


def _being_trained(layout: RunLayout) -> bool:
    """Whether a process holds the run's mark_in_progress lock."""
    try:
        with open(_progress_lock(layout)) as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # FileNotFoundError: no process ever held it, or the last one has finished
        return False
    return False


def _model_file_problem(path: Path) -> str | None:
    """Why `path` is not a whole .keras file (missing, truncated, not a zip archive, without the
    model config or weights), or None. Reads only the archive's directory."""
    name = f"{path.parent.name}/{path.name}"
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except FileNotFoundError:
        return f"{name} is missing"
    except (OSError, zipfile.BadZipFile) as error:
        return f"{name} is not a whole Keras model file ({error})"
    if "config.json" not in members or not any(member.startswith("model.weights") for member in members):
        return f"{name} is not a whole Keras model file (no config or weights inside)"
    return None


def _storage_cause(error: BaseException | None, models_dir: Path) -> OSError | None:
    """The OSError behind `error` (itself, or its cause or context) that says models_dir cannot be
    written; None when there is none, or it concerns a file outside models_dir (an input)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            filename = error.filename
            if not isinstance(filename, str | bytes | os.PathLike) or _within(filename, models_dir):
                return error
        error = error.__cause__ or error.__context__
    return None


def _within(filename: str | bytes | os.PathLike, folder: Path) -> bool:
    return Path(os.fsdecode(filename)).resolve().is_relative_to(folder.resolve())


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
