"""Importing a run of the original service (TF 1.14 / Keras 2), such as the published seeds model.

The original seeds model is a tarball (`seeds.tar.xz`) of one run folder: `ckpts/final_model.h5`
(Xception, global average pooling, Dense(1024, relu), Dense(n, softmax), saved by Keras 2),
`conf/conf.json` and `dataset_files/classes.txt` (and `info.txt`). Keras 3 cannot deserialise that
model file, but the same architecture built here loads its weights exactly; the original fed images
through the backbone's own `preprocess_input`, which seeds_tf models carry inside, so predictions are
the same. The result is an ordinary, complete seeds_tf run.
"""

from __future__ import annotations

import logging
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import requests

from seeds_tf import runs
from seeds_tf.config import RunConfig
from seeds_tf.errors import InputError
from seeds_tf.model import build_classifier, save_classifier
from seeds_tf.paths import Roots
from seeds_tf.splits import copy_split_files, read_lines

_LOGGER = logging.getLogger(__name__)

PUBLISHED_SEEDS_MODEL = "https://cephrgw01.ifca.es:8080/swift/v1/seeds-tf/seeds.tar.xz"
"""Where the original service published its seeds model (743 species, 493 genera)."""

MAX_DOWNLOAD_BYTES = 4 * 1024**3
LEGACY_DENSE_UNITS = 1024
_TIMEOUTS = (10, 60)


def import_legacy(source: str, roots: Roots) -> str:
    """Imports a legacy run tarball (a local path or an http(s) URL) as a new complete run.

    Returns:
        The id of the new run.

    Raises:
        InputError: naming `source`, when it cannot be read or is not a legacy run.
    """
    with tempfile.TemporaryDirectory(prefix="seeds_tf_legacy_") as folder:
        scratch = Path(folder)
        archive = _download(source, scratch) if source.startswith(("http://", "https://")) else Path(source)
        if not archive.is_file():
            raise InputError("source", f"{source!r} is not a file or an http(s) URL")
        run_folder = _extract(archive, scratch / "run")
        weights, options, dataset_dir = _legacy_parts(run_folder)
        classes = read_lines(dataset_dir / "classes.txt")
        config = RunConfig.from_options(
            modelname=options.get("modelname", "Xception"),
            image_size=int(options.get("image_size", 224)),
            weights="none",
            dense_units=LEGACY_DENSE_UNITS,
        )
        model = build_classifier(config.model, len(classes))
        try:
            model.load_weights(weights)
        except (ValueError, OSError) as error:
            raise InputError(
                "source", f"{weights.name} does not fit the legacy architecture: {error}"
            ) from None

        layout = runs.create_run(roots.models)
        copy_split_files(dataset_dir, layout.dataset_dir)
        runs.write_conf(layout, config.to_dict())
        save_classifier(model, layout.final_model)
    runs.mark_complete(
        layout,
        modelname=config.model.modelname,
        image_size=config.model.image_size,
        num_classes=len(classes),
        metrics={},
        imported_from=source,
    )
    _LOGGER.info("Imported %s as run %s (%d classes)", source, layout.run_id, len(classes))
    return layout.run_id


def _download(url: str, folder: Path) -> Path:
    """Streams the tarball to disk with timeouts, a size cap and certificate checks."""
    target = folder / "legacy.tar"
    try:
        with requests.get(url, stream=True, timeout=_TIMEOUTS) as response:
            response.raise_for_status()
            size = 0
            with open(target, "wb") as stream:
                for chunk in response.iter_content(1024 * 1024):
                    size += len(chunk)
                    if size > MAX_DOWNLOAD_BYTES:
                        raise InputError("source", f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes")
                    stream.write(chunk)
    except requests.RequestException as error:
        raise InputError("source", f"cannot download {url}: {error}") from None
    return target


def _extract(archive: Path, destination: Path) -> Path:
    """Extracts the tarball safely (no absolute paths, no '..', no links out, no devices) and returns
    the run folder inside it: the folder that holds ckpts/."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(destination, filter="data")
    except (tarfile.TarError, OSError) as error:
        raise InputError("source", f"{archive.name} is not a readable tar archive: {error}") from None
    candidates = sorted(path.parent for path in destination.rglob("ckpts") if path.is_dir())
    if not candidates:
        raise InputError("source", f"{archive.name} holds no run folder (no ckpts/)")
    return candidates[0]


def _legacy_parts(run_folder: Path) -> tuple[Path, dict[str, Any], Path]:
    """The legacy model file, its model options and its dataset_files folder."""
    models = sorted((run_folder / "ckpts").glob("*.h5"))
    final = [path for path in models if path.stem.startswith("final")] or models
    if not final:
        raise InputError("source", "the run has no Keras 2 model (ckpts/*.h5)")
    dataset_dir = run_folder / "dataset_files"
    if not (dataset_dir / "classes.txt").is_file():
        raise InputError("source", "the run has no dataset_files/classes.txt")
    options: dict[str, Any] = {}
    conf_file = run_folder / "conf" / "conf.json"
    if conf_file.is_file():
        conf = runs.read_json(conf_file)
        model_group = conf.get("model", {}) if isinstance(conf, dict) else {}
        # The original saved either plain values or {"value": ...} entries per option.
        options = {
            name: entry.get("value") if isinstance(entry, dict) else entry
            for name, entry in model_group.items()
        }
    return final[0], options, dataset_dir
