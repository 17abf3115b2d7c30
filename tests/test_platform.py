"""seeds_tf as the AI4OS platform starts it: `deep-start --deepaas` runs a bare
`deepaas-run --listen-ip=... --listen-port=...`, so every other setting comes from the DEEPaaS
configuration file the image installs; TensorBoard answers on the monitor port; the platform's
Gradio UI finds an image input and a classification output; the platform's CI accepts the metadata.

One real server, started as the platform starts it, serves the HTTP checks of this module."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import PIL.Image
import psutil
import pytest
import requests

from seeds_tf import cli
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV
from seeds_tf.hosting import admission, health, monitor
from tests.deepaas_harness import MODEL_URL, deepaas_process, free_port
from tests.helpers import copy_roots, seed_photo, tensorflow_mapped_into

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def platform_server(tmp_path_factory, session_roots, tiny_run):
    """`deepaas-run` with deep-start's flags alone, its settings in ~/.deepaas/deepaas.conf (the
    repository's etc/deepaas.conf, as the image installs it in /etc/deepaas/), and the monitor on as
    in the image, on a free loopback port. Yields (url, server pid, roots, TensorBoard port)."""
    base = tmp_path_factory.mktemp("platform")
    roots = copy_roots(session_roots, base)
    home = base / "home"
    (home / ".deepaas").mkdir(parents=True)
    shutil.copy(ROOT / "etc" / "deepaas.conf", home / ".deepaas" / "deepaas.conf")
    runtime = base / "tmp"
    runtime.mkdir()
    board_port = free_port()
    env = {
        "HOME": str(home),
        "TMPDIR": str(runtime),
        DATA_ENV: str(roots.data),
        MODELS_ENV: str(roots.models),
        monitor.ENABLE_ENV: "on",
        monitor.PORT_ENV: str(board_port),
        monitor.HOST_ENV: "127.0.0.1",
        "DEEPAAS_V2_MODEL": "",  # the model name must come from the file
    }
    with deepaas_process(env, base / "server.log", timeout=180, bare=True) as (url, pid):
        try:
            yield url, pid, roots, board_port
        finally:
            _stop_tensorboard(runtime / monitor.pid_path(board_port).name)


def _stop_tensorboard(pid_file: Path) -> None:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_the_configuration_file_chooses_the_model_and_the_workers(platform_server):
    url, pid, _, _ = platform_server
    models = requests.get(f"{url}/v2/models/", timeout=10).json()["models"]
    assert [model["name"] for model in models] == ["seeds_tf"]
    workers = [child for child in psutil.Process(pid).children() if "spawn_main" in " ".join(child.cmdline())]
    assert len(workers) == 2, [child.cmdline() for child in workers]
    spec = requests.get(f"{url}/swagger.json", timeout=10).json()
    assert f"{MODEL_URL}/train/" in spec["paths"], "train_endpoint = true is in force"


def test_the_server_log_of_a_normal_start_is_clean(platform_server):
    """After start, warm-up and a first answer (which searches the run's reference specimens): no
    deprecation noise from the dependencies, no CUDA messages on a CPU machine and no error line
    of TensorFlow's. The one deprecation left is DEEPaaS 2.6's own `web.Application(debug=...)`,
    which it raises before any plugin is loaded."""
    url, _, roots, _ = platform_server
    assert requests.get(f"{url}/v2/models/seeds_tf/", timeout=10).status_code == 200
    photo = seed_photo(roots).read_bytes()
    answer = requests.post(f"{url}{MODEL_URL}/predict/", files={"image": ("seed.jpg", photo)}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"][0]["neighbours_agree"] is not None, "the answer used the specimens"
    log = (roots.data.parent / "server.log").read_text()  # deepaas_process writes it beside the roots
    warnings = [line for line in log.splitlines() if "Warning:" in line]
    assert [line for line in warnings if "debug argument is deprecated" not in line] == []
    assert "cuda" not in log.lower()
    assert "Traceback" not in log
    assert [line for line in log.splitlines() if re.match(r"E\d{4} ", line)] == []  # absl's error lines


def test_a_body_over_the_configured_cap_gets_413(platform_server):
    url = platform_server[0]
    body = b"x" * (52428800 + 1024)
    answer = requests.post(
        f"{url}{MODEL_URL}/predict/",
        files={"image": ("big.jpg", body, "image/jpeg")},
        timeout=60,
    )
    assert answer.status_code == 413
    # The server goes on answering.
    assert requests.get(f"{url}/v2/models/", timeout=10).status_code == 200


def _blank_png(width: int, height: int) -> bytes:
    """A semi-transparent RGBA PNG: a few hundred KB that decode to ~30 bytes per pixel."""
    buffer = io.BytesIO()
    PIL.Image.new("RGBA", (width, height), (120, 90, 40, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_worst_accepted_request_is_answered_and_the_first_refused_one_named(platform_server):
    """The per-request pixel budget: a 40-megapixel and a 24-megapixel RGBA PNG (64 megapixels, the
    limit) are answered; one more row of pixels is refused from the headers, before decoding."""
    url = platform_server[0]
    largest = _blank_png(8000, 5000)
    for height, status in ((6000, 200), (6001, 422)):
        files = [("image", ("a.png", largest, "image/png")), ("image_2", ("b.png", _blank_png(4000, height)))]
        answer = requests.post(f"{url}{MODEL_URL}/predict/", files=files, timeout=300)
        assert answer.status_code == status, answer.text
    refusal = answer.json()
    assert refusal["field"] == "image"
    assert "64004000 pixels together; the limit per request is 64000000 pixels" in refusal["message"]


def test_a_training_request_while_one_runs_gets_409_at_once(platform_server):
    """Refused in the server process, instead of a place in the workers' queue."""
    url, _, roots, _ = platform_server
    with admission.training_slot(roots.models):
        answer = requests.post(f"{url}{MODEL_URL}/train/", params={"epochs": 1}, timeout=30)
    assert answer.status_code == 409, answer.text
    assert answer.json()["field"] == "training"
    assert "another training is running" in answer.json()["message"]


def test_the_serve_only_configuration_has_no_train_endpoint(tmp_path):
    """etc/deepaas-serve-only.conf, for public images: predict and metadata, no training."""
    home = tmp_path / "home"
    (home / ".deepaas").mkdir(parents=True)
    shutil.copy(ROOT / "etc" / "deepaas-serve-only.conf", home / ".deepaas" / "deepaas.conf")
    (tmp_path / "models").mkdir()
    env = {
        "HOME": str(home),
        MODELS_ENV: str(tmp_path / "models"),
        DATA_ENV: str(tmp_path),
        "DEEPAAS_V2_MODEL": "",
    }
    with deepaas_process(env, tmp_path / "server.log", bare=True) as (url, _):
        spec = requests.get(f"{url}/swagger.json", timeout=10).json()
        assert f"{MODEL_URL}/predict/" in spec["paths"]
        assert not any("/train" in path for path in spec["paths"])
        assert requests.post(f"{url}{MODEL_URL}/train/", timeout=10).status_code in (402, 404, 405)


def test_metadata_keeps_deepaas_self_link_with_types(platform_server):
    url = platform_server[0]
    metadata = requests.get(f"{url}{MODEL_URL}/", timeout=10).json()
    assert {"name", "author", "license", "description"} <= set(metadata)
    assert metadata["name"] == "seeds_tf"
    assert metadata["license"] == "Apache-2.0"
    links = {link["rel"]: link for link in metadata["links"]}
    assert links["self"]["href"] == MODEL_URL
    assert all(set(link) == {"rel", "href", "type"} for link in metadata["links"])
    assert requests.get(f"{url}{links['self']['href']}/", timeout=10).status_code == 200


def test_the_gradio_ui_sees_an_image_input_and_a_classification(platform_server):
    """deepaas_ui draws a file argument as an image widget when its description has "image" and no
    other media word, and a classification widget when the spec's ModelPredictionResponse has
    top-level labels and probabilities, which it zips together."""
    url, _, roots, _ = platform_server
    spec = requests.get(f"{url}/swagger.json", timeout=10).json()
    (path,) = [path for path in spec["paths"] if path.endswith("predict/")]
    parameters = {parameter["name"]: parameter for parameter in spec["paths"][path]["post"]["parameters"]}
    for name in ("image", "image_2", "image_3", "image_4"):
        description = parameters[name]["description"].lower()
        assert parameters[name]["type"] == "file"
        assert "image" in description and "audio" not in description and "video" not in description
    properties = spec["definitions"]["ModelPredictionResponse"]["properties"]
    assert {"labels", "probabilities"} <= set(properties)

    with open(seed_photo(roots), "rb") as photo:
        answer = requests.post(
            f"{url}{MODEL_URL}/predict/", files={"image": photo}, data={"top_k": 3}, timeout=120
        )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    first = body["results"][0]["species"]
    assert body["labels"] == [species["label"] for species in first]
    assert body["probabilities"] == [species["probability"] for species in first]
    assert len(body["labels"]) == 3


def test_tensorboard_answers_on_the_monitor_port_with_the_runs(platform_server, tiny_run):
    """Started once by the workers' warm-up (two workers, one TensorBoard), over the models folder,
    with the runs' curves and without TensorFlow (6 s and 600 MB it does not need)."""
    board_port = platform_server[3]
    deadline = time.monotonic() + 120
    listed = []
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.ConnectionError):
            listed = requests.get(f"http://127.0.0.1:{board_port}/data/runs", timeout=5).json()
            if any(run.startswith(tiny_run) for run in listed):
                break
        time.sleep(1)
    assert any(run.startswith(tiny_run) for run in listed), listed
    tags = requests.get(f"http://127.0.0.1:{board_port}/data/plugin/scalars/tags", timeout=5).json()
    assert any("epoch_loss" in tags[run] for run in listed if run.startswith(tiny_run)), tags
    boards = [
        process
        for process in psutil.process_iter(["cmdline"])
        if any("tensorboard.main" in part for part in process.info["cmdline"] or [])
        and str(board_port) in process.info["cmdline"]
    ]
    assert len(boards) == 1
    assert not tensorflow_mapped_into(boards[0].pid)


