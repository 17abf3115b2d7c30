"""A training's options checked against the disk, cheaply and without TensorFlow.

The server runs these checks when a training is asked for (a 422 before DEEPaaS queues it), `seeds-tf
train` before TensorFlow loads (a mistyped folder is told at once, not ten seconds later), and the
training itself, however it was started.
"""

from __future__ import annotations

from pathlib import Path

from seeds_tf.core import runs
from seeds_tf.core.config import RunConfig
from seeds_tf.core.errors import InputError
from seeds_tf.core.paths import Roots
from seeds_tf.hosting import remote

PRETRAINED = ("imagenet", "none")
"""The `weights` that name no file: Keras' ImageNet download, and a random initialisation."""


def check(config: RunConfig, roots: Roots) -> None:
    """Checks a training's options against the disk: its folders, weights file, upload destination
    and, for a resume, the interrupted run and the options it would ignore (RunConfig.check_resume_of);
    a resumed run trains with its own options, so those are the ones checked.

    Raises:
        InputError: naming the first option that does not hold.
    """
    if config.training.resume:
        config = resumed_config(config, roots.models)
    training = config.training
    # In the order the training checked them before, so a command names the same option as it did.
    weights_file(roots, config.model.weights)
    existing_path(roots, training.splits_directory, "splits_directory")
    existing_path(roots, training.images_directory, "images_directory", must_be="folder")
    if training.upload_to:
        remote.check_destination(training.upload_to)


def resumed_config(config: RunConfig, models: Path) -> RunConfig:
    """The configuration the interrupted run `config.training.resume` trains with, its own, once
    `config` asks for nothing it would ignore (RunConfig.check_resume_of).

    Raises:
        InputError: naming `resume` for a run that is not an interrupted one, or the option ignored.
    """
    own = runs.resolve_interrupted_run(models, config.training.resume).config()
    config.check_resume_of(own)
    return own


def existing_path(roots: Roots, value: str, field: str, must_be: str = "") -> Path:
    """`value` resolved inside the data folder (Roots.data_path), and a "folder" or a "file" when
    `must_be` says so (default "": anything, or nothing yet).

    Raises:
        InputError: naming `field`, for a path out of the data folder, not what `must_be` says, or
            that no file system accepts (a NUL byte, a name over 255 bytes).
    """
    try:
        path = roots.data_path(value, field)
        found = {"folder": path.is_dir, "file": path.is_file}[must_be]() if must_be else True
    except InputError:
        raise
    except (ValueError, OSError) as error:
        # ValueError from resolve() for a NUL byte, ENAMETOOLONG from is_dir() for a long name.
        reason = getattr(error, "strerror", None) or str(error)
        raise InputError(field, f"{value!r} is not a valid path ({reason})") from None
    if not found:
        raise InputError(field, f"{value!r} is not a {must_be} inside the data folder")
    return path


def weights_file(roots: Roots, weights: str) -> Path | None:
    """The weights file that `weights` names inside the data folder; None for PRETRAINED's words.

    Raises:
        InputError: naming `weights`, for anything else.
    """
    if weights in PRETRAINED:
        return None
    try:
        return existing_path(roots, weights, "weights", must_be="file")
    except InputError as error:
        expected = "expected 'imagenet', 'none' or a weights file"
        raise InputError("weights", f"{expected}; {error.problem}") from None
