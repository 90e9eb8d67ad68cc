"""MLflow configuration shared by training and export.

Without ``MLFLOW_TRACKING_URI`` runs go to an embedded SQLite store, ``sqlite:///mlflow.db`` in the working
directory (MLflow 3's own default backend; the ``./mlruns`` file store is the legacy one), with artifacts in
``mlruns/`` next to the database. ``MLFLOW_TRACKING_URI`` points everything at a real server instead.
Telemetry is switched off: nothing here reaches the internet.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "mnist-mlp"
MODEL_ARTIFACT_DIR = "model"
ONNX_ARTIFACT_DIR = "onnx"

_QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    # Do not let MLflow shell out to git to tag runs (the tree may have no commits yet).
    "MLFLOW_TRACKING_DISABLE_GIT": "true",
    "GIT_PYTHON_REFRESH": "quiet",
}


def quiet_environment() -> None:
    """Environment that must be in place before ``import mlflow`` (the telemetry client starts on import)."""
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _sqlite_artifact_root(uri: str) -> str | None:
    """For a local SQLite store, the ``mlruns/`` directory beside the database file."""
    if not uri.startswith("sqlite:///"):
        return None
    db_path = Path(unquote(urlparse(uri).path if uri.startswith("sqlite:////") else uri[len("sqlite:///") :]))
    return (db_path.resolve().parent / "mlruns").as_uri()


def configure(experiment: str) -> tuple[MlflowClient, str]:
    """Point MLflow at :func:`tracking_uri`, create ``experiment`` if needed; return (client, experiment id)."""
    quiet_environment()
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return client, found.experiment_id
    experiment_id = client.create_experiment(experiment, artifact_location=_sqlite_artifact_root(uri))
    return client, experiment_id
