"""Optional MLflow tracking of training runs, on when `MLFLOW_TRACKING_URI` is set.

MLflow is an extra (`pip install seeds_tf[mlflow]`); without the variable nothing is imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import keras

TRACKING_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT = "seeds_tf"


def mlflow_enabled() -> bool:
    return bool(os.environ.get(TRACKING_ENV))


class MlflowLogger(keras.callbacks.Callback):
    """Logs a run's options, per-epoch metrics, test metrics and report files to MLflow.

    The MLflow run is named after the seeds_tf run id and tagged with it, so either finds the other.
    """

    def __init__(self, run_id: str, options: dict[str, Any]):
        super().__init__()
        import mlflow

        self._mlflow = mlflow
        self._run_id = run_id
        self._options = options

    def on_train_begin(self, logs=None):
        self._mlflow.set_experiment(EXPERIMENT)
        self._mlflow.start_run(run_name=self._run_id, tags={"seeds_tf.run_id": self._run_id})
        self._mlflow.log_params(self._options)

    def on_epoch_end(self, epoch, logs=None):
        metrics = {name: float(value) for name, value in (logs or {}).items()}
        self._mlflow.log_metrics(metrics, step=epoch + 1)

    def finish(self, metrics: dict[str, float], reports_dir: Path) -> None:
        """Logs the final metrics and reports and closes the MLflow run."""
        self._mlflow.log_metrics(metrics)
        self._mlflow.log_artifacts(str(reports_dir), artifact_path="reports")
        self._mlflow.end_run()

    def abort(self) -> None:
        if self._mlflow.active_run() is not None:
            self._mlflow.end_run(status="FAILED")
