"""The environment `make test` and `make serve` build: one TensorFlow, and a quiet start."""

import importlib.metadata
import warnings

from seeds_tf.service import dependency_warnings


def test_exactly_one_tensorflow_distribution_is_installed():
    """tensorflow, tensorflow-cpu and tensorflow[and-cuda] ship the same `tensorflow` package: two
    of them overwrite each other's files, and the full one logs CUDA errors on a CPU machine."""
    providers = importlib.metadata.packages_distributions().get("tensorflow", [])
    assert len(set(providers)) == 1, f"distributions providing the tensorflow package: {providers}"


def test_the_server_silences_the_dependencies_deprecations_but_not_its_own():
    """As DEEPaaS sets warnings up in the server (every DeprecationWarning shown), then seeds_tf."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning shown, as DEEPaaS shows deprecations
        dependency_warnings.silence_deprecations()
        warnings.warn_explicit("from Keras", DeprecationWarning, "saving.py", 1, module="keras.src.saving")
        warnings.warn_explicit("from apispec", DeprecationWarning, "utils.py", 1, module="apispec.utils")
        warnings.warn_explicit("from seeds_tf", DeprecationWarning, "api.py", 1, module="seeds_tf.api")
        warnings.warn_explicit("a runtime problem", RuntimeWarning, "x.py", 1, module="keras.src.x")
    assert [str(warning.message) for warning in caught] == ["from seeds_tf", "a runtime problem"]
