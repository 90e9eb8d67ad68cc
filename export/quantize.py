"""Dynamic int8 quantization of the float ONNX model (weights int8, activations quantized at run time)."""

from __future__ import annotations

import tempfile
from pathlib import Path

QUANTIZED_FILE = "model.int8.onnx"
WEIGHT_TYPE = "QInt8"


def quantize(float_path: Path, out_path: Path) -> None:
    """Pre-process (ONNX shape inference + ORT graph optimisation, as onnxruntime recommends), then
    ``quantize_dynamic`` with int8 weights. Symbolic shape inference is skipped: only the batch is dynamic."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="mnist-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(out_path), weight_type=QuantType.QInt8)
