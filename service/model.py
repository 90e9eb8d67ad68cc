"""The ONNX model wrapper and the model repository (``<repo>/<name>/<version>/``)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.errors import ModelLoadError
from service.settings import Settings

log = logging.getLogger("service.model")

_GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_REQUIRED_KEYS = ("name", "version", "input", "output", "preprocessing", "class_labels")


@dataclass(frozen=True)
class Reference:
    """Training-data statistics saved at export time, for drift."""

    mean_intensity_edges: np.ndarray
    mean_intensity_fractions: np.ndarray
    class_fractions: np.ndarray


@dataclass
class Model:
    """One loaded model version: an ONNX Runtime session plus its metadata."""

    name: str
    version: str
    path: Path
    sha256: str
    metadata: dict[str, Any]
    session: ort.InferenceSession
    provider: str
    input_name: str
    output_name: str
    n_features: int
    image_shape: tuple[int, int]
    n_classes: int
    class_labels: list[str]
    reference: Reference | None
    warmed_up: bool = field(default=False)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run one vectorized call. ``batch`` is float32 (N, n_features); returns (N, n_classes)."""
        out = self.session.run([self.output_name], {self.input_name: batch})[0]
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        meta = self.metadata
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "provider": self.provider,
            "input": {**meta["input"], "name": self.input_name},
            "output": {**meta["output"], "name": self.output_name},
            "preprocessing": meta["preprocessing"],
            "class_labels": self.class_labels,
            "opset": meta.get("opset"),
            "test_accuracy": meta.get("test_accuracy"),
            "created_at": meta.get("created_at"),
            "mlflow_run_id": meta.get("mlflow_run_id"),
        }

    def warm_up(self, max_batch_size: int) -> list[int]:
        """Run every power-of-two batch size up to the largest the batcher forms, plus that size."""
        sizes = sorted({min(1 << i, max_batch_size) for i in range(max_batch_size.bit_length() + 1)})
        for n in sizes:
            self.run(np.zeros((n, self.n_features), dtype=np.float32))
        self.warmed_up = True
        return sizes

    def check_golden(self) -> int:
        """Check the golden inputs of the metadata give their recorded labels; returns how many were checked."""
        golden = self.metadata.get("golden")
        if not golden:
            return 0
        try:
            raw = base64.b64decode(golden["images_b64"], validate=True)
            images = np.frombuffer(raw, dtype=np.uint8).reshape(int(golden["count"]), self.n_features)
            expected = np.asarray(golden["labels"], dtype=np.int64)
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"{self.name}/{self.version}: malformed golden set in metadata: {exc}") from exc
        scale = float(self.metadata["preprocessing"].get("scale", 1 / 255))
        got = self.run(images.astype(np.float32) * np.float32(scale)).argmax(axis=1)
        wrong = int((got != expected).sum())
        if wrong:
            raise ModelLoadError(
                f"{self.name}/{self.version}: {wrong} of {len(expected)} golden inputs give the wrong label"
            )
        return len(expected)


def _session_options(settings: Settings) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.intra_op_threads
    opts.inter_op_num_threads = settings.inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = _GRAPH_LEVELS[settings.graph_optimization]
    spin = "1" if settings.allow_spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    opts.log_severity_level = 4  # errors are logged once, as JSON, by the batcher
    return opts


def _providers(settings: Settings) -> list[str]:
    available = ort.get_available_providers()
    if settings.provider == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if settings.provider == "cuda":
        raise ModelLoadError(
            "provider=cuda was demanded but this onnxruntime build has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install the 'gpu' extra"
        )
    return ["CPUExecutionProvider"]


