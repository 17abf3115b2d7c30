"""What the module needs on the platform, measured for ai4-metadata.yml's `resources`.

    .venv/bin/python benchmarks/resources.py          # about 5 minutes on 2 cores

inference: `deepaas-run` started as deep-start starts it (listen flags only; etc/deepaas.conf gives
2 workers) with TensorBoard on the monitor port, as in the image, over a network of the original
model's size (Xception, 299 px, 743 classes; bench_run): the resident memory of the server, its
workers and TensorBoard after start and its peak over 20 predictions, the CPU seconds per
prediction, and the disk the run takes.
training: `seeds-tf train` of that network (299 px, batch 16, one epoch of 64 images) in a child
process: its peak resident memory (ru_maxrss), wall and CPU time per image, and the run folder's size.
Results go to benchmarks/results.json under "resources", with the machine they were measured on.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from bench_run import ORIGINAL_CLASSES, class_names, make_benchmark_run, seed_jpeg  # noqa: E402
from load import tree_rss_mib  # noqa: E402
from results import record  # noqa: E402

from seeds_tf.data.splits import write_split_files  # noqa: E402
from seeds_tf.hosting import monitor  # noqa: E402
from tests.deepaas_harness import MODEL_URL, deepaas_process, free_port  # noqa: E402

PREDICTIONS = 20
TRAIN_IMAGES = 64


def folder_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


def inference(base: Path) -> dict:
    models = base / "models"
    layout = make_benchmark_run(models)
    home = base / "home"
    (home / ".deepaas").mkdir(parents=True)
    shutil.copy(ROOT / "etc" / "deepaas.conf", home / ".deepaas" / "deepaas.conf")
    board_port = free_port()
    env = {
        "HOME": str(home),
        "TMPDIR": str(base),
        "SEEDS_TF_MODELS_DIR": str(models),
        "SEEDS_TF_DATA_DIR": str(base / "data"),
        monitor.ENABLE_ENV: "on",
        monitor.PORT_ENV: str(board_port),
    }
    photo = seed_jpeg(299)
    with deepaas_process(env, base / "server.log", timeout=600, bare=True) as (url, pid):
        _wait_for(f"http://127.0.0.1:{board_port}/data/runs")
        at_rest = tree_rss_mib(pid)
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        cpu_before = sum(sum(p.cpu_times()[:2]) for p in tree)
        peak = at_rest
        started = time.perf_counter()
        for _ in range(PREDICTIONS):
            answer = requests.post(
                f"{url}{MODEL_URL}/predict/", files={"image": ("seed.jpg", photo)}, timeout=300
            )
            answer.raise_for_status()
            peak = max(peak, tree_rss_mib(pid))
        wall = time.perf_counter() - started
        cpu = sum(sum(p.cpu_times()[:2]) for p in tree) - cpu_before
        os.kill(int((base / monitor.pid_path(board_port).name).read_text()), signal.SIGKILL)
    return {
        "workers": 2,
        "tensorboard": True,
        "rss_mib_at_rest": at_rest,
        "rss_mib_peak": peak,
        "seconds_per_prediction": round(wall / PREDICTIONS, 3),
        "cpu_seconds_per_prediction": round(cpu / PREDICTIONS, 3),
        "run_folder_mib": folder_mib(layout.root),
    }


def _wait_for(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(url, timeout=5).ok:
                return
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def training(base: Path) -> dict:
    data = base / "data"
    rng = np.random.default_rng(0)
    (data / "images").mkdir(parents=True)
    entries = []
    for index in range(TRAIN_IMAGES + 32):
        pixels = rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(data / "images" / f"{index}.jpg", quality=90)
        entries.append((f"{index}.jpg", index % ORIGINAL_CLASSES))
    splits = {"train": entries[:TRAIN_IMAGES], "val": entries[TRAIN_IMAGES:-16], "test": entries[-16:]}
    write_split_files(data / "dataset_files", class_names(ORIGINAL_CLASSES), splits)
    models = base / "train_models"
    env = {**os.environ, "SEEDS_TF_DATA_DIR": str(data), "SEEDS_TF_MODELS_DIR": str(models)}
    command = [
        str(Path(sys.executable).with_name("seeds-tf")),
        "--quiet",
        "train",
        "--weights=none",
        "--image_size=299",
        "--batch_size=16",
        "--epochs=1",
        "--images_directory=images",
        "--splits_directory=dataset_files",
    ]
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    (run,) = [path for path in models.iterdir() if path.is_dir()]
    return {
        "batch_size": 16,
        "image_size": 299,
        "rss_mib_peak": round(usage.ru_maxrss / 1024, 1),
        "seconds_per_training_image": round(wall / TRAIN_IMAGES, 2),
        "cpu_seconds_per_training_image": round((usage.ru_utime + usage.ru_stime) / TRAIN_IMAGES, 2),
        "run_folder_mib": folder_mib(run),
        "note": "wall and CPU time include start-up, validation, test evaluation and saving",
    }


def machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return {"cpu": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags.split()]}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="seeds_tf_resources_") as folder:
        base = Path(folder)
        figures = {"machine": machine(), "inference": inference(base), "training": training(base)}
    record("resources", figures)


if __name__ == "__main__":
    main()