def test_monitor_settings_follow_the_platform():
    assert monitor.MonitorSettings.from_env({}) is None
    assert monitor.MonitorSettings.from_env({monitor.ENABLE_ENV: "on"}) == monitor.MonitorSettings(6006)
    on_gpu_node = {monitor.ENABLE_ENV: "on", monitor.PLATFORM_PORT_ENV: "31456", monitor.PORT_ENV: "7000"}
    assert monitor.MonitorSettings.from_env(on_gpu_node).port == 31456
    with pytest.raises(ValueError, match="Received: 'x'"):
        monitor.MonitorSettings.from_env({monitor.ENABLE_ENV: "on", monitor.PORT_ENV: "x"})
    assert monitor.ensure_from_env(Path("."), {monitor.ENABLE_ENV: "on", monitor.PORT_ENV: "0"}) is None


def test_a_tensorboard_that_cannot_bind_is_reported_as_not_started(tmp_path, monkeypatch, caplog):
    """A real TensorBoard start on a port a socket holds: it exits at once, and the warning says why
    from its log, with no pid file left naming the dead process."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # bound, not listening: only TensorBoard's own bind can fail
        port = holder.getsockname()[1]
        environ = {monitor.ENABLE_ENV: "on", monitor.PORT_ENV: str(port), monitor.HOST_ENV: "127.0.0.1"}
        try:
            assert monitor.ensure_from_env(tmp_path, environ) is None
        finally:
            _stop_tensorboard(monitor.pid_path(port))
    assert not monitor.pid_path(port).exists()
    assert "TensorBoard not started: TensorBoard exited at start" in caplog.text
    assert f"Port {port} is in use by another program" in caplog.text


def test_tensorboard_is_not_started_on_a_port_another_program_answers(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        try:
            with pytest.raises(OSError, match=f"port {port} on 127.0.0.1 is in use by another program"):
                monitor.ensure_tensorboard(tmp_path, monitor.MonitorSettings(port))
        finally:
            _stop_tensorboard(monitor.pid_path(port))
    assert not monitor.pid_path(port).exists()


def test_the_metadata_file_passes_the_platform_validator():
    """The platform's CI validates ai4-metadata.yml against schema 2.0.0; the latest schema also
    checks the resources."""
    validator = BIN / "ai4-metadata"
    for version in ("2.0.0", "2.3.0"):
        result = subprocess.run(
            [str(validator), "validate", "--metadata-version", version, str(ROOT / "ai4-metadata.yml")],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_healthcheck_predicts_and_fails_when_the_workers_hang(platform_server):
    """The image's HEALTHCHECK command: green while a worker can predict; red within its timeout
    when every worker is stopped (as a worker killed for memory leaves DEEPaaS 2.6), although the
    listing routes, answered by the server process, still answer."""
    url, pid, _, _ = platform_server
    command = [str(BIN / "seeds-tf"), "--quiet", "healthcheck", "--url", url, "--timeout", "5"]
    healthy = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert healthy.returncode == 0, healthy.stderr
    # A wrong address is answered by the router, not a worker: it never passes.
    wrong = [*command[:4], f"{url}/elsewhere", *command[5:]]
    misdirected = subprocess.run(wrong, capture_output=True, text=True, check=False, timeout=60)
    assert misdirected.returncode == 1
    assert "a prediction got HTTP 404" in misdirected.stderr
    # With no address given, port 5000, else the port deep-start serves on in a GPU node ($PORT0).
    assert health.service_urls("") == [health.DEFAULT_URL]
    if not _port_open(5000):
        port = urllib.parse.urlsplit(url).port
        gpu_node = {**os.environ, health.GPU_NODE_PORT_ENV: str(port)}
        gpu_node.pop(health.URL_ENV, None)
        unaddressed = command[:3] + command[5:]  # without --url
        found = subprocess.run(
            unaddressed, env=gpu_node, capture_output=True, text=True, check=False, timeout=60
        )
        assert found.returncode == 0, found.stderr
    workers = [child for child in psutil.Process(pid).children() if "spawn_main" in " ".join(child.cmdline())]
    for worker in workers:
        worker.suspend()
    try:
        hung = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
        assert requests.get(f"{url}/v2/models/", timeout=10).status_code == 200
    finally:
        for worker in workers:
            worker.resume()
    assert hung.returncode == 1
    assert "no answer to a prediction within 5 s" in hung.stderr


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "soon"])
def test_a_healthcheck_timeout_that_is_not_a_duration_is_refused(timeout, capsys):
    """A zero or negative timeout ended in requests' traceback (exit status 1, as if unhealthy)."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(["healthcheck", "--timeout", timeout])
    assert stopped.value.code == 2
    assert f"expected a number of seconds above 0. Received: {timeout!r}" in capsys.readouterr().err
