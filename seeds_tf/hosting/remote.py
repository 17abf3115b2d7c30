"""Copying a finished run to the user's storage with rclone.

On the AI4OS platform the user's Nextcloud is an rclone remote called `rshare`, configured through
the `RCLONE_CONFIG_RSHARE_*` variables the platform injects; any other remote works the same way.
The copy is checked afterwards (`rclone check`), so "copied" means the remote holds the whole run.
A failure never touches the local run: it is reported, and the copy can be repeated by hand.
"""

from __future__ import annotations

import dataclasses
import logging
import os
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
_LIST_TIMEOUT_S = 30  # reads the local configuration only


@dataclasses.dataclass(frozen=True)
class UploadResult:
    """What became of the copy: `status` is "copied" or "failed" (with rclone's reason)."""

    destination: str
    status: str
    error: str = ""

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def check_destination(destination: str, field: str = "upload_to") -> None:
    """Checks, before a training starts, that `destination` is `remote:folder` on a remote rclone
    has configured (in its config file or RCLONE_CONFIG_<NAME>_* variables): a misspelt remote
    would otherwise show only when the finished run is copied, hours later. The AI4OS platform
    defines `rshare` in every deployment, with an empty RCLONE_CONFIG_RSHARE_URL when the user gave
    no storage: such a remote, listed but with nowhere to copy to, is refused too. The remote itself
    is not contacted: a storage that is down now may be up when the training ends.

    Raises:
        InputError: naming `field`.
    """
    if not _DESTINATION.fullmatch(destination):
        raise InputError(
            field, f"expected an rclone destination such as rshare:/models. Received: {destination!r}"
        )
    if _rclone_path() is None:
        raise InputError(field, "rclone is not installed (apt-get install rclone)")
    name = destination.split(":", 1)[0]
    try:
        configured = _configured_remotes()
    except (OSError, subprocess.SubprocessError) as error:
        raise InputError(field, f"rclone cannot list its remotes: {_last_lines(_reason(error))}") from None
    if name not in configured:
        raise InputError(
            field,
            f"no rclone remote named {name!r} is configured (configured: {', '.join(configured) or 'none'}); "
            "on AI4OS the platform configures rshare, the user's Nextcloud",
        )
    url_variable = f"RCLONE_CONFIG_{name.upper()}_URL"
    if os.environ.get(url_variable) == "":
        raise InputError(
            field,
            f"the rclone remote {name!r} has no URL ({url_variable} is empty); on AI4OS, give your "
            "storage's URL, user and password when you create the deployment",
        )


def _configured_remotes() -> list[str]:
    """The names of the remotes rclone knows, from its config file and its environment."""
    listed = _rclone("listremotes", timeout=_LIST_TIMEOUT_S)
    return [line.removesuffix(":") for line in listed.splitlines() if line.strip()]


def upload_run(run_folder: Path, destination: str) -> UploadResult:
    """Copies `run_folder` to `destination`/<run id> and checks that every file arrived intact. A
    bare `remote:` is the remote's own starting folder (an SFTP user's home), not its root."""
    bare = destination.endswith(":")
    target = f"{destination}{run_folder.name}" if bare else f"{destination.rstrip('/')}/{run_folder.name}"
    try:
        _rclone("copy", str(run_folder), target)
        _rclone("check", "--one-way", str(run_folder), target)
    except (OSError, subprocess.SubprocessError) as error:
        reason = _reason(error)
        _LOGGER.warning("Run %s not copied to %s: %s", run_folder.name, target, reason)
        return UploadResult(target, "failed", _last_lines(reason))
    _LOGGER.info("Run %s copied to %s", run_folder.name, target)
    return UploadResult(target, "copied")


def _reason(error: OSError | subprocess.SubprocessError) -> str:
    """What went wrong, in rclone's words where it said any. A timeout's stderr is bytes even from a
    run in text mode (and made the refusal a TypeError)."""
    stderr = getattr(error, "stderr", None)
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "replace")
    return stderr or str(error)


def _rclone_path() -> str | None:
    return shutil.which("rclone")


def _rclone(*arguments: str, timeout: float = _TIMEOUT_S) -> str:
    """rclone's standard output; CalledProcessError (with its stderr) if it fails."""
    program = _rclone_path()
    if program is None:
        raise FileNotFoundError("rclone is not installed")
    return subprocess.run(  # noqa: S603 - rclone by its full path, arguments from checked options
        [program, *_RCLONE_FLAGS, *arguments],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    ).stdout


def _last_lines(text: str, count: int = 5) -> str:
    """rclone's last lines: the reason, without pages of retries."""
    return "\n".join(text.strip().splitlines()[-count:])
