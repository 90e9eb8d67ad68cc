"""The engine ceiling: raw in-process ONNX Runtime images/s on pre-made float32 batches (no HTTP, no
decoding), swept over batch size and session options. The best point is the physical limit the bulk
endpoint is compared with.

The options swept (``CONFIGS``):

- ``service``: the service's own session options (``service/model.py``, from the service's settings: intra-op
  threads, no spinning), one caller;
- ``service-x2``: the same session called from two threads at once, which is how the service runs bulk chunks
  (``MNIST_BULK_PARALLEL``, default 2);
- ``intra2`` / ``intra2-spin``: one caller, two intra-op threads, spinning off / on;
- ``ort-default``: ``ort.SessionOptions()`` untouched (ONNX Runtime's own defaults: a thread per core, spinning on).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.model import _session_options
from service.settings import Settings, settings_from_args

#: name -> (how to make the options, callers at once)
CONFIGS: dict[str, int] = {"service": 1, "service-x2": 2, "intra2": 1, "intra2-spin": 1, "ort-default": 1}


@dataclass(frozen=True)
class EnginePoint:
    config: str
    batch: int
    intra_op_threads: int  # 0 = ONNX Runtime's default (one per core)
    spinning: bool
    callers: int
    images_per_s: float
    ms_per_batch: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def options(config: str, settings: Settings | None = None) -> tuple[ort.SessionOptions, int, bool]:
    """(session options, intra-op threads, spinning) of a named configuration."""
    s = settings or settings_from_args([])
    if config in ("service", "service-x2"):
        return _session_options(s), s.intra_op_threads, s.allow_spinning
    if config == "ort-default":
        return ort.SessionOptions(), 0, True
    if config in ("intra2", "intra2-spin"):
        spin = config == "intra2-spin"
        opts = _session_options(s.model_copy(update={"intra_op_threads": 2, "allow_spinning": spin}))
        return opts, 2, spin
    raise ValueError(f"unknown engine configuration {config!r}; choose from {', '.join(CONFIGS)}")


def _session(model_file: Path, opts: ort.SessionOptions) -> ort.InferenceSession:
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model_file), sess_options=opts, providers=["CPUExecutionProvider"])


def measure(session: ort.InferenceSession, x: np.ndarray, seconds: float, callers: int = 1) -> tuple[float, float]:
    """(images/s, ms per call) of ``session.run`` on ``x`` for about ``seconds``, from ``callers`` threads."""
    name = session.get_inputs()[0].name
    feed = {name: x}
    for _ in range(3):
        session.run(None, feed)
    counts = [0] * callers
    start = threading.Barrier(callers + 1)

    def work(i: int) -> None:
        start.wait()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds or counts[i] < 5:
            session.run(None, feed)
            counts[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    calls = sum(counts)
    return x.shape[0] * calls / elapsed, elapsed / calls * 1000 * callers


def sweep(
    model_file: Path,
    digits: np.ndarray,
    batches: tuple[int, ...] = (1, 16, 64, 256, 512, 1024, 4096),
    configs: tuple[str, ...] = tuple(CONFIGS),
    seconds: float = 0.4,
    repeat: int = 1,
    settings: Settings | None = None,
) -> list[EnginePoint]:
    """Every (configuration, batch) point, the best of ``repeat`` rounds; ``digits`` is uint8 (n, 784) and
    is tiled to each batch."""
    pool = digits.astype(np.float32) * np.float32(1 / 255)
    found: dict[tuple[str, int], EnginePoint] = {}
    sessions = {}
    for name in configs:
        opts, threads, spin = options(name, settings)
        sessions[name] = (_session(model_file, opts), threads, spin, CONFIGS[name])
    for _ in range(max(1, repeat)):
        for name, (session, threads, spin, callers) in sessions.items():
            for b in batches:
                x = np.ascontiguousarray(np.resize(pool, (b, pool.shape[1])))
                ips, ms = measure(session, x, seconds, callers)
                key = (name, b)
                if key not in found or ips > found[key].images_per_s:
                    found[key] = EnginePoint(name, b, threads, spin, callers, ips, ms)
    return list(found.values())


def best(points: list[EnginePoint]) -> EnginePoint:
    return max(points, key=lambda p: p.images_per_s)
