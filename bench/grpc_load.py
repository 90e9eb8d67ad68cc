"""A closed-loop gRPC load generator for the bench: ``ModelInfer`` calls of the Open Inference Protocol.

wrk speaks HTTP/1.1 only, so gRPC points use this instead: grpc.aio clients (gRPC's C core does the HTTP/2
framing and the socket work) in one or more worker processes, each holding one channel (one HTTP/2
connection) with its share of the concurrency. Requests are serialized once (UINT8 images in
``raw_input_contents``) and sent as bytes; responses are not parsed, only their status is counted, so the
Python work per call is one await. Each worker reports the CPU it used (user + system, all its threads,
gRPC's included) over the measured window, so the report can show the generator was not the bottleneck.

    python -m bench.grpc_load --target 127.0.0.1:8001 --images 1 --concurrency 64 --duration-s 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

from service.proto import grpc_predict_v2_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
METHOD = "/inference.GRPCInferenceService/ModelInfer"
CALL_TIMEOUT_S = 10.0
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def request_body(images: np.ndarray, model: str = "mnist-mlp", input_name: str = "pixels") -> bytes:
    """A serialized ModelInferRequest: ``images`` (N, 784) or (N, 28, 28) uint8 as one raw UINT8 input."""
    x = np.ascontiguousarray(images, dtype=np.uint8).reshape(images.shape[0], -1)
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=input_name, datatype="UINT8", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req.SerializeToString()  # type: ignore[no-any-return]


def digit_bodies(digits: np.ndarray, images: int, pool: int = 64, model: str = "mnist-mlp") -> list[bytes]:
    """``pool`` request bodies of ``images`` digits each, (N, 784) uint8: consecutive digits for single images,
    the bench's bulk slices (stride 97) for more."""
    x = np.asarray(digits, dtype=np.uint8).reshape(len(digits), -1)
    if images == 1:
        return [request_body(x[i % len(x) : i % len(x) + 1], model) for i in range(pool)]
    return [request_body(x[(np.arange(images) + k * 97) % len(x)], model) for k in range(pool)]


@dataclass
class GrpcResult:
    """One measured point; the same fields as the wrk result, with the generator's CPU as ``loadgen_cpu_s``."""

    requests: int
    duration_s: float
    errors: int  # calls that did not end OK (any status), or ended past CALL_TIMEOUT_S
    statuses: dict[str, int]
    latency_mean_ms: float
    latency_max_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    p999_ms: float
    loadgen_cpu_s: float  # user + system CPU seconds of all worker processes over the window
    processes: int
    concurrency: int
    images_per_request: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def good_rps(self) -> float:
        return (self.requests - self.errors) / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.good_rps * self.images_per_request

    @property
    def loadgen_cpu_util(self) -> float:
        """The generator's CPU use in cores (1.0 = one core busy all the time)."""
        return self.loadgen_cpu_s / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "rps": self.rps, "good_rps": self.good_rps, "images_per_s": self.images_per_s,
                "loadgen_cpu_util": self.loadgen_cpu_util}  # fmt: skip


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _drive(target: str, bodies: list[bytes], concurrency: int, warmup_s: float,
                 duration_s: float) -> dict[str, object]:  # fmt: skip
    async with grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        call = channel.unary_unary(METHOD)  # no (de)serializers: bytes in, bytes out
        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        begin = time.perf_counter() + warmup_s
        end = begin + duration_s
        cpu: list[float] = []

        async def client(i: int) -> None:
            k = i
            while (t0 := time.perf_counter()) < end:
                body = bodies[k % len(bodies)]
                k += concurrency
                try:
                    await call(body, timeout=CALL_TIMEOUT_S)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                if t0 >= begin:
                    latencies.append(time.perf_counter() - t0)
                    statuses[code] += 1

        async def meter() -> None:
            await asyncio.sleep(max(0.0, begin - time.perf_counter()))
            cpu.append(_cpu_s())
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
            cpu.append(_cpu_s())

        await asyncio.gather(meter(), *(client(i) for i in range(concurrency)))
        return {"latencies": latencies, "statuses": dict(statuses), "cpu_s": cpu[1] - cpu[0]}


def run(target: str, bodies: list[bytes], *, concurrency: int, duration_s: float, warmup_s: float = 1.0,
        processes: int = 1, images_per_request: int = 1) -> GrpcResult:  # fmt: skip
    """Keep ``concurrency`` calls in flight for ``warmup_s + duration_s``; measure the last ``duration_s``.

    The workers are ``python -m bench.grpc_load --worker`` processes (like wrk, separate from the caller's):
    the bodies go to them as files, each prints one JSON report."""
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    with tempfile.TemporaryDirectory(prefix="grpc-load-") as tmp:
        files = []
        for i, body in enumerate(bodies):
            (path := Path(tmp) / f"{i}.bin").write_bytes(body)
            files.append(str(path))
        cmd = [sys.executable, "-m", "bench.grpc_load", "--worker", "--target", target,
               "--duration-s", str(duration_s), "--warmup-s", str(warmup_s)]  # fmt: skip
        workers = [subprocess.Popen([*cmd, "--concurrency", str(n), *files], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=ROOT) for n in shares]  # fmt: skip
        reports = []
        for proc in workers:
            out, err = proc.communicate(timeout=warmup_s + duration_s + CALL_TIMEOUT_S + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"gRPC load worker failed ({proc.returncode}): {err.decode()[-2000:]}")
            reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    lat = np.concatenate([np.asarray(r["latencies"], dtype=np.float64) for r in reports]) * 1000
    statuses: Counter[str] = Counter()
    for r in reports:
        statuses.update(r["statuses"])
    pct = np.percentile(lat, [50, 90, 95, 99, 99.9]) if lat.size else np.zeros(5)
    return GrpcResult(
        requests=int(lat.size),
        duration_s=duration_s,
        errors=sum(n for code, n in statuses.items() if code != "OK"),
        statuses=dict(statuses),
        latency_mean_ms=float(lat.mean()) if lat.size else 0.0,
        latency_max_ms=float(lat.max()) if lat.size else 0.0,
        p50_ms=float(pct[0]),
        p90_ms=float(pct[1]),
        p95_ms=float(pct[2]),
        p99_ms=float(pct[3]),
        p999_ms=float(pct[4]),
        loadgen_cpu_s=sum(float(r["cpu_s"]) for r in reports),
        processes=processes,
        concurrency=concurrency,
        images_per_request=images_per_request,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grpc_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--target", default="127.0.0.1:8001", help="host:port of the gRPC front-end")
    p.add_argument("--model", default="mnist-mlp")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one worker of run(): bodies as files
    p.add_argument("bodies", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        bodies = [f.read_bytes() for f in args.bodies]
        print(json.dumps(asyncio.run(_drive(args.target, bodies, args.concurrency, args.warmup_s, args.duration_s))))
        return 0
    rng = np.random.default_rng(args.seed)
    bodies = [request_body(rng.integers(0, 256, (args.images, 784), dtype=np.uint8), args.model) for _ in range(16)]
    result = run(args.target, bodies, concurrency=args.concurrency, duration_s=args.duration_s,
                 warmup_s=args.warmup_s, processes=args.processes, images_per_request=args.images)  # fmt: skip
    print(json.dumps(result.to_dict()))
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
