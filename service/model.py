"""The ONNX model wrapper and the model repository (``<repo>/<name>/<version>/``).

Every version is checked before it can serve, the same way at start-up, on a hot load, by ``mnist-promote``
and by ``mnist-pull``: the version folder lies inside the repository; ``metadata.json`` is a bounded regular
file holding every required key with the right types; the model file is a regular file inside its version
folder, within a size bound, whose sha256 is the one recorded; the ONNX graph has the declared contract; and
the golden digits give their recorded labels. Any problem is a :class:`ModelLoadError` with a clear message.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service import repository as repo
from service.errors import ModelLoadError
from service.settings import Settings

log = logging.getLogger("service.model")

_GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
MAX_MODEL_BYTES = 256 * 1024 * 1024  # the shipped model.onnx is 1.6 MB


@dataclass
class Model:
    """One loaded model version: an ONNX Runtime session plus its checked metadata."""

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
    reference: repo.Reference | None
    # uint8 pixel * scale = model input; from metadata "preprocessing", a finite positive number.
    scale: float
    golden: repo.Golden
    precision: str = "float32"  # or "int8": the version's quantized variant (settings.model_precision)
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
            "precision": self.precision,
            "file": self.path.name,
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
        """Check the golden digits give their recorded labels; returns how many were checked."""
        got = self.run(self.golden.images.astype(np.float32) * np.float32(self.scale)).argmax(axis=1)
        wrong = int((got != self.golden.labels).sum())
        if wrong:
            raise ModelLoadError(
                f"{self.name}/{self.version}: {wrong} of {len(got)} golden inputs give the wrong label"
            )
        return len(got)


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


# ---------------------------------------------------------------------------------------------- loading


def load_model(
    folder: Path, settings: Settings, *, repository: Path | None = None, expected: tuple[str, str] | None = None
) -> Model:
    """Load and check one version folder. Raises ModelLoadError with a clear message on any problem.

    ``repository`` (default: two levels up) is the root the folder must lie in once symlinks are resolved;
    ``expected`` (default: the folder's parent's name and its own) is the (name, version) the metadata must
    declare.
    """
    repository = folder.parent.parent if repository is None else repository
    expected = (folder.parent.name, folder.name) if expected is None else expected
    try:
        return _load(folder, settings, repository, expected)
    except ModelLoadError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RecursionError) as exc:
        # A metadata shape the checks above did not foresee: still a refusal, never a crash.
        raise ModelLoadError(f"{folder}: malformed metadata ({type(exc).__name__}: {exc})") from exc


def _load(folder: Path, settings: Settings, repository: Path, expected: tuple[str, str]) -> Model:
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a version folder")
    if not repo.inside(folder, repository):
        raise ModelLoadError(f"{folder} points outside the model repository")
    metadata = repo.read_metadata(folder)
    where = str(folder)
    name, version = metadata["name"], metadata["version"]
    if not isinstance(name, str) or not isinstance(version, str) or not repo.VERSION.fullmatch(version):
        raise ModelLoadError(f"{where}: metadata name and version must be strings, the version a positive integer")
    if (name, version) != expected:
        raise ModelLoadError(f"{where}: metadata names {name}/{version}, expected {expected[0]}/{expected[1]}")
    labels = repo.class_labels(metadata, where)
    image_shape = repo.image_shape(metadata, where)
    scale = repo.scale(metadata, where)
    out_block = repo.block(metadata, "output", where)
    file, block, named = repo.model_file(metadata, where, settings.model_precision)
    model_path = repo.model_path(folder, file, where)
    blob = repo.read_bounded(model_path, MAX_MODEL_BYTES, "model file")
    if not blob:
        raise ModelLoadError(f"{model_path} is not a loadable ONNX model: the file is empty")
    sha256 = hashlib.sha256(blob).hexdigest()
    if repo.sha256(block, named) != sha256:
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
    out = next((o for o in outputs if o.name == out_block.get("name")), outputs[0])
    n_features = _dim(inp.shape[-1]) if len(inp.shape) == 2 else None
    n_classes = _dim(out.shape[-1]) if len(out.shape) == 2 else None
    pixels = image_shape[0] * image_shape[1]
    if inp.type != "tensor(float)" or n_features is None or n_features != pixels:
        raise ModelLoadError(
            f"{model_path}: input {inp.name} is {inp.type} {inp.shape}; expected float32 [batch, {pixels}]"
        )
    if n_classes is None or n_classes != len(labels):
        raise ModelLoadError(f"{model_path}: output {out.shape} does not match {len(labels)} class labels")
    if _dim(inp.shape[0]) is not None:
        raise ModelLoadError(f"{model_path}: the batch dimension is fixed ({inp.shape[0]}); it must be dynamic")

    model = Model(
        name=name,
        version=version,
        path=model_path,
        sha256=sha256,
        metadata=metadata,
        session=session,
        provider=active,
        input_name=inp.name,
        output_name=out.name,
        n_features=n_features,
        image_shape=image_shape,
        n_classes=n_classes,
        class_labels=labels,
        reference=repo.reference(metadata, where, n_classes),
        scale=scale,
        golden=repo.golden(metadata, where, n_features, n_classes),
        precision=settings.model_precision,
    )
    try:
        model.check_golden()
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{model_path}: inference on the golden set failed: {exc}") from exc
    return model
