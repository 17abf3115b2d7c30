"""A real `deepaas-run --model-name seeds_tf` process, spoken to over loopback HTTP."""

import os
import time

import numpy as np
import psutil
import requests

from seeds_tf.core.paths import DATA_ENV, MODELS_ENV
from tests.deepaas_harness import MODEL_URL, deepaas_process, deepaas_run
from tests.helpers import encode, seed_photo, tensorflow_mapped_into


def test_deepaas_run_serves_the_model(roots, tiny_run, tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    env = {DATA_ENV: str(roots.data), MODELS_ENV: str(roots.models), "TMPDIR": str(uploads)}
    photo = seed_photo(roots).read_bytes()
    with deepaas_run(env, tmp_path / "server.log") as url:
        meta = requests.get(f"{url}{MODEL_URL}/", timeout=10).json()
        assert meta["model"]["run_id"] == tiny_run

        answer = requests.post(
            f"{url}{MODEL_URL}/predict/",
            files={"image": ("seed.jpg", photo, "image/jpeg")},
            data={"top_k": "2"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["run_id"] == tiny_run
        assert len(answer.json()["results"][0]["species"]) == 2

        refused = requests.post(
            f"{url}{MODEL_URL}/predict/",
            files={"image": ("seed.png", photo[:200], "image/png")},
            timeout=60,
        )
        assert refused.status_code == 422
        assert "broken or truncated" in refused.json()["message"]

        again = requests.post(f"{url}{MODEL_URL}/predict/", files={"image": ("seed.jpg", photo)}, timeout=60)
        assert again.status_code == 200

        ui = requests.get(f"{url}/ui", timeout=10)
        assert ui.status_code == 200
        assert "swagger" in ui.text.lower()
    assert os.listdir(uploads) == []


def test_deepaas_run_starts_without_any_run(empty_roots, tmp_path):
    """Its worker warms up, and refuses a prediction, without loading TensorFlow (a library mapped
    into the process): there is nothing to answer from until a run is trained."""
    env = {DATA_ENV: str(empty_roots.data), MODELS_ENV: str(empty_roots.models)}
    log = tmp_path / "server.log"
    with deepaas_process(env, log) as (url, pid):
        deadline = time.monotonic() + 60
        while "No model to warm up" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "train one first" in log.read_text()
        assert len(psutil.Process(pid).children()) > 0  # its worker (and multiprocessing's helper)
        assert not tensorflow_mapped_into(pid)
        assert requests.get(f"{url}{MODEL_URL}/", timeout=10).json()["model"] is None
        refused = requests.post(
            f"{url}{MODEL_URL}/predict/",
            files={"image": ("seed.png", encode(np.full((32, 32, 3), 128, np.uint8), "PNG"))},
            timeout=60,
        )
        assert refused.status_code == 422
        assert "train one first" in refused.text
        assert not tensorflow_mapped_into(pid)  # nor to say that there is nothing to answer from
