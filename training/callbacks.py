"""Keras callback that sends each epoch's metrics to an MLflow run."""

from __future__ import annotations

import time
from typing import Any

import keras
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient


class MlflowEpochLogger(keras.callbacks.Callback):  # type: ignore[misc]  # keras is untyped
    """Logs loss/accuracy (and val_* when there is a validation set) plus the learning rate, step = epoch."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        super().__init__()
        self._client = client
        self._run_id = run_id

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        values = {key: float(value) for key, value in (logs or {}).items()}
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and "learning_rate" not in values:
            values["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, epoch + 1) for key, value in values.items()]
        self._client.log_batch(self._run_id, metrics=metrics)
