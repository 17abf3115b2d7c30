"""TensorFlow and Keras imported once per process, at a fraction of the garbage collector's cost.

The two make a few million objects that live as long as the process. Python's cyclic garbage
collector scans them again and again while they are made, and again when the process exits:
about 1.5 of the 4 CPU-s a process spent importing them and exiting (benchmarks/NOTES.md).
"""

from __future__ import annotations

import gc
import sys


def import_tensorflow() -> None:
    """Imports Keras and TensorFlow, unless this process has, with the garbage collector paused,
    then freezes everything alive out of its scans (`gc.freeze`): what the import made lives as
    long as the process anyway. The faces (the CLI, the DEEPaaS adapter), and the legacy import,
    which verifies its tarball first, call it before their first module that imports TensorFlow.
    Once only: a later freeze would keep the cyclic garbage of that moment forever."""
    if "keras" in sys.modules:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        import keras  # noqa: F401 - imports TensorFlow, its backend
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
