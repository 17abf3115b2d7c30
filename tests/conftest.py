"""Shared fixtures: a tiny synthetic dataset and a tiny trained run, made once per test session.

Everything is real: real images on disk, a real (small) Xception trained by the real training code.
Small inputs (71 px, the least Xception takes) keep the suite fast on 2 CPU cores.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from seeds_tf import config, synthetic
from seeds_tf.paths import DATA_ENV, MODELS_ENV, Roots

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
    from seeds_tf import training

    result = training.train(config.RunConfig.from_options(**TINY_OPTIONS), session_roots)
    return result.run_id


@pytest.fixture
def roots(tmp_path, monkeypatch, session_roots, tiny_run) -> Roots:
    """Fresh folders for one test, holding copies of the tiny dataset and run, set in the
    environment so DEEPaaS workers and subprocesses find them."""
    fresh = Roots(data=tmp_path / "data", models=tmp_path / "models")
    shutil.copytree(session_roots.data, fresh.data)
    shutil.copytree(session_roots.models, fresh.models)
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
