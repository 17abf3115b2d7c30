"""Whether a running service can still predict: the container's healthcheck.

DEEPaaS answers its listing routes from the server process, so a check of /v2/models/ stays green
while every worker is hung (a worker killed for memory is never replaced in DEEPaaS 2.6's pool).
This check sends a real prediction of a small generated image: it passes when a worker answers
within the timeout, with a prediction or a refusal of its own (a 422 in the service's error shape,
such as "no run yet"). Any other answer fails it: a 404 or 405 comes from a router, not a worker,
so a wrong URL or path prefix never stays green.

Without an address given, the check asks 127.0.0.1:5000 and, when that port is closed, the port
deep-start serves on in the platform's GPU nodes: `$PORT0`, whose number each deployment gets.
"""

from __future__ import annotations

import io
import os

import numpy as np
import PIL.Image
import requests

URL_ENV = "SEEDS_TF_HEALTHCHECK_URL"
DEFAULT_URL = "http://127.0.0.1:5000"
GPU_NODE_PORT_ENV = "PORT0"
PREDICT_PATH = "/v2/models/seeds_tf/predict/"


def check_service(url: str = "", timeout_s: float = 30.0) -> str | None:
    """Why the service at `url` (default `$SEEDS_TF_HEALTHCHECK_URL`, else 127.0.0.1:5000 or
    127.0.0.1:$PORT0) is not healthy, or None when a worker answered a prediction within
    `timeout_s` seconds."""
    given = url or os.environ.get(URL_ENV)
    bases = [given.rstrip("/")] if given else service_urls(os.environ.get(GPU_NODE_PORT_ENV, ""))
    unreachable = ""
    for base in bases:
        try:
            answer = requests.post(
                f"{base}{PREDICT_PATH}",
                files={"image": ("health.png", _probe_image(), "image/png")},
                timeout=timeout_s,
            )
        except requests.Timeout:
            return f"no answer to a prediction within {timeout_s:g} s: the workers are busy or hung"
        except requests.RequestException as error:
            unreachable = f"{base} cannot be reached: {type(error).__name__}"
            continue
        return _answer_problem(answer, base)
    return unreachable


def _answer_problem(answer: requests.Response, base: str) -> str | None:
    """What is wrong with the service's answer to the probe, or None: a prediction, or a refusal
    of the service's own."""
    if answer.status_code >= 500:
        return f"a prediction failed with HTTP {answer.status_code}"
    if answer.status_code == 200 or _refused_by_the_service(answer):
        return None
    return (
        f"a prediction got HTTP {answer.status_code} from {base}{PREDICT_PATH}, neither an answer nor "
        "a refusal of seeds_tf: is that the service's address?"
    )


def service_urls(gpu_node_port: str) -> list[str]:
    """Where deep-start may serve: port 5000, or `gpu_node_port` ($PORT0) on a GPU node."""
    return [DEFAULT_URL, *([f"http://127.0.0.1:{gpu_node_port}"] if gpu_node_port.isdigit() else [])]


def _refused_by_the_service(answer: requests.Response) -> bool:
    """A 422 in the one shape of the service's client errors (service.request_parsing.error_text)."""
    try:
        body = answer.json()
    except ValueError:
        return False
    return answer.status_code == 422 and isinstance(body, dict) and set(body) == {"message", "field"}


def _probe_image() -> bytes:
    """A 64 x 64 PNG of soft noise: cheap to decode and to classify."""
    pixels = np.random.default_rng(0).integers(96, 160, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
