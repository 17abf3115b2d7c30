"""Shared fixtures: a tiny synthetic dataset and a tiny trained run, made once per test session.

Everything is real: real images on disk, a real (small) Xception trained by the real training code.
Small inputs (71 px, the least Xception takes) keep the suite fast on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from seeds_tf.core import config
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV, Roots
from seeds_tf.data import synthetic

TINY_OPTIONS = {
    "weights": "none",
    "image_size": 71,
    "dense_units": 16,
    "epochs": 1,
    "batch_size": 16,
    "images_directory": "tiny/images",
    "splits_directory": "tiny/dataset_files",
}
"""Training options for a run that trains in seconds: for the code paths, not for accuracy."""

SMALL_OPTIONS = {**TINY_OPTIONS, "modelname": "MobileNetV3Small", "image_size": 32}
"""For tests of the training machinery (resume, cancel, workers, bad images, every option): the
same code with a registered backbone of 1M weights at 32 px, which trains and saves many times
faster than Xception's 21M at 71 px."""


@pytest.fixture(scope="session")
def session_roots(tmp_path_factory) -> Roots:
    """Data and models folders shared by the session, holding the tiny dataset and run."""
    base = tmp_path_factory.mktemp("seeds")
    roots = Roots(data=base / "data", models=base / "models")
    synthetic.generate_dataset(roots.data / "tiny", images_per_class=4, image_size=80, seed=1)
    return roots


@pytest.fixture(scope="session")
def tiny_run(session_roots) -> str:
    """The id of a tiny run trained by the real training code."""
    from seeds_tf.learning import training

    result = training.train(config.RunConfig.from_options(**TINY_OPTIONS), session_roots)
    return result.run_id


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


@pytest.fixture
def roots(tmp_path, monkeypatch, session_roots, tiny_run) -> Roots:
    """Fresh folders for one test, holding copies of the tiny dataset and run, set in the
    environment so DEEPaaS workers and subprocesses find them."""
    fresh = copy_roots(session_roots, tmp_path)
    monkeypatch.setenv(DATA_ENV, str(fresh.data))
    monkeypatch.setenv(MODELS_ENV, str(fresh.models))
    return fresh


@pytest.fixture
def empty_roots(tmp_path, monkeypatch) -> Roots:
    """Folders with no run at all, set in the environment."""
    fresh = Roots(data=tmp_path / "data", models=tmp_path / "models")
    fresh.data.mkdir()
    fresh.models.mkdir()
    monkeypatch.setenv(DATA_ENV, str(fresh.data))
    monkeypatch.setenv(MODELS_ENV, str(fresh.models))
    return fresh


def encode(pixels: np.ndarray, fmt: str, **save_args) -> bytes:
    """An image array encoded in the given Pillow format."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def seed_photo(roots: Roots, index: int = 0) -> Path:
    """A test image of the tiny dataset."""
    line = (roots.data / "tiny" / "dataset_files" / "test.txt").read_text().splitlines()[index]
    return roots.data / "tiny" / "images" / line.rsplit(" ", 1)[0]


def write_colour_dataset(root: Path, per_class: int = 20, size: int = 80, seed: int = 0) -> None:
    """Three classes anyone can tell apart (a red, a green or a blue disc on noise) in the split-file
    format: a network that cannot learn these has a broken training loop."""
    rng = np.random.default_rng(seed)
    colours = {
        "Rubra ruber": (220, 30, 30),
        "Viridis viridis": (30, 200, 30),
        "Caerulea caerulea": (30, 30, 220),
    }
    (root / "dataset_files").mkdir(parents=True)
    splits = {"train": [], "val": [], "test": []}
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
            splits[split].append(f"{relative} {label}")
    (root / "dataset_files" / "classes.txt").write_text("\n".join(colours) + "\n")
    for split, lines in splits.items():
        (root / "dataset_files" / f"{split}.txt").write_text("\n".join(lines) + "\n")
