"""Importing a run of the original service (TF 1.14 / Keras 2), such as the published seeds model.

The original seeds model is a tarball (`seeds.tar.xz`) of one run folder: `ckpts/final_model.h5`
(Xception, global average pooling, Dense(1024, relu), Dense(n, softmax), saved by Keras 2),
`conf/conf.json` and `dataset_files/classes.txt` (and `info.txt`). Keras 3 cannot deserialise that
model file, but the same architecture built here loads its weights exactly; the original fed images
through the backbone's own `preprocess_input`, which seeds_tf models carry inside, so predictions are
the same. The result is an ordinary, complete seeds_tf run.

A tarball is identified by its SHA-256, logged on every import and recorded in the run; given an
expected digest, any other tarball is refused before anything is written (the pre-trained image's
build pins the published model this way). The run records its held-out accuracy when the test split's
images come with the tarball or lie in the data folder, and says why not otherwise.

TensorFlow loads only once the tarball has been verified and read: a wrong digest or a tarball that is
not a legacy run is told in a fraction of a second, not after the seconds TensorFlow takes to import.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tarfile
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import requests

from seeds_tf.core import files, runs, startup
from seeds_tf.core.config import RunConfig
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import Roots
from seeds_tf.data.splits import copy_split_files, label_problems, read_labels, read_split

_LOGGER = logging.getLogger(__name__)

PUBLISHED_SEEDS_MODEL = "https://api.cloud.ifca.es:8080/swift/v1/seeds-tf/seeds.tar.xz"
"""Where the original service's seeds model (743 species, 493 genera) is published today (the DEEP-era
address cephrgw01.ifca.es served the same object store)."""

MAX_DOWNLOAD_BYTES = 4 * 1024**3
LEGACY_DENSE_UNITS = 1024
_TIMEOUTS = (10, 60)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def import_legacy(source: str, roots: Roots, *, sha256: str = "", batch_size: int = 32) -> str:
    """Imports a legacy run tarball (a local path or an http(s) URL) as a new complete run.

    Args:
        source: path or http(s) URL of the tarball.
        roots: where the run goes (`roots.models`) and where test images may be (`roots.data`).
        sha256: expected SHA-256 of the tarball, 64 hex digits; empty (the default) accepts any
            tarball, logging its digest so that it can be pinned.
        batch_size: batch size of the held-out evaluation. Defaults to 32.

    Returns:
        The id of the new run.

    Raises:
        InputError: naming `sha256` for a malformed or different digest, `source` when the tarball
            cannot be read or is not a legacy run; nothing is written to the models folder then.
    """
    expected = sha256.strip().lower()
    if expected and not _SHA256.fullmatch(expected):
        raise InputError("sha256", f"expected 64 hexadecimal digits. Received: {sha256!r}")
    is_url = source.startswith(("http://", "https://"))
    # What is logged and recorded (run.json, the public metadata): no credentials or signed tokens.
    shown = public_url(source) if is_url else source
    with tempfile.TemporaryDirectory(prefix="seeds_tf_legacy_") as folder:
        scratch = Path(folder)
        archive = _download(source, scratch) if is_url else Path(source)
        if not archive.is_file():
            raise InputError("source", f"{source!r} is not a file or an http(s) URL")
        digest = file_sha256(archive)
        _LOGGER.warning("SHA-256 of %s: %s", shown, digest)
        if expected and digest != expected:
            raise InputError("sha256", f"{shown} has SHA-256 {digest}, not the expected {expected}: refused")
        run_folder = _extract(archive, scratch / "run")
        weights, config, dataset_dir, classes = _legacy_parts(run_folder)
        startup.import_tensorflow()
        from seeds_tf.classifier.model import build_classifier, save_classifier  # TensorFlow: see above

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
        test_images = _images_folders(scratch / "run")
        metrics, held_out = _held_out_evaluation(
            model, config, layout, [*test_images, roots.data / "images"], batch_size=batch_size
        )
    runs.mark_complete(
        layout,
        metrics=metrics,
        imported_from=shown,
        sha256=digest,
        held_out=held_out,
    )
    _LOGGER.info("Imported %s as run %s (%d classes): %s", shown, layout.run_id, len(classes), held_out)
    return layout.run_id


def public_url(url: str) -> str:
    """`url` without what must not be shown: user name, password, query (signed URLs carry their
    token there) and fragment. The SHA-256 identifies the tarball."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _images_folders(extracted: Path) -> list[Path]:
    """The `images/` folders that came in the tarball."""
    return sorted(path for path in extracted.rglob("images") if path.is_dir())


