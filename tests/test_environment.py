"""The environment `make test` and `make serve` build: one TensorFlow, and a quiet start."""

import importlib.metadata
import subprocess
import sys


def test_exactly_one_tensorflow_distribution_is_installed():
    """tensorflow, tensorflow-cpu and tensorflow[and-cuda] ship the same `tensorflow` package: two
    of them overwrite each other's files, and the full one logs CUDA errors on a CPU machine."""
    providers = importlib.metadata.packages_distributions().get("tensorflow", [])
    assert len(set(providers)) == 1, f"distributions providing the tensorflow package: {providers}"
