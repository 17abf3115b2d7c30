"""Shared fixtures: a tiny synthetic dataset and a tiny trained run, made once per test session.

Everything is real: real images on disk, a real (small) network of a registered backbone trained by
the real training code (tests.helpers.TINY_OPTIONS says which, and why not Xception). Small inputs
keep the suite fast on 2 CPU cores.
"""

from __future__ import annotations

import shutil

import pytest
from filelock import FileLock

from seeds_tf.core import config, runs, startup
from seeds_tf.core.paths import DATA_ENV, MODELS_ENV, Roots
from seeds_tf.data import synthetic
from tests.helpers import TINY_OPTIONS, copy_roots

LONGEST_FIRST = (
    "test_export.py",
    "test_distribute.py",
    "test_training.py",
    "test_legacy.py",
    "test_model.py",
    "test_platform.py",
    "test_training_features.py",
    "test_api.py",
    "test_cli.py",
    "test_identify_ray.py",
    "test_trust.py",
    "test_tracking.py",
    "test_concurrency.py",
    "test_identify.py",
    "test_faults.py",
    "test_hostile_inputs.py",
    "test_guards.py",
    "test_browser.py",
)
"""The test files that take longest (pytest --durations on 2 cores), longest first; the others
follow in their own order. The two xdist workers take files in this order: long ones first leaves
short ones to even out the end. The second needs no tiny run: one worker trains it for the first
while the other works instead of waiting."""


def pytest_configure(config: pytest.Config) -> None:
    """A process that runs tests (an xdist worker, or the only process) imports TensorFlow and Keras
    before it collects them, as the service's processes do (seeds_tf.core.startup); the xdist
    controller, which runs no test, imports neither."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        startup.import_tensorflow()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    # A stable sort: the tests of a file keep their order.
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


@pytest.fixture(scope="session")
def session_roots(tmp_path_factory, worker_id) -> Roots:
    """Data and models folders shared by the session, holding the tiny dataset and run: one copy for
    all the session's pytest-xdist workers, made by the first that needs it (the others wait on a
    file lock), so the tiny run is trained once, not once per worker. Tests copy, never change it."""
    base = tmp_path_factory.getbasetemp()
    shared = (base if worker_id == "master" else base.parent) / "seeds"
    roots = Roots(data=shared / "data", models=shared / "models")
    shared.mkdir(exist_ok=True)
    with FileLock(shared / "dataset.lock"):
        made = shared / "dataset.made"
        if not made.exists():
            shutil.rmtree(roots.data, ignore_errors=True)  # a worker that died while making it
            synthetic.generate_dataset(roots.data / "tiny", images_per_class=4, image_size=80, seed=1)
            roots.models.mkdir(exist_ok=True)
            made.touch()
    return roots


@pytest.fixture(scope="session")
def tiny_run(session_roots) -> str:
    """The id of a tiny run trained by the real training code (once per session, see session_roots)."""
    from seeds_tf.learning import training

    with FileLock(session_roots.models.parent / "tiny_run.lock"):
        made = runs.complete_runs(session_roots.models)
        if made:
            return made[0]
        return training.train(config.RunConfig.from_options(**TINY_OPTIONS), session_roots).run_id


@pytest.fixture
def roots(tmp_path, monkeypatch, session_roots, tiny_run) -> Roots:
    """Fresh folders for one test, holding copies of the tiny dataset and run, set in the environment."""
    return _in_environment(monkeypatch, copy_roots(session_roots, tmp_path))


@pytest.fixture
def data_roots(tmp_path, monkeypatch, session_roots) -> Roots:
    """Fresh folders holding a copy of the tiny dataset and no run, set in the environment: for
    tests that train or check data and never open the tiny run, which `roots` would copy (26 MB)
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
