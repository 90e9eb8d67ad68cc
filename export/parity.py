"""Running an ONNX file with onnxruntime, and the Keras-vs-ONNX parity check."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from export.errors import ExportError

DEFAULT_TOLERANCE = 1e-5


class ParityError(ExportError):
    """ONNX and Keras disagree beyond the tolerance."""


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    labels_identical: bool
    n: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.labels_identical and self.max_abs_diff <= self.tolerance

    def as_metadata(self) -> dict[str, object]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "labels_identical": self.labels_identical,
            "n": self.n,
            "tolerance": self.tolerance,
        }


def onnx_predict(path: Path, features: npt.NDArray[np.float32], batch_size: int = 4096) -> npt.NDArray[np.float32]:
    """Probabilities from the ONNX model at ``path`` on CPU, in batches."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    parts = [
        np.asarray(session.run(None, {input_name: features[i : i + batch_size]})[0], dtype=np.float32)
        for i in range(0, len(features), batch_size)
    ]
    return np.concatenate(parts, axis=0)


def compare(
    reference: npt.NDArray[np.float32], candidate: npt.NDArray[np.float32], tolerance: float = DEFAULT_TOLERANCE
) -> Parity:
    if reference.shape != candidate.shape:
        raise ParityError(f"output shapes differ: Keras {reference.shape} vs ONNX {candidate.shape}")
    diff = float(np.max(np.abs(reference.astype(np.float64) - candidate.astype(np.float64))))
    same = bool(np.array_equal(reference.argmax(axis=1), candidate.argmax(axis=1)))
    return Parity(max_abs_diff=diff, labels_identical=same, n=len(reference), tolerance=tolerance)


def require(parity: Parity) -> None:
    """Raise :class:`ParityError` unless the probabilities agree within tolerance and labels are identical."""
    if not parity.ok:
        raise ParityError(
            f"ONNX output does not match Keras on {parity.n} test images: max |diff| = {parity.max_abs_diff:.3g} "
            f"(tolerance {parity.tolerance:g}), predicted labels identical: {parity.labels_identical}"
        )
