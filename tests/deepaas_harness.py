"""Running the real DEEPaaS server around seeds_tf: in-process (aiohttp test client) and as a
`deepaas-run` process on a free loopback port.

DEEPaaS' own HTTP tests never await their coroutines; this harness builds the app inside a running
event loop, as `deepaas-run` does, and resets the globals DEEPaaS caches between apps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import deepaas.api
import deepaas.config
import deepaas.model.v2
import requests
from aiohttp.test_utils import TestClient, TestServer
from oslo_config import cfg
from oslo_log import log as oslo_log

MODEL_URL = "/v2/models/seeds_tf"


class Response:
    """Status, headers and body of one answered request."""

    def __init__(self, status: int, headers, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)


class InProcessDeepaas:
    """The DEEPaaS app serving seeds_tf in this process, driven synchronously by the tests."""

    def __init__(self, workers: int = 1):
        self._loop = asyncio.new_event_loop()
        _configure_deepaas(workers)
        self._app = self._loop.run_until_complete(self._build())
        self._client = TestClient(TestServer(self._app), loop=self._loop)
        self._loop.run_until_complete(self._client.start_server())

    @staticmethod
    async def _build():
        deepaas.api.APP = None
        deepaas.model.v2.MODELS.clear()
        deepaas.model.v2.MODELS_LOADED = False
        return await deepaas.api.get_app()

    def request(self, method: str, path: str, timeout: float = 120, **kwargs) -> Response:
        return self._loop.run_until_complete(asyncio.wait_for(self._call(method, path, **kwargs), timeout))

    def at_once(self, count: int, method: str, path: str, timeout: float = 120, **kwargs) -> list[Response]:
        """`count` copies of one request, sent together: for races between requests."""

        async def calls():
            return await asyncio.gather(*(self._call(method, path, **kwargs) for _ in range(count)))

        return self._loop.run_until_complete(asyncio.wait_for(calls(), timeout))

    async def _call(self, method: str, path: str, **kwargs) -> Response:
        async with self._client.request(method, path, **kwargs) as response:
            return Response(response.status, response.headers, await response.read())

    def predict(
        self, files: dict[str, tuple[str, bytes]], timeout: float = 120, headers=None, **fields
    ) -> Response:
        """POST predict with a real multipart upload of each (filename, bytes)."""
        form = aiohttp.FormData()
        for name, (filename, data) in files.items():
            form.add_field(name, data, filename=filename, content_type="application/octet-stream")
        for name, value in fields.items():
            form.add_field(name, str(value))
        return self.request("POST", f"{MODEL_URL}/predict/", data=form, timeout=timeout, headers=headers)

    def train(self, **options) -> Response:
        """POST train with `options` as query parameters, booleans as "true" or "false", as the
        Swagger UI sends them."""
        params = {
            name: str(value).lower() if isinstance(value, bool) else value for name, value in options.items()
        }
        return self.request("POST", f"{MODEL_URL}/train/", params=params)

    def wait_for_training(self, uuid: str, timeout: float = 300) -> dict:
        """The status of training `uuid` once it is no longer running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.request("GET", f"{MODEL_URL}/train/{uuid}").json()
            if status["status"] != "running":
                return status
            time.sleep(1)
        raise AssertionError(f"training {uuid} still running after {timeout} s")

    def close(self) -> None:
        self._loop.run_until_complete(self._client.close())
        # DEEPaaS only terminates busy pools on cleanup; end the idle worker processes too.
        for wrapper in deepaas.model.v2.MODELS.values():
            for pool in wrapper._executor._free | wrapper._executor._working:
                pool.terminate()
                pool.join()
        deepaas.api.APP = None
        deepaas.model.v2.MODELS.clear()
        deepaas.model.v2.MODELS_LOADED = False
        self._loop.close()


def _configure_deepaas(workers: int) -> None:
    conf = cfg.CONF
    with contextlib.suppress(cfg.ArgsAlreadyParsedError, cfg.DuplicateOptError):
        oslo_log.register_options(conf)
    if not conf._args:
        conf([], project="deepaas")
    conf.set_override("model_name", "seeds_tf")
    conf.set_override("workers", workers)
    conf.set_override("warm", True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def deepaas_run(env: dict[str, str], log: Path, *extra: str, timeout: float = 120) -> Iterator[str]:
    """A real `deepaas-run --model-name seeds_tf` on a free loopback port; yields its base URL."""
    with deepaas_process(env, log, *extra, timeout=timeout) as (url, _):
        yield url


@contextlib.contextmanager
def deepaas_process(
    env: dict[str, str], log: Path, *extra: str, timeout: float = 120, bare: bool = False
) -> Iterator[tuple[str, int]]:
    """`deepaas_run` that also yields the server's PID (its workers are its children), for
    measuring it; stops it with SIGTERM, then SIGKILL of what is left of its process group.

    With `bare`, the command is the one deep-start runs on the platform, the listen address and port
    alone: every other setting must come from a DEEPaaS configuration file.
    """
    port = free_port()
    command = [str(Path(sys.executable).with_name("deepaas-run"))]
    if bare:
        command += ["--listen-ip=127.0.0.1", f"--listen-port={port}"]
    else:
        command += ["--model-name", "seeds_tf", "--listen-ip", "127.0.0.1", "--listen-port", str(port)]
    command += extra
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(process, url, timeout, log)
        yield url, process.pid
    finally:
        _stop(process)


def _wait_until_up(process: subprocess.Popen, url: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"deepaas-run exited with {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(f"{url}/v2/models/", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"deepaas-run did not answer within {timeout} s:\n{log.read_text()}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server alone: it stops its workers and exits within a second. (Signalling the
    whole group kills the workers first, and the server then hangs in its shutdown.) Whatever is
    left of the group after that is killed."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)
