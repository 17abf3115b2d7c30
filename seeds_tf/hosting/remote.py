"""Copying a finished run to the user's storage with rclone.

On the AI4OS platform the user's Nextcloud is an rclone remote called `rshare`, configured through
the `RCLONE_CONFIG_RSHARE_*` variables the platform injects; any other remote works the same way.
The copy is checked afterwards (`rclone check`), so "copied" means the remote holds the whole run.
A failure never touches the local run: it is reported, and the copy can be repeated by hand.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import subprocess
from pathlib import Path

from seeds_tf.core.errors import InputError

_LOGGER = logging.getLogger(__name__)

_DESTINATION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_. -]*:[^\x00]*")
# Bounded retries: a storage that is down must not hold a finished training for long.
_RCLONE_FLAGS = ("--contimeout", "15s", "--timeout", "120s", "--retries", "2", "--low-level-retries", "3")
_TIMEOUT_S = 6 * 3600


@dataclasses.dataclass(frozen=True)
class UploadResult:
    """What became of the copy: `status` is "copied" or "failed" (with rclone's reason)."""

    destination: str
    status: str
    error: str = ""

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def check_destination(destination: str, field: str = "upload_to") -> None:
    """Checks, before a training starts, that `destination` is `remote:folder` and rclone exists.

    Raises:
        InputError: naming `field`.
    """
    if not _DESTINATION.fullmatch(destination):
        raise InputError(
            field, f"expected an rclone destination such as rshare:/models. Received: {destination!r}"
        )
    if _rclone_path() is None:
        raise InputError(field, "rclone is not installed (apt-get install rclone)")


def upload_run(run_folder: Path, destination: str) -> UploadResult:
    """Copies `run_folder` to `destination`/<run id> and checks that every file arrived intact."""
    target = f"{destination.rstrip('/')}/{run_folder.name}"
    try:
        _rclone("copy", str(run_folder), target)
        _rclone("check", "--one-way", str(run_folder), target)
    except (OSError, subprocess.SubprocessError) as error:
        reason = getattr(error, "stderr", None) or str(error)
        _LOGGER.warning("Run %s not copied to %s: %s", run_folder.name, target, reason)
        return UploadResult(target, "failed", _last_lines(reason))
    _LOGGER.info("Run %s copied to %s", run_folder.name, target)
    return UploadResult(target, "copied")


def _rclone_path() -> str | None:
    return shutil.which("rclone")


def _rclone(*arguments: str) -> None:
    program = _rclone_path()
    if program is None:
        raise FileNotFoundError("rclone is not installed")
    subprocess.run(  # noqa: S603 - rclone by its full path, arguments from checked options
        [program, *_RCLONE_FLAGS, *arguments],
        check=True,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
    )


def _last_lines(text: str, count: int = 5) -> str:
    """rclone's last lines: the reason, without pages of retries."""
    return "\n".join(text.strip().splitlines()[-count:])
