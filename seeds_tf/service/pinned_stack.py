"""The DEEPaaS 2.6 stack as seeds_tf runs inside it.

DEEPaaS 2.6 pins apispec 3, aiohttp-apispec, webargs 5 and marshmallow 3 and turns every
DeprecationWarning into a WARNING line of the server log (`warnings.simplefilter("default",
DeprecationWarning)` with `logging.captureWarnings`). Those warnings are about the pinned stack's own
code, which neither an operator nor seeds_tf can change: they are silenced, in the server process only,
so that the log keeps the lines someone can act on. Warnings raised by seeds_tf's code, and every
other category, still show.
"""

from __future__ import annotations

import warnings

PINNED_MODULES = r"(deepaas|apispec|aiohttp_apispec|webargs|setuptools\._distutils)(\.|$)"
"""Modules of the pinned stack whose deprecation warnings are silenced (setuptools' distutils
shim is where apispec's `LooseVersion` calls warn)."""


def silence_deprecations() -> None:
    """Ignores DeprecationWarning (marshmallow's RemovedInMarshmallow4Warning is one) raised from
    the pinned stack's modules. Idempotent: the filter is added once."""
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=PINNED_MODULES)
