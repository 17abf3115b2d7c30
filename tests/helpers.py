"""What the tests share besides fixtures: options of tiny runs, files in the formats the service
reads (images, colour datasets, a Keras 2 model of the original service), in-process services."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import PIL.Image
import psutil
import pytest

from seeds_tf.core import config, runs
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV, Roots
from seeds_tf.data.splits import copy_split_files, write_split_files

if TYPE_CHECKING:  # Keras imports TensorFlow: 3 s that pytest-xdist's controller, which loads this
    import keras  # through conftest.py, would spend before it starts the workers

TINY_OPTIONS = {
    "weights": "none",
    "modelname": "MobileNet",
    "image_size": 64,
    "dense_units": 16,
    "epochs": 1,
    "batch_size": 16,
    "images_directory": "tiny/images",
    "splits_directory": "tiny/dataset_files",
    "run_eagerly": True,
}
"""Training options of the session's tiny run, which trains in seconds: for the code paths of the
service, the commands and the trust files, which are the same for every registered backbone, not
for accuracy. MobileNet (3M weights, 92 layers): most tests load the tiny run, and a run of it
loads in about half of a tiny Xception's time and traces its forward pass in about a third. At 64
px its backbone's grid is 2 x 2, so that a Grad-CAM heatmap is a map, not one cell. In eager
steps: a training of a few steps spends more time tracing its graph than running it (the tiny run
in a fresh process: 9.9 s, against 18.1 s compiled; the same weights). The Xception core has tests
of its own (TINY_XCEPTION_OPTIONS; the folding, backbone and legacy tests build it)."""

TINY_XCEPTION_OPTIONS = {**TINY_OPTIONS, "modelname": "Xception", "image_size": 71, "run_eagerly": False}
"""The service's core at the least size it takes, in a compiled graph: for the tests of the core
itself (that it learns, its limits, its ImageNet weights). The distributed training and "the
network learns" train compiled graphs (in eager steps, "the network learns" took 85 s against 42 s)."""

SMALL_OPTIONS = {**TINY_OPTIONS, "image_size": 32}
"""For tests of the training machinery (resume, cancel, bad images, every option): the tiny run's
network at 32 px, in eager steps (two epochs in a fresh process: 6.5 s, against 10.7 s compiled
and 8.9 s for an eager MobileNetV3Small, benchmarks/NOTES.md)."""


def train_flags(options: dict) -> list[str]:
    """`options` as flags of `seeds-tf train`: `--name=value`, and `--name` or `--no-name` for booleans."""
    return [
        (f"--{name}" if value else f"--no-{name}") if isinstance(value, bool) else f"--{name}={value}"
        for name, value in options.items()
    ]


def copy_roots(source: Roots, base: Path) -> Roots:
    """Copies of the data and models folders of `source` in `base`/data and `base`/models."""
    copied = Roots(data=base / "data", models=base / "models")
    shutil.copytree(source.data, copied.data)
    shutil.copytree(source.models, copied.models)
    return copied


@contextlib.contextmanager
def in_process_service(base: Path, session_roots: Roots, **env: str) -> Iterator[tuple]:
    """The DEEPaaS app in this process over copies of the session's dataset and run in `base`, with
    uploads in `base`/uploads so a test can check that none is left behind; yields (app, roots,
    uploads). `env` adds environment variables for the service."""
    from tests.deepaas_harness import InProcessDeepaas

    roots = copy_roots(session_roots, base)
    uploads = base / "uploads"
    uploads.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {DATA_ENV: str(roots.data), MODELS_ENV: str(roots.models), **env}.items():
            patch.setenv(name, value)
        patch.setattr(tempfile, "tempdir", str(uploads))
        app = InProcessDeepaas()
        try:
            yield app, roots, uploads
        finally:
            app.close()


