"""How far a training is: the run's progress file, rewritten as it trains, and a line per epoch.

DEEPaaS says only "running" for the whole length of a training. While a run trains, its
`stats/progress.json` says how far it is: its state, epoch k of N, the last epoch's metrics, the
seconds elapsed and an estimate of those left; the model's metadata shows it (runs.trainings_in_
progress). The same figures go to the log once per epoch: on the terminal of `seeds-tf train` and
`seeds-tf demo`, and in the server's log for a training started through DEEPaaS (seeds_tf.api).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import keras

from seeds_tf.core import files, runs

_LOGGER = logging.getLogger(__name__)


@contextlib.contextmanager
def tracking(layout: runs.RunLayout, epochs: int, batch_interval_s: float = 10.0) -> Iterator[ProgressLog]:
    """Marks the run as being trained for the block (runs.mark_in_progress) and yields the Keras
    callback that records its progress, which says "preparing" at once. A block that raises leaves
    the last progress as it was: the run is then no longer in progress, whatever the file says.

    Args:
        layout: the run.
        epochs: the epochs the run trains (early stopping may end it sooner).
        batch_interval_s: seconds between two rewrites within an epoch. Defaults to 10: a real
            run's epochs last minutes, and each rewrite is synced to disk.
    """
    with runs.mark_in_progress(layout):
        progress = ProgressLog(layout, epochs, batch_interval_s)
        progress.write()
        yield progress


class ProgressLog(keras.callbacks.Callback):
    """Rewrites the run's progress file (atomically) when fitting starts, every `batch_interval_s`
    seconds within an epoch, after each epoch and when fitting ends; logs a line per epoch with
    the epoch's time, the time elapsed and an estimate of the time left. Made by `tracking`.

    The file holds `state` (preparing, training, finishing: saving and evaluating, done), `epoch`
    (epochs completed; null while preparing) of `epochs`, `batch` (batches completed in the current
    epoch) of `batches` (null when unknown), `metrics` (the last epoch's), `elapsed_s` (since this
    attempt started), `eta_s` (an estimate, null when there is none yet) and `updated`.
    """

    def __init__(self, layout: runs.RunLayout, epochs: int, batch_interval_s: float):
        super().__init__()
        self._layout = layout
        self._epochs = epochs
        self._interval = batch_interval_s
        self._state = "preparing"
        self._started = time.monotonic()
        self._fit_started: float | None = None
        self._first_epoch = 0
        self._epoch: int | None = None
        self._epoch_started = 0.0
        self._batch = 0
        self._metrics: dict[str, float | None] = {}
        self._written = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.monotonic()
        if self._fit_started is None:
            # A resumed run starts after its backed-up epochs: the estimate counts this attempt's.
            self._state = "training"
            self._fit_started = self._epoch_started
            self._first_epoch = self._epoch = epoch
            self.write()

    def on_train_batch_begin(self, batch, logs=None):
        self._batch = batch
        if time.monotonic() - self._written >= self._interval:
            self.write()

    def on_epoch_end(self, epoch, logs=None):
        self._epoch, self._batch = epoch + 1, 0
        values = {name: float(value) for name, value in (logs or {}).items() if name != "learning_rate"}
        # A metric that is no number (an overflowed val_loss) is null: JSON has no NaN, and the
        # model's metadata, which shows this record, must stay JSON for every client.
        self._metrics = {
            name: round(value, 6) if math.isfinite(value) else None for name, value in values.items()
        }
        record = self.write()
        _LOGGER.info(
            "Run %s epoch %d/%d in %s: %s; %s elapsed, about %s left",
            self._layout.run_id,
            self._epoch,
            self._epochs,
            _duration(time.monotonic() - self._epoch_started),
            ", ".join(f"{name} {value:.4g}" for name, value in values.items()),
            _duration(record["elapsed_s"]),
            _duration(record["eta_s"]),
        )

    def on_train_end(self, logs=None):
        # Saving the final model, evaluating it on the test split and drawing the reports follow.
        self._state = "finishing"
        self.write()

    def finish(self) -> None:
        """Says "done": the last step before the run is marked complete."""
        self._state = "done"
        self.write()

    def write(self) -> dict[str, Any]:
        """Rewrites the progress file; returns its record."""
        now = time.monotonic()
        steps = (self.params or {}).get("steps")
        record = {
            "state": self._state,
            "epoch": self._epoch,
            "epochs": self._epochs,
            "batch": self._batch,
            "batches": steps,
            "metrics": self._metrics,
            "elapsed_s": round(now - self._started, 1),
            "eta_s": self._eta(now, steps),
            "updated": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        files.write_json(self._layout.progress_file, record)
        self._written = now
        return record

    def _eta(self, now: float, steps: int | None) -> float | None:
        """Seconds left at this attempt's pace so far (epochs and, where the number of batches is
        known, the batches of the current epoch): None until there is a pace to go by, and
        while the run finishes; 0 once done."""
        if self._state == "done":
            return 0.0
        if self._state != "training" or self._fit_started is None or self._epoch is None:
            return None
        done = self._epoch - self._first_epoch + (self._batch / steps if steps else 0.0)
        if done <= 0:
            return None
        left = self._epochs - self._first_epoch - done
        return round((now - self._fit_started) * left / done, 1)


def _duration(seconds: float | None) -> str:
    """'2 h 05 min', '4 min 10 s', '12 s', or '?' when not known."""
    if seconds is None:
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"