def _held_out_evaluation(
    model, config: RunConfig, layout: runs.RunLayout, images_dirs: list[Path], *, batch_size: int
) -> tuple[dict[str, float], str]:
    """The test metrics of the imported model and a sentence saying on what they were measured, or
    why there are none: the published tarball lists its test split but does not hold its images."""
    from seeds_tf.learning import evaluation, reports  # TensorFlow: see the module's docstring

    classes = layout.classes()
    test_file = layout.dataset_dir / "test.txt"
    if not test_file.is_file():
        return {}, "not evaluated: the tarball has no test split (dataset_files/test.txt)"
    problems = []
    for images_dir in images_dirs:
        try:
            split = read_split(test_file, "test", images_dir, len(classes), "source")
        except InputError as error:
            problems.append(f"{images_dir}: {error.problem}")
            continue
        if split.labels is None:
            return {}, "not evaluated: the tarball's test split has no labels"
        result = evaluation.evaluate_split(model, split, classes, config.model.image_size, batch_size)
        reports.write_evaluation(result, layout.reports_dir, prefix="test")
        return evaluation.test_metrics(result), f"evaluated on {len(split.paths)} test images in {images_dir}"
    return {}, "not evaluated: the test split's images are in neither place (" + "; ".join(problems) + ")"


def _download(url: str, folder: Path) -> Path:
    """Streams the tarball to disk with timeouts, a size cap and certificate checks. Errors name
    the URL without its credentials or query (requests' own messages may hold both)."""
    target, shown = folder / "legacy.tar", public_url(url)
    try:
        with requests.get(url, stream=True, timeout=_TIMEOUTS) as response:
            response.raise_for_status()
            size = 0
            with open(target, "wb") as stream:
                for chunk in response.iter_content(1024 * 1024):
                    size += len(chunk)
                    if size > MAX_DOWNLOAD_BYTES:
                        raise InputError("source", f"{shown} is larger than {MAX_DOWNLOAD_BYTES} bytes")
                    stream.write(chunk)
    except requests.HTTPError as error:
        raise InputError("source", f"cannot download {shown}: HTTP {error.response.status_code}") from None
    except requests.RequestException as error:
        raise InputError("source", f"cannot download {shown}: {type(error).__name__}") from None
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


def _legacy_parts(run_folder: Path) -> tuple[Path, RunConfig, Path, tuple[str, ...]]:
    """The legacy model file, the run's configuration, its checked dataset_files folder and classes.

    Raises:
        InputError: naming `source`, for a part that is missing or is not what the original wrote.
    """
    models = sorted((run_folder / "ckpts").glob("*.h5"))
    final = [path for path in models if path.stem.startswith("final")] or models
    if not final:
        raise InputError("source", "the run has no Keras 2 model (ckpts/*.h5)")
    dataset_dir = run_folder / "dataset_files"
    if not (dataset_dir / "classes.txt").is_file():
        raise InputError("source", "the run has no dataset_files/classes.txt")
    try:
        classes, info = read_labels(dataset_dir)
    except ValueError as error:  # not UTF-8
        raise InputError("source", f"dataset_files is unreadable: {error}") from None
    problems = [problem.message for problem in label_problems(classes, info)]
    if problems:
        raise InputError("source", "dataset_files: " + "; ".join(problems))
    return final[0], _legacy_config(run_folder / "conf" / "conf.json"), dataset_dir, classes


def _legacy_config(conf_file: Path) -> RunConfig:
    """The seeds_tf configuration of the legacy model that conf/conf.json (optional) describes.

    Raises:
        InputError: naming `source`, when conf.json is not the original's.
    """
    model_group: Any = {}
    try:
        if conf_file.is_file():
            conf = files.read_json(conf_file)
            model_group = conf.get("model", {}) if isinstance(conf, dict) else {}
        # The original saved either plain values or {"value": ...} entries per option.
        options = {
            name: value.get("value") if isinstance(value, dict) else value
            for name, value in model_group.items()
        }
        return RunConfig.from_options(
            modelname=options.get("modelname", "Xception"),
            image_size=int(options.get("image_size", 224)),
            weights="none",
            dense_units=LEGACY_DENSE_UNITS,
        )
    except (ValueError, TypeError, AttributeError, InputError) as error:  # not JSON, or of another shape
        raise InputError("source", f"conf/conf.json is not the original's: {error}") from None
