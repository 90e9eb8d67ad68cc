"""``python -m bench.budget``: what the unavoidable parts of one single-image request cost, in process, in CPU
microseconds (``time.thread_time``, best of ``--repeat`` rounds): the service's JSON decoding and validation of
a real body (``service.decode``), the JSON answer (orjson, as service/rest.py writes it), and the engine per
image at batch 1 and at the batch sizes the service forms under load; and the memory a bulk JSON body takes
to decode (tracemalloc peak: the Python floats msgspec builds before NumPy gets them). Beside ``mnist-bench``'s CPU per request
of each design, these say how much of the service's per-request CPU is its own plumbing.

Writes ``budget.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson

from bench.engine import _session, options
from bench.models import DEFAULT_REPOSITORY, find_model, real_digits
from bench.workloads import bulk_json, single_json
from service import decode
from service.settings import settings_from_args


def cpu_us(fn: Callable[[], object], n: int, repeat: int) -> float:
    """Best-of-``repeat`` CPU microseconds per call of ``fn`` (``n`` calls per round, this thread only)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        best = min(best, (time.thread_time() - t0) / n)
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.budget", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    model = find_model(args.model_repository)
    digits = real_digits(4096, model)
    settings = settings_from_args([])
    shape = decode.Shape(784, 28, 28, settings.max_images_per_request, settings.max_png_pixels)
    bodies = single_json(digits).bodies
    k = iter(range(10**9))

    def one_decode() -> object:
        return decode.decode(decode.SINGLE, "application/json", bodies[next(k) % len(bodies)], shape)

    session = _session(model.serving(settings.model_precision).onnx_path, options("service", settings)[0])
    name = session.get_inputs()[0].name
    pool = digits.astype(np.float32) * np.float32(1 / 255)
    probs = session.run(None, {name: pool[:1]})[0][0]

    def answer() -> object:
        return orjson.dumps({"label": int(probs.argmax()), "probabilities": probs, "model": model.name,
                             "version": model.version, "request_id": "0123456789abcdef0123456789abcdef",
                             "prediction_id": "FnpDmx2wMFxafIYJuXCAgQ"}, option=orjson.OPT_SERIALIZE_NUMPY)  # fmt: skip

    result: dict[str, object] = {
        "command": "python -m bench.budget" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "decode_validate_json_us": cpu_us(one_decode, 2000, args.repeat),
        "encode_answer_json_us": cpu_us(answer, 5000, args.repeat),
        "body_bytes_mean": float(np.mean([len(b) for b in bodies])),
    }
    # The engine: the served file (MNIST_MODEL_PRECISION), and, when the version has one, its int8 variant.
    files = {"engine_us_per_image_by_batch": model.serving(settings.model_precision).onnx_path}
    if settings.model_precision != "int8" and "quantized" in model.metadata:
        files["engine_int8_us_per_image_by_batch"] = model.serving("int8").onnx_path
    result["precision"] = settings.model_precision
    for key, file in files.items():
        session = _session(file, options("service", settings)[0])
        engine: dict[str, float] = {}
        for b in (1, 8, 32, 128, 512):
            x = np.ascontiguousarray(pool[:b])
            calls = max(20, 2000 // b)
            engine[str(b)] = cpu_us(lambda s=session, x=x: s.run(None, {name: x}), calls, args.repeat) / b  # type: ignore[misc]
        result[key] = engine
    memory: dict[str, dict[str, float]] = {}
    for n in (256, 1024):
        body = bulk_json(digits, n).bodies[0]
        tracemalloc.start()
        x = decode.decode(decode.MANY, "application/json", body, shape)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        t0 = time.thread_time()
        decode.decode(decode.MANY, "application/json", body, shape)
        memory[str(n)] = {"body_mb": len(body) / 1e6, "decode_peak_mb": peak / 1e6, "pixels_mb": x.nbytes / 1e6,
                          "decode_cpu_ms": (time.thread_time() - t0) * 1000}  # fmt: skip
    result["json_bulk_decode"] = memory
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / "budget.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
