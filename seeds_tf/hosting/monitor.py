"""TensorBoard on the platform's monitor port, over every run's logs.

The AI4OS platform routes its "monitor" URL to port 6006 of the module (on GPU nodes, to the port
deep-start exports as `monitorPORT`), and the service it replaces launched TensorBoard there itself.
With `SEEDS_TF_MONITOR=on` (set in the image), the DEEPaaS workers' warm-up and every training make
sure one TensorBoard runs there: started once, detached, so it outlives a cancelled training's
worker, and found again through a pid file instead of started twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

_LOGGER = logging.getLogger(__name__)

ENABLE_ENV = "SEEDS_TF_MONITOR"
PORT_ENV = "SEEDS_TF_MONITOR_PORT"
HOST_ENV = "SEEDS_TF_MONITOR_HOST"
PLATFORM_PORT_ENV = "monitorPORT"
"""Exported by deep-start: 6006, or the port the platform gives the monitor on a GPU node."""
DEFAULT_PORT = 6006
_START_TIMEOUT_S = 30.0
"""How long a start waits to see TensorBoard serve or exit (about 1 s; 6 s where it imports TensorFlow)."""
TENSORBOARD_WITHOUT_TENSORFLOW = (
    "import sys; sys.modules['tensorflow'] = None; from tensorboard.main import run_main; run_main()"
)
"""TensorBoard's own entry point with TensorFlow hidden from it. Where TensorFlow is installed
TensorBoard imports it, only for features a run's logs do not use: it reads event files itself
either way (the same runs, plugins, scalars and images served). Without it, it starts in 1 s
instead of 6 and holds 86 MiB instead of 692 (benchmarks/NOTES.md), and logs "TensorFlow
installation not found - running with reduced feature set"."""
_REASON_LINES = 2
"""The last lines of TensorBoard's log that say why it exited (its port, its logdir)."""


@dataclasses.dataclass(frozen=True)
class MonitorSettings:
    """Where TensorBoard listens. `host` defaults to loopback; the image sets 0.0.0.0."""

    port: int
    host: str = "127.0.0.1"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> MonitorSettings | None:
        """The settings, or None unless `SEEDS_TF_MONITOR` is on. The port is `monitorPORT` (the
        platform's), else `SEEDS_TF_MONITOR_PORT`, else 6006."""
        if environ.get(ENABLE_ENV, "").lower() not in ("1", "on", "true", "yes"):
            return None
        raw = environ.get(PLATFORM_PORT_ENV) or environ.get(PORT_ENV) or str(DEFAULT_PORT)
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            raise ValueError(f"Expected a TCP port in {PLATFORM_PORT_ENV} or {PORT_ENV}. Received: {raw!r}")
        return cls(port=int(raw), host=environ.get(HOST_ENV) or "127.0.0.1")


def ensure_from_env(logdir: Path, environ: Mapping[str, str] = os.environ) -> int | None:
    """`ensure_tensorboard` with the settings of the environment; None when the monitor is off,
    misconfigured or TensorBoard cannot start (logged: the service and the training go on without it)."""
    try:
        settings = MonitorSettings.from_env(environ)
        return ensure_tensorboard(logdir, settings) if settings else None
    except (ValueError, OSError) as error:
        _LOGGER.warning("TensorBoard not started: %s", error)
        return None


def ensure_tensorboard(logdir: Path, settings: MonitorSettings) -> int:
    """Starts TensorBoard over `logdir` on the settings' address unless ours already runs there.

    Several DEEPaaS workers warm up at once: a lock around the pid file lets one of them start it.
    The pid file is written only once TensorBoard serves (or still starts after
    `_START_TIMEOUT_S`), so it never names a TensorBoard that died at start.

    Returns:
        The process id of the TensorBoard serving there.

    Raises:
        OSError: another program already answers on the port.
        ChildProcessError: TensorBoard exited at start; the message ends with its log's last lines.
    """
    pid_file = pid_path(settings.port)
    with open(pid_file.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        running = _running_pid(pid_file)
        if running is not None:
            return running
        pid_file.unlink(missing_ok=True)
        # Once the port is known free, its answering tells that our TensorBoard serves.
        if _answers(settings):
            raise OSError(f"port {settings.port} on {settings.host} is in use by another program")
        log = pid_file.with_suffix(".log")
        start = log.stat().st_size if log.exists() else 0
        process = _start(logdir, settings, log)
        if not _serves(process, settings):
            raise ChildProcessError(
                f"TensorBoard exited at start with status {process.returncode} (log {log}): "
                + " / ".join(_last_lines(log, start))
            )
        pid_file.write_text(str(process.pid))
    _LOGGER.info(
        "TensorBoard over %s on http://%s:%d (pid %d, log %s)",
        logdir,
        settings.host,
        settings.port,
        process.pid,
        log,
    )
    return process.pid


def _start(logdir: Path, settings: MonitorSettings, log: Path) -> subprocess.Popen:
    """TensorBoard without TensorFlow, detached (its own session) so that it outlives the worker,
    writing to `log`."""
    with open(log, "ab") as output:
        return subprocess.Popen(  # noqa: S603 - our own interpreter running TensorBoard
            [
                sys.executable,
                "-c",
                TENSORBOARD_WITHOUT_TENSORFLOW,
                "--logdir",
                str(logdir),
                "--host",
                settings.host,
                "--port",
                str(settings.port),
                "--reload_interval",
                "15",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _serves(process: subprocess.Popen, settings: MonitorSettings) -> bool:
    """Whether `process` serves: False once it exits, True once the port answers or, still starting
    after `_START_TIMEOUT_S`, when it is given the benefit of the doubt (its log will say more)."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if _answers(settings):
            return process.poll() is None
        time.sleep(0.2)
    return process.poll() is None


def _answers(settings: MonitorSettings) -> bool:
    """Whether something accepts connections on the settings' address."""
    try:
        with socket.create_connection((settings.host, settings.port), timeout=1):
            return True
    except OSError:
        return False


def _last_lines(log: Path, start: int) -> list[str]:
    """The last non-blank lines this start wrote to `log` (from byte `start` on)."""
    with open(log, "rb") as file:
        file.seek(start)
        lines = file.read().decode(errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()][-_REASON_LINES:]


def pid_path(port: int) -> Path:
    """Where the pid of the TensorBoard on `port` is kept (the temporary folder of this machine)."""
    return Path(tempfile.gettempdir()) / f"seeds_tf-tensorboard-{port}.pid"


def _running_pid(pid_file: Path) -> int | None:
    """The pid in `pid_file` if that process still runs TensorBoard."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"tensorboard" in command:
            return pid
    return None
