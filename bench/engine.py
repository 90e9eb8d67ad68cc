"""The engine ceiling: raw in-process ONNX Runtime images/s on pre-made float32 batches (no HTTP, no
decoding), swept over batch size and intra-op threads. The best point is the physical limit the bulk
endpoint is compared with."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort


@dataclass(frozen=True)
class EnginePoint:
    batch: int
    intra_op_threads: int
    spinning: bool
    images_per_s: float
    ms_per_batch: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _session(model_file: Path, threads: int, spinning: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model_file), sess_options=opts, providers=["CPUExecutionProvider"])


def measure(session: ort.InferenceSession, x: np.ndarray, seconds: float) -> tuple[float, float]:
    """(images/s, ms per call) of ``session.run`` on ``x`` for about ``seconds``."""
    name = session.get_inputs()[0].name
    feed = {name: x}
    for _ in range(3):
        session.run(None, feed)
    calls = 0
    t0 = time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds or calls < 5:
        session.run(None, feed)
        calls += 1
        elapsed = time.perf_counter() - t0
    return x.shape[0] * calls / elapsed, elapsed / calls * 1000


def sweep(
    model_file: Path,
    digits: np.ndarray,
    batches: tuple[int, ...] = (1, 16, 64, 256, 512, 1024, 4096),
    configs: tuple[tuple[int, bool], ...] = ((1, False), (2, False), (2, True)),
    seconds: float = 0.4,
    repeat: int = 1,
) -> list[EnginePoint]:
    """Every (batch, threads, spinning) point, the best of ``repeat`` rounds; ``digits`` is uint8 (n, 784)
    and is tiled to each batch."""
    pool = digits.astype(np.float32) * np.float32(1 / 255)
    found: dict[tuple[int, int, bool], EnginePoint] = {}
    sessions = {cfg: _session(model_file, *cfg) for cfg in configs}
    for _ in range(max(1, repeat)):
        for (threads, spinning), session in sessions.items():
            for b in batches:
                x = np.ascontiguousarray(np.resize(pool, (b, pool.shape[1])))
                ips, ms = measure(session, x, seconds)
                key = (b, threads, spinning)
                if key not in found or ips > found[key].images_per_s:
                    found[key] = EnginePoint(b, threads, spinning, ips, ms)
    return list(found.values())


def best(points: list[EnginePoint]) -> EnginePoint:
    return max(points, key=lambda p: p.images_per_s)
