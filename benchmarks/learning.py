"""Learning, shown: a run on the synthetic seeds dataset, trained and evaluated through the public
command line, must reach at least 90% top-1 on its held-out test split.

    .venv/bin/python benchmarks/learning.py [--epochs 15] [--image-size 96]

Generates the synthetic dataset into a temporary data folder, runs `seeds-tf train` there, then
`seeds-tf evaluate` on the test split, and records top-1, top-5 and wall time in
benchmarks/results.json under "learning". Takes about 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import record

SEEDS_TF = str(Path(sys.executable).with_name("seeds-tf"))


def _seeds_tf(*arguments: str) -> dict:
    done = subprocess.run([SEEDS_TF, "--quiet", *arguments], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--images-per-class", type=int, default=100)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        roots = ["--data-dir", f"{folder}/data", "--models-dir", f"{folder}/models"]
        _seeds_tf(
            *roots, "synthetic", f"{folder}/data/synthetic", "--images-per-class", str(args.images_per_class)
        )
        options = {
            "images_directory": "synthetic/images",
            "splits_directory": "synthetic/dataset_files",
            "weights": "none",
            "image_size": args.image_size,
            "dense_units": 256,
            "dropout": 0.3,
            "backbone_lr_factor": 1.0,
            "batch_size": 16,
            "epochs": args.epochs,
        }
        command = ["train", *(f"--{name}={value}" for name, value in options.items())]
        started = time.monotonic()
        run = _seeds_tf(*roots, *command)
        minutes = (time.monotonic() - started) / 60
        evaluation = _seeds_tf(
            *roots, "evaluate", run["run_id"], f"{folder}/data/synthetic/dataset_files/test.txt"
        )

    figures = {
        "command": " ".join(["seeds-tf", *command]),
        "classes": len(evaluation["per_class"]),
        "test_images": evaluation["num_images"],
        "top1": round(evaluation["top1"], 4),
        "top5": round(evaluation["top5"], 4),
        "training_minutes": round(minutes, 1),
        "goal": "top1 >= 0.90",
    }
    record("learning", figures)


if __name__ == "__main__":
    main()
