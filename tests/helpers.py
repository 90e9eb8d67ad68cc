"""Shared test helpers: a tiny ONNX model factory (no TensorFlow) and a real server process runner."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "mnist-mlp" / "1"
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"


def tiny_onnx(seed: int = 0, features: int = 784, classes: int = 10, fixed_batch: int | None = None,
              opset: int = 17) -> bytes:  # fmt: skip
    """softmax(x @ W + b), float32, input "pixels" [batch, features], output "probabilities"."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, (features, classes)).astype(np.float32)
    b = rng.normal(0, 0.1, classes).astype(np.float32)
    batch: int | str = fixed_batch if fixed_batch is not None else "batch"
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["pixels", "W"], ["logits0"]),
            helper.make_node("Add", ["logits0", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, classes])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def run_onnx(blob: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"pixels": x.astype(np.float32)})[0])


def write_model(
    repo: Path,
    name: str = "tiny",
    version: str = "1",
    *,
    seed: int = 0,
    blob: bytes | None = None,
    golden_count: int = 16,
    corrupt_golden: bool = False,
) -> Path:
    """Write ``repo/name/version/{model.onnx,metadata.json}`` following docs/design.md."""
    folder = repo / name / version
    folder.mkdir(parents=True, exist_ok=True)
    blob = blob if blob is not None else tiny_onnx(seed)
    (folder / "model.onnx").write_bytes(blob)
    rng = np.random.default_rng(seed + 100)
    golden = rng.integers(0, 256, (golden_count, 784), dtype=np.uint8)
    try:
        labels = run_onnx(blob, golden.astype(np.float32) / 255).argmax(axis=1).tolist()
    except Exception:
        labels = [0] * golden_count
    if corrupt_golden:
        labels = [(v + 1) % 10 for v in labels]
    edges = np.linspace(0.0, 1.0, 21)
    meta = {
        "name": name,
        "version": version,
        "created_at": "2026-01-01T00:00:00Z",
        "file": "model.onnx",
        "sha256": hashlib.sha256(blob).hexdigest(),
        "opset": 17,
        "input": {"name": "pixels", "shape": [None, 784], "dtype": "float32", "image_shape": [28, 28]},
        "output": {"name": "probabilities", "shape": [None, 10], "dtype": "float32"},
        "preprocessing": {"scale": 1 / 255, "input_range": [0.0, 1.0], "description": "uint8 / 255"},
        "class_labels": [str(i) for i in range(10)],
        "test_accuracy": None,
        "reference": {
            "mean_intensity_edges": edges.tolist(),
            "mean_intensity_fractions": ([0.05, 0.3, 0.4, 0.2, 0.05] + [0.0] * 15),
            "class_fractions": [0.1] * 10,
        },
        "golden": {
            "images_b64": base64.b64encode(golden.tobytes()).decode(),
            "count": golden_count,
            "labels": labels,
        },
    }
    (folder / "metadata.json").write_text(json.dumps(meta, indent=1))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    port: int
    log_path: Path
    exit_code: int | None = field(default=None)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)  # type: ignore[arg-type]

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.exit_code = self.proc.wait()
        return self.exit_code


def start_server(repo: Path, tmp: Path, *args: str, env: dict[str, str] | None = None, wait_ready: bool = True,
                 timeout: float = 60) -> Server:  # fmt: skip
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "service.server", "--port", str(port), "--model-repository", str(repo), *args]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
    server = Server(proc, f"http://127.0.0.1:{port}", port, log_path)
    if wait_ready:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.logs()}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        server.terminate()
        raise RuntimeError(f"server not ready in {timeout}s:\n{server.logs()}")
    return server


@contextmanager
def running_server(repo: Path, tmp: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = start_server(repo, tmp, *args, env=env)
    try:
        yield server
    finally:
        server.terminate()


def load_mnist_test() -> tuple[np.ndarray, np.ndarray] | None:
    """The real MNIST test set when ../shared is present (None otherwise)."""
    if not SHARED_MNIST.exists():
        return None
    with np.load(SHARED_MNIST) as data:
        return data["x_test"], data["y_test"]
