"""Does the tf.data input pipeline keep up with training? Measured side by side in one process.

Images per second the training pipeline delivers (decode, resize, augment, batch) against images
per second a training step of the model consumes, on the same images, same batch size. The ratio
is what matters (this machine is shared and noisy): at least 3 means the pipeline never starves
the model. Writes its figures into benchmarks/results.json under "pipeline".

    .venv/bin/python benchmarks/pipeline.py [--image-size 96] [--batch-size 16] [--images 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from results import record

from seeds_tf.classifier.model import build_classifier
from seeds_tf.core import config
from seeds_tf.data import synthetic
from seeds_tf.data.pipeline import augmentation, make_dataset
from seeds_tf.data.splits import read_dataset
from seeds_tf.learning.training import compile_classifier


def images_per_second(data, batches: int) -> float:
    """Rate at which `data` yields images, after one warm-up batch."""
    iterator = iter(data.repeat())
    next(iterator)
    started = time.perf_counter()
    count = 0
    for _ in range(batches):
        images, _ = next(iterator)
        count += int(images.shape[0])
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=256, help="images per class x 16 classes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        synthetic.generate_dataset(root, images_per_class=max(3, args.images // 16), image_size=128, seed=0)
        dataset = read_dataset(root / "dataset_files", root / "images")
        run = config.RunConfig.from_options(weights="none", image_size=args.image_size, dense_units=256)
        split = dataset.split("train")
        num_classes = len(dataset.classes)
        data = make_dataset(
            split,
            args.image_size,
            args.batch_size,
            num_classes,
            shuffle=True,
            augment=augmentation(run.augmentation, seed=0),
        )
        batches = max(4, len(split.paths) // args.batch_size)
        delivered = images_per_second(data, batches)

        model = build_classifier(run.model, num_classes)
        compile_classifier(model, run, num_classes)
        cached = data.take(4).cache().repeat()  # the same batches from memory: the model alone
        list(cached.take(4))
        model.fit(cached, steps_per_epoch=2, epochs=1, shuffle=False, verbose=0)  # trace once
        started = time.perf_counter()
        model.fit(cached, steps_per_epoch=batches, epochs=1, shuffle=False, verbose=0)
        consumed = batches * args.batch_size / (time.perf_counter() - started)

    figures = {
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "pipeline_images_per_s": round(delivered, 1),
        "train_step_images_per_s": round(consumed, 1),
        "ratio": round(delivered / consumed, 2),
        "goal": ">= 3",
    }
    record("pipeline", figures)


if __name__ == "__main__":
    main()
