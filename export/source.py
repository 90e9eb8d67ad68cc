"""Where the Keras model comes from: a ``.keras`` file, or the ``model/`` artifact of an MLflow run.

Training writes ``training.json`` next to ``model.keras`` (and logs both under ``model/``); it carries the run
id, the command and the hyper-parameters that the metadata records.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.errors import ExportError
from training.tracking import MODEL_ARTIFACT_DIR, MODEL_FILE, TRAINING_INFO_FILE, client, tracking_uri


@dataclass(frozen=True)
class ModelSource:
    model_path: Path
    run_id: str | None
    # training.json as written by mnist-train; empty for a model from elsewhere.
    info: dict[str, Any] = field(default_factory=dict)
    # Whether export results can be logged back to ``run_id`` in the current tracking store.
    run_reachable: bool = False


def _read_info(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc
    return info if isinstance(info, dict) else {}


def _run_exists(run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client().get_run(run_id)
    except MlflowException:
        return False
    return True


def _download(run_id: str, workdir: Path) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=MODEL_ARTIFACT_DIR, dst_path=str(workdir), tracking_uri=tracking_uri()
        )
    except (MlflowException, OSError) as exc:
        raise ExportError(f"cannot download the '{MODEL_ARTIFACT_DIR}' artifacts of run {run_id}: {exc}") from exc
    return Path(local)


def resolve(model: Path | None, run_id: str | None, workdir: Path) -> ModelSource:
    """The model file, its training info and run id, from ``--model`` and/or ``--run-id``."""
    if model is None and run_id is None:
        raise ExportError("give the model to export: --model path/to/model.keras or --run-id <mlflow run id>")
    if run_id is not None and not _run_exists(run_id):
        raise ExportError(f"MLflow run {run_id} not found in the tracking store {tracking_uri()}")
    if model is None:
        assert run_id is not None
        folder = _download(run_id, workdir)
        model = folder / MODEL_FILE
        if not model.is_file():
            raise ExportError(f"run {run_id} has no artifact {MODEL_ARTIFACT_DIR}/{MODEL_FILE}")
        return ModelSource(model, run_id, _read_info(folder / TRAINING_INFO_FILE), run_reachable=True)
    if not model.is_file():
        raise ExportError(f"model file not found: {model}")
    info = _read_info(model.parent / TRAINING_INFO_FILE)
    if run_id is not None:
        return ModelSource(model, run_id, info, run_reachable=True)
    recorded = info.get("run_id")
    if not isinstance(recorded, str):
        return ModelSource(model, None, info)
    reachable = _run_exists(recorded)
    if not reachable:
        print(
            f"mnist-export: warning: run {recorded} (from {TRAINING_INFO_FILE}) is not in {tracking_uri()}; "
            "the ONNX files will not be logged to it",
            file=sys.stderr,
        )
    return ModelSource(model, recorded, info, run_reachable=reachable)
