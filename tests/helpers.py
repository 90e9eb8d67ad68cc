"""Shared test helpers: a tiny ONNX model factory (no TensorFlow) and a real server process runner."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export import metadata
from reliability import serverproc

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
    blob = blob if blob is not None else tiny_onnx(seed)
    rng = np.random.default_rng(seed + 100)
    golden = rng.integers(0, 256, (golden_count, 784), dtype=np.uint8)
    try:
        labels = run_onnx(blob, golden.astype(np.float32) / 255).argmax(axis=1).tolist()
    except Exception:
        labels = [0] * golden_count
    if corrupt_golden:
        labels = [(v + 1) % 10 for v in labels]
    metadata.write_standin(folder, blob, golden, labels, created_at="2026-01-01T00:00:00Z")
    return folder


Server = serverproc.ServerProcess  # one launcher for the tests, the reliability scripts and the benchmark
free_port = serverproc.free_port


def start_server(repo: Path, tmp: Path, *args: str, env: dict[str, str] | None = None, wait_ready: bool = True,
                 timeout: float = 60, launcher: Sequence[str] = serverproc.SERVER_MODULE) -> Server:  # fmt: skip
    """``python -m service.server`` (or ``launcher``) on a free port, its log in ``tmp``; ready when returned."""
    log_path = tmp / f"server-{time.monotonic_ns()}.log"
    return serverproc.start(repo, log_path, *args, env=env, launcher=launcher, timeout_s=timeout, wait=wait_ready)


@contextmanager
def running_server(repo: Path, tmp: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = start_server(repo, tmp, *args, env=env)
    try:
        yield server
    finally:
        server.terminate()


#: Error-level records of the service's JSON log, and anything else that is not a JSON log line but looks like
#: a failure (a traceback on stderr, a crash message from a library).
_FAILURE_MARKERS = ("Traceback", "ERROR", "CRITICAL", "Fatal Python error", "Segmentation fault")


def log_failures(text: str, allow: Iterable[str] = ()) -> list[str]:
    """The lines of a server log that report an error: JSON records at level error or critical (unless their
    message is one of ``allow``), and non-JSON lines holding a traceback or an error marker."""
    allowed = set(allow)
    bad: list[str] = []
    for line in text.split("\n"):  # not splitlines(): a JSON record may hold U+2028 or U+0085 in a string
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                bad.append(line)  # a JSON log line cut or mixed with other output
                continue
            if record.get("level") in ("error", "critical") and record.get("message") not in allowed:
                bad.append(line)
        elif any(marker in line for marker in _FAILURE_MARKERS):
            bad.append(line)
    return bad


def assert_clean_shutdown(server: Server, allow: Iterable[str] = ()) -> None:
    """Stop ``server`` with SIGTERM and assert it exited 0 and logged no error over its whole life.

    Call it in the teardown of every fixture that starts a server for several tests: the check then covers
    every test that used the server, whichever of them ran and in whatever order. ``allow`` lists the log
    messages that the tests provoke on purpose (e.g. an engine error)."""
    code = server.terminate()
    assert code == 0, f"the server exited with {code}:\n{server.logs()[-5000:]}"
    failures = log_failures(server.logs(), allow)
    assert not failures, "the server logged errors:\n" + "\n".join(f[:2000] for f in failures[:10])


FIXTURE_DIGITS = ROOT / "tests" / "fixtures" / "mnist_small.npz"


def mnist_test_digits() -> tuple[np.ndarray, np.ndarray]:
    """The full MNIST test set when present, else the shipped fixture of 1,000 real test digits."""
    data = load_mnist_test()
    if data is None:
        with np.load(FIXTURE_DIGITS) as f:
            return f["x_test"], f["y_test"]
    return data


def offline_probabilities(images: np.ndarray, file: str = "model.onnx") -> np.ndarray:
    """The default model's probabilities for uint8 images, from ONNX Runtime in this process (``file``: the
    float model, or its int8 variant ``model.int8.onnx``)."""
    import onnxruntime as ort

    meta = json.loads((DEFAULT_MODEL / "metadata.json").read_text())
    sess = ort.InferenceSession(str(DEFAULT_MODEL / file), providers=["CPUExecutionProvider"])
    x = images.reshape(-1, 784).astype(np.float32) * np.float32(meta["preprocessing"]["scale"])
    return np.asarray(sess.run(None, {meta["input"]["name"]: x})[0])


def complete(data: bytes, responses: int) -> bool:
    """Whether ``data`` holds ``responses`` final responses with their whole Content-Length bodies."""
    rest, n = data, 0
    while n < responses:
        head_end = rest.find(b"\r\n\r\n")
        if head_end < 0:
            return False
        head = rest[:head_end].decode("latin-1").lower()
        if head.startswith("http/1.1 100"):
            rest = rest[head_end + 4 :]
            continue
        length = int(head.split("content-length:")[1].split("\r\n")[0]) if "content-length:" in head else 0
        body_end = head_end + 4 + length
        if len(rest) < body_end:
            return False
        rest, n = rest[body_end:], n + 1
    return True


def read_until_closed(sock: socket.socket, timeout_s: float, what: str = "the connection") -> bytes:
    """Everything the server sends until it closes ``sock``; fails if it keeps it open past ``timeout_s``."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept {what} open past {timeout_s} s (got {data[:80]!r})") from None
    except ConnectionResetError:
        pass
    return data


def load_mnist_test() -> tuple[np.ndarray, np.ndarray] | None:
    """The real MNIST test set when ../shared is present (None otherwise)."""
    if not SHARED_MNIST.exists():
        return None
    with np.load(SHARED_MNIST) as data:
        return data["x_test"], data["y_test"]
