"""``metadata.json`` as specified in docs/design.md (the keys the service relies on are always present)."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from training.data import IMAGE_SHAPE, N_CLASSES, PIXEL_SCALE

METADATA_FILE = "metadata.json"
MODEL_FILE = "model.onnx"
PREPROCESSING: dict[str, Any] = {
    "scale": PIXEL_SCALE,
    "input_range": [0.0, 1.0],
    "description": "uint8 pixels divided by 255, 28x28 row-major flattened to 784",
}
# Keys of training.json copied into the metadata "training" block, in this order.
TRAINING_KEYS = (
    "command", "seed", "epochs", "batch_size", "learning_rate", "lr_schedule", "dropout_rate", "hidden_units",
    "validation_split", "limit", "data_source", "data_sha256", "n_train", "tensorflow", "keras",
)  # fmt: skip


@dataclass(frozen=True)
class OnnxIO:
    name: str
    shape: list[int | None]

    def as_metadata(self, **extra: Any) -> dict[str, Any]:
        return {"name": self.name, "shape": self.shape, "dtype": "float32", **extra}


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def training_block(info: dict[str, Any], versions: dict[str, str], export_command: str) -> dict[str, Any]:
    block: dict[str, Any] = {key: info.get(key) for key in TRAINING_KEYS}
    block["keras_test_accuracy"] = info.get("test_accuracy")
    # The tensorflow/keras that trained the model if known, else the ones that converted it.
    for key in ("tensorflow", "keras"):
        block[key] = block[key] or versions[key]
    block.update({key: value for key, value in versions.items() if key not in block})
    block["export_command"] = export_command
    return block


def build(
    *,
    name: str,
    version: int,
    sha256: str,
    opset: int,
    inp: OnnxIO,
    out: OnnxIO,
    test_accuracy: float,
    mlflow_run_id: str | None,
    training: dict[str, Any],
    parity: dict[str, Any],
    reference: dict[str, Any],
    golden: dict[str, Any],
    quantized: dict[str, Any] | None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "version": str(version),
        "created_at": utc_now(),
        "file": MODEL_FILE,
        "sha256": sha256,
        "opset": opset,
        "input": inp.as_metadata(image_shape=list(IMAGE_SHAPE)),
        "output": out.as_metadata(),
        "preprocessing": PREPROCESSING,
        "class_labels": [str(i) for i in range(N_CLASSES)],
        "test_accuracy": test_accuracy,
        "mlflow_run_id": mlflow_run_id,
        "training": training,
        "parity": parity,
        "reference": reference,
        "golden": golden,
    }
    if quantized is not None:
        meta["quantized"] = quantized
    return meta


#: A reference for models made outside the pipeline: intensities mostly low, classes even.
FLAT_REFERENCE: dict[str, Any] = {
    "mean_intensity_edges": np.linspace(0.0, 1.0, 21).tolist(),
    "mean_intensity_fractions": [0.05, 0.3, 0.4, 0.2, 0.05] + [0.0] * 15,
    "class_fractions": [0.1] * 10,
}


def write_standin(folder: Path, blob: bytes, golden: np.ndarray, labels: list[int], **extra: Any) -> Path:
    """``folder/{model.onnx, metadata.json}`` for a model made outside the pipeline (the tests' and the benchmark's
    stand-ins): the keys the service relies on, ``FLAT_REFERENCE``, ``golden`` ((N, 784) uint8 digits) with
    their expected ``labels``; the name and version are the folder's. ``extra`` keys are added, or replace
    these (a fixed ``created_at``, say)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_bytes(blob)
    meta: dict[str, Any] = {
        "name": folder.parent.name,
        "version": folder.name,
        "created_at": utc_now(),
        "file": MODEL_FILE,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "opset": 17,
        "input": OnnxIO("pixels", [None, 784]).as_metadata(image_shape=list(IMAGE_SHAPE)),
        "output": OnnxIO("probabilities", [None, N_CLASSES]).as_metadata(),
        "preprocessing": PREPROCESSING,
        "class_labels": [str(i) for i in range(N_CLASSES)],
        "test_accuracy": None,
        "reference": FLAT_REFERENCE,
        "golden": {"images_b64": base64.b64encode(golden.tobytes()).decode(), "count": len(golden), "labels": labels},
        **extra,
    }
    return write(meta, folder)


def write(meta: dict[str, Any], folder: Path) -> Path:
    path = folder / METADATA_FILE
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path
