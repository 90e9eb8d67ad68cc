"""The model under test and the digits sent to it.

The bench measures the shipped model (``models/mnist-mlp/1``). When it is absent (a fresh checkout
before training) the bench can write a stand-in of the same architecture (784 -> 512 relu -> 10
softmax, random weights) so the timing is representative; the stand-in needs the ``onnx`` package.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from export import metadata

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPOSITORY = ROOT / "models"
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"


@dataclass(frozen=True)
class ModelUnderTest:
    repository: Path
    folder: Path  # <repository>/<name>/<version>
    name: str
    version: str
    onnx_path: Path
    metadata: dict[str, object]
    standin: bool

    def serving(self, precision: str) -> ModelUnderTest:
        """This model with ``onnx_path`` the file the service serves at ``precision`` (its int8 variant or not)."""
        return replace(self, onnx_path=serving_file(self.folder, precision))

    @property
    def scale(self) -> float:
        pre = self.metadata.get("preprocessing", {})
        return float(pre.get("scale", 1 / 255)) if isinstance(pre, dict) else 1 / 255


def find_model(repository: Path) -> ModelUnderTest:
    """The first model (by name) and its highest version in ``repository``, as the service picks it."""
    names = sorted(p.name for p in repository.iterdir() if p.is_dir() and _versions(p))
    if not names:
        raise FileNotFoundError(f"no <name>/<version>/model.onnx in {repository}")
    name = names[0]
    version = _versions(repository / name)[-1]
    folder = repository / name / version
    metadata = json.loads((folder / "metadata.json").read_text())
    onnx_path = folder / str(metadata.get("file", "model.onnx"))
    return ModelUnderTest(repository, folder, name, version, onnx_path, metadata, bool(metadata.get("standin")))


def serving_file(folder: Path, precision: str) -> Path:
    """The model file of a version folder the service serves at ``precision`` (``MNIST_MODEL_PRECISION``), by
    the service's own rule (a version without an int8 variant raises ``ModelLoadError``, as the service does)."""
    from service.repository import model_file

    file, _, _ = model_file(json.loads((folder / "metadata.json").read_text()), str(folder), precision)
    return folder / str(file)


def _versions(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=int)


def mlp_onnx(seed: int = 0, hidden: int = 512) -> bytes:
    """The report's architecture with random weights: softmax(relu(x W1 + b1) W2 + b2)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.05, (784, hidden)).astype(np.float32)
    b1 = rng.normal(0, 0.01, hidden).astype(np.float32)
    w2 = rng.normal(0, 0.1, (hidden, 10)).astype(np.float32)
    b2 = rng.normal(0, 0.01, 10).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["pixels", "W1"], ["h0"]),
            helper.make_node("Add", ["h0", "B1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h"]),
            helper.make_node("MatMul", ["h", "W2"], ["l0"]),
            helper.make_node("Add", ["l0", "B2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "mlp_standin",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 784])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def write_standin(repository: Path, name: str = "mnist-mlp-standin", version: str = "1") -> ModelUnderTest:
    """Write a stand-in model folder that the service accepts (metadata per docs/design.md)."""
    import onnxruntime as ort

    blob = mlp_onnx()
    golden = real_digits(32, None)
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    labels = sess.run(None, {"pixels": golden.astype(np.float32) * np.float32(1 / 255)})[0].argmax(axis=1).tolist()
    metadata.write_standin(repository / name / version, blob, golden, labels, standin=True)
    return find_model(repository)


def real_digits(n: int, model: ModelUnderTest | None) -> np.ndarray:
    """``n`` real MNIST digits, uint8 (n, 784): the shared test set when present, else the model's golden
    set, else a synthetic stroke pattern; repeated to reach ``n``."""
    pool: np.ndarray | None = None
    if SHARED_MNIST.exists():
        with np.load(SHARED_MNIST) as data:
            pool = np.asarray(data["x_test"][: max(n, 1)], dtype=np.uint8).reshape(-1, 784)
    elif model is not None and isinstance(model.metadata.get("golden"), dict):
        golden = model.metadata["golden"]
        assert isinstance(golden, dict)
        raw = base64.b64decode(str(golden["images_b64"]))
        pool = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 784)
    if pool is None or len(pool) == 0:
        img = np.zeros((28, 28), dtype=np.uint8)
        img[4:24, 12:16] = 255  # a "1"
        pool = img.reshape(1, 784)
    reps = -(-n // len(pool))
    return np.tile(pool, (reps, 1))[:n].copy()
