"""Whether a training may start: one at a time per models folder, and only if its run fits on disk.

Anyone who can reach a trainable service can start a training. Trainings queued without limit, or a
run that fills the disk half-way, would take the service from everyone else: a second training is
refused while one runs (a lock on the models folder, released by the kernel even when the worker is
killed), and a run whose checkpoints would not fit in the free disk is refused before it starts.
A server admits a training request with a reservation (a second lock, `reserve_training`), held from
the request until the training ends, since its worker takes the training lock only when it starts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from seeds_tf.core import runs
from seeds_tf.core.errors import InputError

LOCK_FILE = ".training.lock"
RESERVATION_FILE = ".training.reserved"
_BUSY = (errno.EAGAIN, errno.EACCES)


@contextlib.contextmanager
def training_slot(models_dir: Path) -> Iterator[None]:
    """Holds the models folder's training lock for the block.

    Raises:
        InputError: naming `training`, while another training holds it.
    """
    with _locked(models_dir, LOCK_FILE) as lock:
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def reserve_training(models_dir: Path) -> Callable[[], None]:
    """Admits a training request, in the server process, at once and atomically.

    The worker that runs a queued training takes the training lock only when it starts: two requests
    close together both found it free, both were accepted, and the second training then failed. A
    reservation is a lock of its own, taken by the request: until it is released, every other request
    to train in the models folder, from this server or another, is refused.

    The reservation is taken before the training lock is looked at: that look holds the lock shared
    for an instant, and a worker of an admitted training taking it at that instant failed, while
    the request that looked was refused anyway.

    Returns:
        The release of the reservation, to call once the training has ended (done, failed or cancelled).

    Raises:
        InputError: naming `training`, while another training is reserved or runs; naming
            `models_dir`, when the models folder cannot be written.
    """
    release = _locked(models_dir, RESERVATION_FILE).close
    try:
        check_no_training(models_dir)
    except BaseException:
        release()
        raise
    return release


@contextlib.contextmanager
def reserved(models_dir: Path) -> Iterator[None]:
    """Holds a reservation (`reserve_training`) for the block: a training started outside a server,
    from the command line, is admitted as a server's request is, and servers refuse meanwhile.

    Raises:
        InputError: as reserve_training.
    """
    release = reserve_training(models_dir)
    try:
        yield
    finally:
        release()


def check_no_training(models_dir: Path) -> None:
    """Refuses, in the server process, a training request while a training runs.

    Raises:
        InputError: naming `training`, as training_slot would; naming `models_dir`, when the models
            folder is a file.
    """
    with (
        runs.storage_errors(models_dir),
        contextlib.suppress(FileNotFoundError),
        open(models_dir / LOCK_FILE) as lock,
    ):
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in _BUSY:
                raise InputError("training", _busy(models_dir)) from None
            raise


def run_bytes(parameters: int, periodic_checkpoints: int) -> int:
    """The disk a run takes at its peak, from its number of weights.

    A checkpoint holds the float32 weights (4 bytes each); final.keras and best.keras are two, plus
    the periodic ones kept. The per-epoch backup holds the weights and Adam's two moments, and an
    atomic rewrite keeps the old backup until the new one is complete: six copies. Logs, reports
    and the temporary beside a file being written: 10% and 64 MiB more.
    """
    weights = 4 * parameters
    return math.ceil(weights * (2 + periodic_checkpoints + 6) * 1.1) + 64 * 2**20


def check_disk(models_dir: Path, needed: int) -> None:
    """Refuses a run that would not fit in the free space of the models folder's file system.

    Raises:
        InputError: naming `models_dir`, with what is needed and what is free.
    """
    existing = models_dir
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise InputError(
            "models_dir",
            f"the run needs about {needed / 2**20:.0f} MiB and {models_dir} has {free / 2**20:.0f} MiB "
            "free: free some space, or keep fewer checkpoints (ckpt_freq, keep_checkpoints)",
        )


def _locked(models_dir: Path, name: str) -> TextIO:
    """The lock file `name` of the models folder, opened and exclusively locked by this open: a lock
    held by another process, or by another open in this one, refuses it.

    Raises:
        InputError: naming `training`, while the lock is held; naming `models_dir`, when the lock
            file cannot be made there (a read-only or full models folder).
    """
    with runs.storage_errors(models_dir):
        if not models_dir.exists():  # a file in its place: the open names it (ENOTDIR)
            models_dir.mkdir(parents=True, exist_ok=True)
        lock = open(models_dir / name, "a+")  # noqa: SIM115 - the caller holds it open as the lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        lock.close()
        if error.errno not in _BUSY:
            raise
        raise InputError("training", _busy(models_dir)) from None
    return lock


def _busy(models_dir: Path) -> str:
    return f"another training is running in {models_dir}: wait for it to finish, or cancel it, then try again"
