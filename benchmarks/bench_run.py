"""A complete run folder for benchmarks: the network the service really serves, without training it.

The original seeds model was an Xception at 299 px over 743 species. Speed and memory do not depend
on what the weights learned, so a randomly initialised classifier of that size, saved as a complete
run (conf/conf.json, dataset_files/classes.txt, ckpts/final.keras, run.json), is what a benchmark of
serving needs: `deepaas-run` and `seeds_tf.prediction.inference.predict` accept it like any trained run.

    from bench_run import make_benchmark_run, seed_jpeg
    layout = make_benchmark_run(models_dir)           # Xception, 299 px, 743 classes
"""

from __future__ import annotations

import io
from pathlib import Path

import keras
import numpy as np

from seeds_tf.classifier.model import build_classifier, save_classifier
from seeds_tf.core import config, files, runs
from seeds_tf.data import synthetic

ORIGINAL_CLASSES = 743
"""Species of the original seeds model."""


def class_names(count: int) -> list[str]:
    """ "Genus species" names, two species per genus (genera add up in the predictions)."""
    return [f"Genus{i // 2} species{i}" for i in range(count)]


def make_benchmark_run(
    models_dir: Path,
    *,
    modelname: str = "Xception",
    image_size: int = 299,
    num_classes: int = ORIGINAL_CLASSES,
    dense_units: int = 1024,
    seed: int = 0,
) -> runs.RunLayout:
    """Writes a complete run with a randomly initialised classifier into `models_dir`.

    The run's conf.json is a full RunConfig (as a training writes it), so the service reloads the
    model with the same options it was built with.
    """
    run_config = config.RunConfig.from_options(
        modelname=modelname, image_size=image_size, weights="none", dense_units=dense_units
    )
    keras.utils.set_random_seed(seed)
    model = build_classifier(run_config.model, num_classes)
    layout = runs.create_run(models_dir)
    runs.write_conf(layout, run_config.to_dict())
    files.write_text(layout.classes_file, "\n".join(class_names(num_classes)) + "\n")
    save_classifier(model, layout.final_model)
    runs.mark_complete(
        layout,
        metrics={},
        benchmark="random weights, never trained",
    )
    del model
    keras.backend.clear_session()
    return layout


def seed_jpeg(image_size: int = 299, species: int = 0, seed: int = 0, quality: int = 90) -> bytes:
    """A synthetic seed photo, `image_size` pixels square, as JPEG bytes."""
    image = synthetic.draw_seed_image(
        species % len(synthetic.SPECIES), image_size, np.random.default_rng(seed)
    )
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
