"""What TensorBoard costs with and without TensorFlow, side by side over the same Keras logs.

The monitor starts TensorBoard with TensorFlow hidden from it (seeds_tf.hosting.monitor), which
TensorBoard otherwise imports wherever it is installed. Alternated `--rounds` times on loopback:
seconds until it answers, its CPU seconds and resident memory once it serves, and what it serves
(runs, enabled plugins, scalar tags): the same, or the comparison says so. Writes
benchmarks/results.json under "tensorboard".

    .venv/bin/python benchmarks/tensorboard_cost.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from results import record  # noqa: E402

from seeds_tf.hosting import monitor  # noqa: E402
from tests.deepaas_harness import free_port  # noqa: E402

COMMANDS = {
    "with_tensorflow": [sys.executable, "-m", "tensorboard.main"],
    "without_tensorflow": [sys.executable, "-c", monitor.TENSORBOARD_WITHOUT_TENSORFLOW],
}


def write_logs(logdir: Path) -> None:
    """Three epochs of a small model's fit, logged by Keras' TensorBoard callback as a training does."""
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(2, "softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(0)
    model.fit(
        rng.random((64, 8)),
        rng.integers(0, 2, 64),
        validation_split=0.25,
        epochs=3,
        verbose=0,
        callbacks=[keras.callbacks.TensorBoard(log_dir=str(logdir / "run"))],
    )


def measure(command: list[str], logdir: Path) -> dict:
    """One TensorBoard over `logdir`: its start, cost and what it serves."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    process = subprocess.Popen(
        [*command, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                requests.get(f"{url}/data/runs", timeout=1)
                break
            except requests.ConnectionError:
                if process.poll() is not None or time.perf_counter() - started > 120:
                    raise RuntimeError(f"TensorBoard did not start: {command}") from None
                time.sleep(0.05)
        answered_s = time.perf_counter() - started
        time.sleep(5)  # its first reload of the logs
        board = psutil.Process(process.pid)
        tree = [board, *board.children(recursive=True)]
        plugins = requests.get(f"{url}/data/plugins_listing", timeout=10).json()
        return {
            "answered_s": round(answered_s, 2),
            "cpu_s": round(sum(sum(p.cpu_times()[:2]) for p in tree), 2),
            "rss_mib": round(sum(p.memory_info().rss for p in tree) / 2**20, 1),
            "serves": {
                "runs": requests.get(f"{url}/data/runs", timeout=10).json(),
                "plugins": sorted(name for name, plugin in plugins.items() if plugin.get("enabled")),
                "scalars": requests.get(f"{url}/data/plugin/scalars/tags", timeout=10).json(),
            },
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        logdir = Path(folder)
        write_logs(logdir)
        rounds = [
            {name: measure(command, logdir) for name, command in COMMANDS.items()} for _ in range(args.rounds)
        ]
    figures = {
        name: {key: [r[name][key] for r in rounds] for key in ("answered_s", "cpu_s", "rss_mib")}
        for name in COMMANDS
    }
    served = [r[name]["serves"] for r in rounds for name in COMMANDS]
    figures["serve_the_same"] = all(serves == served[0] for serves in served)
    figures["served"] = {key: served[0][key] for key in ("runs", "plugins")}
    record("tensorboard", figures)


if __name__ == "__main__":
    main()
