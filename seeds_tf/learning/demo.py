"""The demo run: what `make serve` trains when models/ holds no run yet.

The real seeds images cannot be fetched everywhere, so the demo trains on the synthetic seeds dataset
(`seeds_tf.data.synthetic`) with the small, fast settings of the `demo` section of etc/config.yaml.
It is a demonstration of the service, not a model of real seeds. Some synthetic species are left out
of its classes, and photos without a seed are drawn too, to measure how the run tells images unlike
its classes apart (reports/trust.json).
"""

from __future__ import annotations

import logging

from seeds_tf.core import config, runs
from seeds_tf.core.paths import Roots
from seeds_tf.data import synthetic
from seeds_tf.hosting import admission

_LOGGER = logging.getLogger(__name__)

DEMO_FOLDER = "synthetic_seeds"
"""Folder of the synthetic dataset inside the data folder."""


def ensure_demo_run(roots: Roots) -> str:
    """Returns the newest working run, training the demo run first if there is none (broken runs
    do not count: the service could not serve them)."""
    existing = list(runs.list_runs(roots.models).working)
    if existing:
        _LOGGER.info("Found run %s; no demo training needed", existing[-1])
        return existing[-1]
    return train_demo_run(roots)


def train_demo_run(roots: Roots) -> str:
    """Generates the synthetic dataset (unless present) and trains the demo run on it, under the
    reservation a server's training takes (`seeds-tf demo --force` beside a running server).

    Raises:
        InputError: naming `training`, while another training is reserved or runs.
    """
    from seeds_tf.learning import training, trust

    with admission.reserved(roots.models):
        synthetic_args, overrides = config.demo_settings()
        dataset_root = roots.data / DEMO_FOLDER
        if not (dataset_root / "dataset_files" / "train.txt").is_file():
            _LOGGER.info("Generating the synthetic seeds dataset in %s", dataset_root)
            synthetic.generate_dataset(dataset_root, **synthetic_args)
        run_config = config.RunConfig.from_options(
            images_directory=f"{DEMO_FOLDER}/images",
            splits_directory=f"{DEMO_FOLDER}/dataset_files",
            **overrides,
        )
        _LOGGER.info("Training the demo run: %s", run_config)
        run_id = training.train(run_config, roots).run_id
        trust.evaluate_trust(roots, run_id, synthetic.unseen_folders(dataset_root))
    return run_id
