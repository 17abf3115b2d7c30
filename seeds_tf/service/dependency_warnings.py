"""Deprecation warnings of the dependencies, kept out of the server's log.

DEEPaaS 2.6 turns every DeprecationWarning into a WARNING line of the server log
(`warnings.simplefilter("default", DeprecationWarning)` with `logging.captureWarnings`). Those raised
from the dependencies' own code (the pinned DEEPaaS stack: apispec 3, aiohttp-apispec, webargs 5,
marshmallow 3; Keras saving through NumPy 2, once per epoch of a training) are about code neither an
operator nor seeds_tf can change: they are silenced in the server and its workers, so that the log
keeps the lines someone can act on. Deprecations raised from seeds_tf's own code, and every other
warning category, still show; the test suite keeps turning all of them into errors.
"""

from __future__ import annotations

import warnings

OUTSIDE_SEEDS_TF = r"(?!seeds_tf(\.|$))"
"""Matches the name of every module but seeds_tf's (a warning's module is where it is raised)."""


def silence_deprecations() -> None:
    """Ignores DeprecationWarning (marshmallow's RemovedInMarshmallow4Warning is one) raised from
    any module outside seeds_tf. Idempotent: `warnings` keeps one copy of a filter."""
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=OUTSIDE_SEEDS_TF)
