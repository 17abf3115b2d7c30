"""What test-time augmentation buys: top-1 on a run's test split and seconds per image, for each
`tta` mode, measured side by side in one process on the same images.

    .venv/bin/python benchmarks/tta.py [--run RUN_ID]      # default: the newest complete run

Uses SEEDS_TF_MODELS_DIR / SEEDS_TF_DATA_DIR like the service (the demo run of `make serve` by default).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from results import record

from seeds_tf.core import runs
from seeds_tf.core.paths import Roots
from seeds_tf.data import images
from seeds_tf.data.splits import read_split
from seeds_tf.prediction import inference

MODES = ("none", "flip", "ten_crop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="", help="run id; the newest complete run by default")
    args = parser.parse_args()

    roots = Roots.from_env()
    layout = runs.resolve_run(roots.models, args.run)
    run = inference.load_run(layout)
    training = layout.config().training
    images_dir = roots.data_path(training.images_directory, "images_directory")
    test = read_split(layout.dataset_dir / "test.txt", "test", images_dir, len(run.classes), "test")
    pixels = [images.read_image(path) for path in test.paths]
    labels = np.asarray(test.labels)

    inference.class_probabilities(run, pixels[:2], "ten_crop")  # trace every batch shape once
    figures = {"run_id": run.run_id, "test_images": len(pixels)}
    for mode in MODES:
        started = time.perf_counter()
        probabilities = np.concatenate(
            [inference.class_probabilities(run, pixels[i : i + 8], mode) for i in range(0, len(pixels), 8)]
        )
        seconds = time.perf_counter() - started
        figures[mode] = {
            "top1": round(float(np.mean(probabilities.argmax(axis=1) == labels)), 4),
            "ms_per_image": round(1000 * seconds / len(pixels), 1),
        }
    for mode in MODES[1:]:
        figures[mode]["time_vs_none"] = round(
            figures[mode]["ms_per_image"] / figures["none"]["ms_per_image"], 2
        )
    record("tta", figures)


if __name__ == "__main__":
    main()
