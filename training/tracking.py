"""MLflow configuration shared by training and export.

Without ``MLFLOW_TRACKING_URI`` runs go to an embedded SQLite store, ``sqlite:///mlflow.db`` in the working
directory (MLflow 3's own default backend; the ``./mlruns`` file store is the legacy one), with artifacts in
``mlruns/`` next to the database. ``MLFLOW_TRACKING_URI`` points everything at a real server instead.
Telemetry is switched off: nothing here reaches the internet.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "mnist-mlp"
MODEL_ARTIFACT_DIR = "model"
#: The files of a training run, saved locally and logged as MLflow artifacts under MODEL_ARTIFACT_DIR.
MODEL_FILE = "model.keras"
TRAINING_INFO_FILE = "training.json"
ONNX_ARTIFACT_DIR = "onnx"

_QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    # Only the AI-gateway code reads it, but an empty value guarantees no remote model-catalog fetch.
    "MLFLOW_MODEL_CATALOG_URI": "",
}


def quiet_environment() -> None:
    """Environment that must be in place before ``import mlflow`` (the telemetry client starts on import)."""
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _sqlite_artifact_location(uri: str, experiment: str) -> str | None:
    """For a local SQLite store, ``mlruns/<experiment>/`` beside the database file (None: the store decides)."""
    if not uri.startswith("sqlite:///"):
        return None
    db_path = Path(unquote(uri[len("sqlite:///") :]))
    folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment).strip("._") or "experiment"
    return (db_path.resolve().parent / "mlruns" / folder).as_uri()


def configure(experiment: str) -> tuple[MlflowClient, str]:
    """Point MLflow at :func:`tracking_uri`, create ``experiment`` if needed; return (client, experiment id)."""
    mlflow_client = client()
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is not None:
        return mlflow_client, found.experiment_id
    artifact_location = _sqlite_artifact_location(tracking_uri(), experiment)
    return mlflow_client, mlflow_client.create_experiment(experiment, artifact_location=artifact_location)


def client() -> MlflowClient:
    """An explicit client for :func:`tracking_uri`; MLflow's global (fluent) state is never touched."""
    quiet_environment()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def run_tags(source: str) -> dict[str, str]:
    """The tags MLflow's fluent ``start_run`` would add (user, source), with our entry point as the source."""
    from mlflow.tracking.context.registry import resolve_tags

    tags: dict[str, str] = resolve_tags({})
    tags["mlflow.source.name"] = source
    return tags
