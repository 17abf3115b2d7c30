"""Prediction with a trained run: loading it once per process and naming the species in images."""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from seeds_tf import images, runs
from seeds_tf.config import ModelConfig, PredictConfig, RunConfig
from seeds_tf.model import load_classifier
from seeds_tf.paths import Roots
from seeds_tf.splits import read_lines

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A run ready to predict: its model with the config and class names it was trained with."""

    run_id: str
    model: keras.Model
    config: ModelConfig
    classes: tuple[str, ...]
    info: tuple[str, ...] | None


def load_run(layout: runs.RunLayout) -> LoadedRun:
    """Loads the final model of a complete run, with its class names and model config."""
    config = RunConfig.from_dict(runs.read_json(layout.conf_file)).model
    classes = tuple(read_lines(layout.dataset_dir / "classes.txt"))
    info_file = layout.dataset_dir / "info.txt"
    info = tuple(read_lines(info_file)) if info_file.is_file() else None
    model = load_classifier(layout.final_model)
    if model.output_shape[-1] != len(classes):
        raise ValueError(
            f"Run {layout.run_id}: the model has {model.output_shape[-1]} outputs for {len(classes)} classes"
        )
    _LOGGER.info("Loaded run %s (%s, %d px)", layout.run_id, config.modelname, config.image_size)
    return LoadedRun(layout.run_id, model, config, classes, info)


class RunCache:
    """The runs loaded in this process, the least recently used dropped beyond `capacity`.

    A run is keyed by its id and the modification time of its model file, so a run replaced on disk
    is loaded again. Thread-safe: loading happens under a lock.
    """

    def __init__(self, capacity: int = 2):
        self._capacity = capacity
        self._runs: collections.OrderedDict[tuple[str, int], LoadedRun] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, layout: runs.RunLayout) -> LoadedRun:
        key = (layout.run_id, layout.final_model.stat().st_mtime_ns)
        with self._lock:
            if key not in self._runs:
                self._runs[key] = load_run(layout)
                while len(self._runs) > self._capacity:
                    self._runs.popitem(last=False)
            self._runs.move_to_end(key)
            return self._runs[key]


def classify(run: LoadedRun, pixels: Sequence[np.ndarray], top_k: int) -> list[list[dict[str, Any]]]:
    """The top_k species for each image, most probable first.

    Args:
        run: the loaded run that predicts.
        pixels: RGB uint8 images of any size, as `images.decode_image` gives them.
        top_k: how many species to return per image (all of them when there are fewer).
    """
    batch = np.stack([images.resize(image, run.config.image_size).numpy() for image in pixels])
    probabilities = np.asarray(run.model.predict_on_batch(batch), dtype=np.float64)
    k = min(top_k, len(run.classes))
    results = []
    for row in probabilities:
        best = np.argsort(-row, kind="stable")[:k]
        results.append(
            [{"label_id": int(i), "label": run.classes[i], "probability": float(row[i])} for i in best]
        )
    return results


def predict(
    roots: Roots, cache: RunCache, config: PredictConfig, uploads: Sequence[tuple[str, bytes]]
) -> dict[str, Any]:
    """Answers one prediction request: the run chosen by `config.timestamp` names the species in
    each uploaded image.

    Args:
        roots: where the runs are.
        cache: the runs already loaded in this process.
        config: top_k and the run to use.
        uploads: (name, encoded bytes) of each image, in the order of the response.

    Raises:
        InputError: for an unknown run or an image that cannot be decoded.
    """
    layout = runs.resolve_run(roots.models, config.timestamp)
    pixels = [images.decode_image(data, "image", name) for name, data in uploads]
    run = cache.get(layout)
    species = classify(run, pixels, config.top_k)
    return {
        "run_id": run.run_id,
        "results": [
            {"image": name, "species": ranked} for (name, _), ranked in zip(uploads, species, strict=True)
        ],
    }
