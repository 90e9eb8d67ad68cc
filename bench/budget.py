"""``python -m bench.budget``: what the unavoidable parts of one single-image request cost, in process, in CPU
microseconds (``time.thread_time``, best of ``--repeat`` rounds): the service's JSON decoding and validation of
a real body (``service.decode``), the JSON answer (orjson, as service/rest.py writes it), and the engine per
image at batch 1 and at the batch sizes the service forms under load; writing the answer through the server's
request cycle (``ResponseCycle.respond``, as the hot routes do, against uvicorn's ``send`` with two ASGI
messages); and the memory a bulk JSON body takes to decode (tracemalloc peak: the Python floats msgspec builds before NumPy gets them). Beside ``mnist-bench``'s CPU per request
of each design, these say how much of the service's per-request CPU is its own plumbing.

Writes ``budget.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
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


class _Transport:
    def write(self, data: bytes) -> None: ...

    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def reply_us(repeat: int) -> dict[str, float]:
    """CPU microseconds to write one single-image answer (its seven headers) through a request cycle as the
    guarded protocol makes it: ``respond`` and uvicorn's ``send`` (start and body messages), each less the
    cycle's own making."""
    import asyncio
    import logging

    from uvicorn.protocols.http.flow_control import FlowControl

    from service.asgi import send_reply
    from service.wire import OneWrite, ResponseCycle

    body = orjson.dumps({"label": 7, "probabilities": [0.1] * 10, "model": "mnist-mlp", "version": "1",
                         "request_id": "0" * 32, "prediction_id": "FnpDmx2wMFxafIYJuXCAgQ"})  # fmt: skip
    logger = logging.getLogger("bench.budget")

    def cycle() -> tuple[ResponseCycle, list[tuple[bytes, bytes]]]:
        t = _Transport()
        c = ResponseCycle(scope={"method": "POST"}, transport=t, flow=FlowControl(t), logger=logger,  # type: ignore[arg-type,typeddict-item]
                          access_logger=logger, access_log=False, default_headers=[(b"date", b"Thu, 03 Dec 2026")],
                          message_event=asyncio.Event(), expect_100_continue=False, keep_alive=True,
                          on_response=lambda: None)  # fmt: skip
        out = OneWrite(t, c.on_response)  # type: ignore[arg-type]
        c.transport, c.on_response = out, out.done  # type: ignore[assignment]
        headers = [(b"content-type", b"application/json"), (b"server-timing", b"queue;dur=0.050, inference;dur=0.210"),
                   (b"x-model-version", b"1"), (b"x-batch-size", b"24"), (b"x-prediction-id", b"FnpDmx2wMFxafIYJuXCAgQ"),
                   (b"x-request-id", b"0" * 32)]  # fmt: skip
        return c, headers

    def through_send() -> None:
        c, headers = cycle()
        coroutine = send_reply(c.send, (200, body, headers))  # type: ignore[arg-type]
        with contextlib.suppress(StopIteration):  # it never waits: one step runs it to the end
            coroutine.send(None)

    def through_respond() -> None:
        c, headers = cycle()
        c.respond(200, headers, body)

    base = cpu_us(cycle, 5000, repeat)
    return {
        "respond": cpu_us(through_respond, 5000, repeat) - base,
        "asgi_send": cpu_us(through_send, 5000, repeat) - base,
    }


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

    served = _session(model.serving(settings.model_precision).onnx_path, options("service", settings)[0])
    name = served.get_inputs()[0].name
    pool = digits.astype(np.float32) * np.float32(1 / 255)
    probs = served.run(None, {name: pool[:1]})[0][0]

    def answer() -> object:
        return orjson.dumps({"label": int(probs.argmax()), "probabilities": probs, "model": model.name,
                             "version": model.version, "request_id": "0123456789abcdef0123456789abcdef",
                             "prediction_id": "FnpDmx2wMFxafIYJuXCAgQ"}, option=orjson.OPT_SERIALIZE_NUMPY)  # fmt: skip

    result: dict[str, object] = {
        "command": "python -m bench.budget" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "decode_validate_json_us": cpu_us(one_decode, 2000, args.repeat),
        "encode_answer_json_us": cpu_us(answer, 5000, args.repeat),
        "write_answer_us": reply_us(args.repeat),
        "body_bytes_mean": float(np.mean([len(b) for b in bodies])),
    }
    # The engine: the served file (MNIST_MODEL_PRECISION), and, when the version has one, its int8 variant.
    sessions = {"engine_us_per_image_by_batch": served}
    if settings.model_precision != "int8" and "quantized" in model.metadata:
        int8 = _session(model.serving("int8").onnx_path, options("service", settings)[0])
        sessions["engine_int8_us_per_image_by_batch"] = int8
    result["precision"] = settings.model_precision
    for key, session in sessions.items():
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
