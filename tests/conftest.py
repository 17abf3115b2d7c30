"""Shared fixtures: a tiny synthetic dataset and a tiny trained run, made once per test session.

Everything is real: real images on disk, a real (small) Xception trained by the real training code.
Small inputs (71 px, the least Xception takes) keep the suite fast on 2 CPU cores.
"""

from __future__ import annotations

import pytest

from seeds_tf.core import config
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV, Roots
from seeds_tf.data import synthetic
from tests.helpers import TINY_OPTIONS, copy_roots


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
