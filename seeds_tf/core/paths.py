"""Where data and trained runs live, and the guard that keeps request paths inside them.

`SEEDS_TF_DATA_DIR` and `SEEDS_TF_MODELS_DIR` choose the folders. Unset, a source checkout uses its own
`data/` and `models/`; an installed package uses `$XDG_DATA_HOME/seeds_tf` (`~/.local/share/seeds_tf`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from seeds_tf.core.errors import InputError

DATA_ENV = "SEEDS_TF_DATA_DIR"
MODELS_ENV = "SEEDS_TF_MODELS_DIR"


@dataclasses.dataclass(frozen=True)
class Roots:
    """The data and models folders of one process, passed explicitly to whatever needs them."""

    data: Path
    models: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Roots:
        base = _default_base(environ)
        data = environ.get(DATA_ENV) or base / "data"
        models = environ.get(MODELS_ENV) or base / "models"
        return cls(data=Path(data).resolve(), models=Path(models).resolve())

    def data_path(self, value: str, field: str) -> Path:
        """Resolves a user-given path inside the data folder, refusing any way out of it.

        Relative paths are taken from the data folder; absolute ones must point into it. Symbolic
        links are resolved before the check, so a link cannot lead outside either.
        """
        path = (self.data / value).resolve()
        if not path.is_relative_to(self.data):
            raise InputError(field, f"{value!r} is outside the data folder {self.data}")
        return path


def _default_base(environ: Mapping[str, str]) -> Path:
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "setup.cfg").is_file() and (checkout / "seeds_tf").is_dir():
        return checkout
    xdg = environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(xdg) / "seeds_tf"
