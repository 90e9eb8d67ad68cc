"""Test-set accuracy of a model version's float and int8 files on this CPU, and what this CPU is.

ONNX Runtime picks its int8 matrix kernels by the instruction set of the CPU it runs on (AVX-512 VNNI,
AVX-512, AVX2, SSE4.1...), and the AVX2 and SSE kernels round and saturate differently, so the int8 figures
depend on the machine. The float model is the same everywhere to the last digit of its accuracy.

It also runs each file at 1, 32 and 512 images a call and counts the labels that differ from those at 2,048:
none for the float model, a few for the int8 one (``BATCHES``).

``python -m export.accuracy --data mnist.npz models/mnist-mlp/1`` prints one JSON line; run it under
``qemu-x86_64 -cpu Haswell`` (AVX2, no AVX-512) or ``-cpu Nehalem`` (SSE4.2) to see other kernels
(docs/training.md). Only onnxruntime and NumPy are needed, no TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# From the widest to the narrowest: the first one the CPU has names the kernels ONNX Runtime's int8 path uses.
_ISA_ORDER = (
    ("AVX512VNNI", "avx512_vnni"),
    ("AVX512BW", "avx512bw"),
    ("AVXVNNI", "avx_vnni"),
    ("AVX2", "avx2"),
    ("SSE41", "sse4_1"),
)


def _cpu_features() -> dict[str, bool]:
    """NumPy's own CPUID reading (it runs CPUID at import, so it is right under an emulator too)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__  # type: ignore[no-redef]
    return {str(k): bool(v) for k, v in __cpu_features__.items()}


def _model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description() -> dict[str, Any]:
    """``{"model", "machine", "isa", "features"}``: the CPU a figure was measured on.

    ``isa`` is the widest instruction set among those the int8 kernels are chosen by; ``features`` the
    SIMD extensions the CPU reports (CPUID). Under ``qemu-user`` the model name is the host's, the rest
    is the emulated CPU's.
    """
    features = _cpu_features()
    isa = next((name for key, name in _ISA_ORDER if features.get(key)), platform.machine())
    simd = sorted(k for k, v in features.items() if v and k.startswith(("SSE4", "AVX", "FMA")))
    return {"model": _model_name(), "machine": platform.machine(), "isa": isa, "features": simd}


def accuracy(
    path: Path, images: npt.NDArray[np.uint8], labels: npt.NDArray[np.integer], batch: int = 2048
) -> tuple[float, Any]:
    """(accuracy, predicted labels) of the ONNX file on uint8 images, pixels / 255, on the CPU, ``batch``
    images per call."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    pixels = images.reshape(len(images), -1).astype(np.float32) * np.float32(1 / 255)
    predicted = np.concatenate(
        [
            np.asarray(session.run(None, {name: pixels[i : i + batch]})[0]).argmax(axis=1)
            for i in range(0, len(pixels), batch)
        ]
    )
    return float(np.mean(predicted == labels)), predicted


#: Batch sizes of the batch-dependence check, against 2,048 a call. Dynamic int8 quantization scales the
#: activations by the range of the whole input of a call, so an int8 label can depend on which images share
#: the call (the service batches concurrent requests together); a float label does not.
BATCHES = (1, 32, 512)


def batch_dependence(path: Path, images: npt.NDArray[np.uint8], labels: npt.NDArray[np.integer],
                     reference: Any) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per batch size: the accuracy, and how many labels differ from ``reference`` (the labels at 2,048)."""
    out = {}
    for batch in BATCHES:
        acc, predicted = accuracy(path, images, labels, batch)
        out[str(batch)] = {"accuracy": acc, "labels_differing": int(np.sum(predicted != reference))}
    return out


def measure(folder: Path, data: Path) -> dict[str, Any]:
    meta = json.loads((folder / "metadata.json").read_text())
    with np.load(data) as npz:
        images, labels = npz["x_test"], npz["y_test"]
    float_acc, float_pred = accuracy(folder / meta["file"], images, labels)
    out: dict[str, Any] = {"n": len(labels), "float": float_acc}
    out["float_by_batch"] = batch_dependence(folder / meta["file"], images, labels, float_pred)
    if "quantized" in meta:
        int8_acc, int8_pred = accuracy(folder / meta["quantized"]["file"], images, labels)
        out["int8"] = int8_acc
        out["int8_label_agreement_with_float"] = float(np.mean(int8_pred == float_pred))
        out["int8_by_batch"] = batch_dependence(folder / meta["quantized"]["file"], images, labels, int8_pred)
    import onnxruntime

    out["cpu"] = cpu_description()
    out["onnxruntime"] = onnxruntime.__version__
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a model version folder, e.g. models/mnist-mlp/1")
    p.add_argument("--data", type=Path, required=True, help="mnist.npz (Keras layout); its x_test/y_test are used")
    ns = p.parse_args(sys.argv[1:] if argv is None else argv)
    print(json.dumps(measure(ns.folder, ns.data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
