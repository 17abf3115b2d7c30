"""The reference index of a run: its training images embedded, behind `seeds-tf index` and training.

See seeds_tf.prediction.neighbours for what the index holds and how answers use it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from seeds_tf.core import runs
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import Roots
from seeds_tf.data import datasets
from seeds_tf.data.splits import Split, read_split
from seeds_tf.prediction import neighbours
from seeds_tf.prediction.inference import LoadedRun, load_run

_LOGGER = logging.getLogger(__name__)


def index_run(roots: Roots, run_id: str, batch_size: int = 32) -> Path:
    """Embeds every training image of a complete run and writes the run's index folder
    (`RunLayout.index_dir`), replacing any earlier index; returns that folder.

    Args:
        roots: the data and models folders.
        run_id: the run; empty for the newest working run.
        batch_size: images per forward pass (default 32).

    Raises:
        InputError: naming `run` for an unknown or broken run, or one whose training images are
            gone or changed (the index must match the split the run was trained on); naming
            `batch_size` below 1.
    """
    if batch_size < 1:
        raise InputError("batch_size", f"must be at least 1; received {batch_size}")
    layout = runs.resolve_run(roots.models, run_id, field="run")
    images_dir = roots.data_path(layout.config().training.images_directory, "images_directory")
    return index_layout(layout, images_dir, batch_size)


def index_layout(layout: runs.RunLayout, images_dir: Path, batch_size: int = 32) -> Path:
    """index_run for a run folder: indexes the images its train.txt lists."""
    train_file = layout.dataset_dir / "train.txt"
    if not train_file.is_file():
        raise InputError("run", f"run {layout.run_id} has no {train_file.name} to index")
    # A run's train.txt lists the images its training skipped as unreadable too.
    split = datasets.readable(read_split(train_file, "train", images_dir, len(layout.classes()), "run"))
    return index_split(layout, load_run(layout), split, images_dir, batch_size)


def index_split(
    layout: runs.RunLayout, run: LoadedRun, split: Split, images_dir: Path, batch_size: int = 32
) -> Path:
    """Indexes `split` (paths under `images_dir`) with `run`, the final model of a run folder,
    complete or not: the training indexes its run, less the unreadable images it skipped, before
    marking it complete."""
    started = time.perf_counter()
    index = neighbours.build_index(run.engine("keras"), split, images_dir, run.config.image_size, batch_size)
    neighbours.save_index(index, layout.index_dir)
    _LOGGER.info(
        "Run %s: indexed %d training images (dimension %d) in %.1f s into %s",
        layout.run_id,
        len(index),
        index.dimension,
        time.perf_counter() - started,
        layout.index_dir,
    )
    return layout.index_dir
