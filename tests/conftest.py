"""Shared fixtures: a tiny synthetic dataset and a tiny trained run, made once per test session.

Everything is real: real images on disk, a real (small) Xception trained by the real training code.
Small inputs (71 px, the least Xception takes) keep the suite fast on 2 CPU cores.
"""

from __future__ import annotations

import shutil

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
    """Fresh folders for one test, holding copies of the tiny dataset and run, set in the environment."""
    return _in_environment(monkeypatch, copy_roots(session_roots, tmp_path))


@pytest.fixture
def data_roots(tmp_path, monkeypatch, session_roots) -> Roots:
    """Fresh folders holding a copy of the tiny dataset and no run, set in the environment: for
    tests that train or check data and never open the tiny run, which `roots` would copy (160 MB)
    and train first."""
    fresh = Roots(data=tmp_path / "data", models=tmp_path / "models")
    shutil.copytree(session_roots.data, fresh.data)
    fresh.models.mkdir()
    return _in_environment(monkeypatch, fresh)


@pytest.fixture
def empty_roots(tmp_path, monkeypatch) -> Roots:
    """Folders with no run at all, set in the environment."""
    fresh = Roots(data=tmp_path / "data", models=tmp_path / "models")
    fresh.data.mkdir()
    fresh.models.mkdir()
    return _in_environment(monkeypatch, fresh)


def _in_environment(monkeypatch, fresh: Roots) -> Roots:
    """`fresh` set in the environment, so DEEPaaS workers and subprocesses find its folders."""
    monkeypatch.setenv(DATA_ENV, str(fresh.data))
    monkeypatch.setenv(MODELS_ENV, str(fresh.models))
    return fresh