def encode(pixels: np.ndarray, fmt: str, **save_args) -> bytes:
    """An image array encoded in the given Pillow format."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def seed_photo(roots: Roots, index: int = 0) -> Path:
    """A test image of the tiny dataset."""
    line = (roots.data / "tiny" / "dataset_files" / "test.txt").read_text().splitlines()[index]
    return roots.data / "tiny" / "images" / line.rsplit(" ", 1)[0]


def write_colour_dataset(
    root: Path, per_class: int = 20, size: int = 80, seed: int = 0, *, split_files: bool = True
) -> None:
    """Three classes anyone can tell apart (a red, a green or a blue disc on noise) in `root`/images,
    one folder per class, and in the split-file format in `root`/dataset_files unless `split_files`
    is False: a network that cannot learn these has a broken training loop."""
    rng = np.random.default_rng(seed)
    colours = {
        "Rubra ruber": (220, 30, 30),
        "Viridis viridis": (30, 200, 30),
        "Caerulea caerulea": (30, 30, 220),
    }
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for label, (name, colour) in enumerate(colours.items()):
        (root / "images" / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3)).astype(np.float64)
            yy, xx = np.mgrid[:size, :size]
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 4) ** 2
            pixels[disc] = colour
            relative = f"{name}/{index:03d}.png"
            PIL.Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / relative)
            split = "train" if index < per_class * 0.6 else "val" if index < per_class * 0.8 else "test"
            splits[split].append((relative, label))
    if split_files:
        write_split_files(root / "dataset_files", list(colours), splits)


def save_keras2_h5(model: keras.Model, path: Path, keras_version: str = "2.2.4-tf") -> None:
    """Writes `model`'s weights as the original service's Keras 2 (TF 1.14) `model.save` left them
    in an .h5 file, with h5py: the version attributes, `model_weights` with the layer names in model
    order, and per layer its `weight_names` ("layer/kernel:0", trainable weights first) and one
    dataset per weight under those names. The importer rebuilds the architecture from conf.json and
    reads only the weights, so the model's JSON config is not written. Keras 3 alone can no longer
    save this format, and tf-keras would pull a second, full TensorFlow into the environment."""
    with h5py.File(path, "w") as file:
        file.attrs["keras_version"] = keras_version.encode()
        file.attrs["backend"] = b"tensorflow"
        group = file.create_group("model_weights")
        group.attrs["keras_version"] = keras_version.encode()
        group.attrs["backend"] = b"tensorflow"
        group.attrs["layer_names"] = np.array([layer.name.encode() for layer in model.layers])
        for layer in model.layers:
            layer_group = group.create_group(layer.name)
            weights = layer.trainable_weights + layer.non_trainable_weights
            names = [f"{layer.name}/{weight.name}:0".encode() for weight in weights]
            layer_group.attrs["weight_names"] = np.array(names, dtype="S") if names else np.array([], "S1")
            for name, weight in zip(names, weights, strict=True):
                layer_group.create_dataset(name.decode(), data=weight.numpy())


def unstarted_run(roots: Roots, options: dict) -> runs.RunLayout:
    """A run folder as a training leaves it when it dies before its first epoch: its configuration
    (`options`) and split files, nothing trained. Costs no training, unlike interrupted_run."""
    run_config = config.RunConfig.from_options(**options)
    layout = runs.create_run(roots.models)
    copy_split_files(roots.data / run_config.training.splits_directory, layout.dataset_dir)
    runs.write_conf(layout, run_config.to_dict())
    return layout


def interrupted_run(
    models: Path, options: dict, timeout: float = 300, marker: str = "ckpts/backup/state.json"
) -> str:
    """A run as a crash leaves it: `seeds-tf train` with `options` (the data and models folders
    from the environment; `resume` for a run already there), SIGKILLed as soon as the file `marker`
    of the run exists (by default, once its first epoch is backed up). Returns its id."""
    before = (set(os.listdir(models)) if models.is_dir() else set()) - {options.get("resume")}
    seeds_tf = Path(sys.executable).parent / "seeds-tf"
    process = subprocess.Popen(
        [str(seeds_tf), "--quiet", "train", *train_flags(options)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            reached = {path.relative_to(models).parts[0] for path in models.glob(f"*/{marker}")} - before
            if reached:
                return reached.pop()
            time.sleep(0.1)
        problem = process.stderr.read() if process.poll() else "timeout"
        raise AssertionError(f"no {marker} was written: {problem}")
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()


def tensorflow_mapped_into(pid: int) -> list[str]:
    """The TensorFlow files mapped into process `pid` and its descendants: its libraries, once
    anything there has imported it."""
    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    mapped = {region.path for process in processes for region in process.memory_maps()}
    return [path for path in mapped if "tensorflow" in path]