def _dim(value: Any) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def load_model(folder: Path, settings: Settings) -> Model:
    """Load and check one version folder. Raises ModelLoadError with a clear message on any problem."""
    meta_path = folder / "metadata.json"
    try:
        metadata = json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"no metadata.json in {folder}") from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"unreadable metadata {meta_path}: {exc}") from exc
    if not isinstance(metadata, dict) or (missing := [k for k in _REQUIRED_KEYS if k not in metadata]):
        raise ModelLoadError(f"{meta_path} lacks required keys: {missing if isinstance(metadata, dict) else 'all'}")
    model_path = folder / str(metadata.get("file", "model.onnx"))
    try:
        blob = model_path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"model file {model_path} cannot be read: {exc.strerror}") from exc
    sha256 = hashlib.sha256(blob).hexdigest()
    if metadata.get("sha256") and metadata["sha256"] != sha256:
        raise ModelLoadError(f"{model_path}: sha256 {sha256[:12]}... does not match metadata")

    providers = _providers(settings)
    try:
        session = ort.InferenceSession(blob, sess_options=_session_options(settings), providers=providers)
    except Exception as exc:  # ORT raises several unrelated types for a bad file
        raise ModelLoadError(f"{model_path} is not a loadable ONNX model: {str(exc).splitlines()[0]}") from exc
    active = session.get_providers()[0]
    if settings.provider == "cuda" and active != "CUDAExecutionProvider":
        raise ModelLoadError(f"provider=cuda was demanded but ONNX Runtime fell back to {active}")
    if providers[0] != active:
        log.warning("requested %s but ONNX Runtime is using %s", providers[0], active)

    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) < 1:
        raise ModelLoadError(f"{model_path}: expected one input and at least one output")
    inp = inputs[0]
    out = next((o for o in outputs if o.name == metadata["output"].get("name")), outputs[0])
    n_features = _dim(inp.shape[-1]) if len(inp.shape) == 2 else None
    n_classes = _dim(out.shape[-1]) if len(out.shape) == 2 else None
    image_shape = tuple(metadata["input"].get("image_shape", [28, 28]))
    labels = [str(c) for c in metadata["class_labels"]]
    if inp.type != "tensor(float)" or n_features is None or n_features != int(np.prod(image_shape)):
        raise ModelLoadError(
            f"{model_path}: input {inp.name} is {inp.type} {inp.shape}; "
            f"expected float32 [batch, {int(np.prod(image_shape))}]"
        )
    if n_classes is None or n_classes != len(labels):
        raise ModelLoadError(f"{model_path}: output {out.shape} does not match {len(labels)} class labels")
    if _dim(inp.shape[0]) is not None:
        raise ModelLoadError(f"{model_path}: the batch dimension is fixed ({inp.shape[0]}); it must be dynamic")

    ref = metadata.get("reference")
    reference = None
    if ref:
        reference = Reference(
            np.asarray(ref["mean_intensity_edges"], dtype=np.float64),
            np.asarray(ref["mean_intensity_fractions"], dtype=np.float64),
            np.asarray(ref["class_fractions"], dtype=np.float64),
        )
    model = Model(
        name=str(metadata["name"]),
        version=str(metadata["version"]),
        path=model_path,
        sha256=sha256,
        metadata=metadata,
        session=session,
        provider=active,
        input_name=inp.name,
        output_name=out.name,
        n_features=n_features,
        image_shape=(int(image_shape[0]), int(image_shape[1])),
        n_classes=n_classes,
        class_labels=labels,
        reference=reference,
    )
    try:
        model.check_golden()
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{model_path}: inference on the golden set failed: {exc}") from exc
    return model


def list_versions(repository: Path, name: str) -> list[str]:
    folder = repository / name
    if not folder.is_dir():
        return []
    return sorted((p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=int)


def default_model_name(repository: Path) -> str:
    if not repository.is_dir():
        raise ModelLoadError(f"model repository {repository} does not exist")
    names = sorted(p.name for p in repository.iterdir() if p.is_dir() and list_versions(repository, p.name))
    if not names:
        raise ModelLoadError(f"model repository {repository} holds no <name>/<version>/ folder")
    return names[0]
