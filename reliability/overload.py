"""Overload: drive the service far past its capacity for a bounded time on 127.0.0.1 and report how it copes.

Phases, against a fresh ``python -m service.server`` child process:
1. baseline: sequential requests on an idle service (latency p50/p99);
2. capacity: wrk with a few connections (no refusals expected): accepted req/s = the capacity;
3. overload: wrk with many connections sending back to back (refused requests are resent at once, so the
   offered load is several times the capacity) while a light open-loop probe (``--probe-rate`` req/s on
   its own connections) measures what a client sees: latency of accepted requests and of refusals;
4. recovery: once wrk stops, sequential probes until five in a row are back near the baseline latency.
The service's own /metrics give the authoritative counts (accepted, refused by reason, any other 5xx);
resident memory is sampled throughout.

    .venv/bin/python -m reliability.overload --model-repository models --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import uvloop

from reliability import metrics, serverproc
from reliability.client import Connection, build_request
from reliability.load import Record, open_loop, percentile

LUA = Path(__file__).resolve().parent / "wrk_post.lua"
ROUTE = "/v1/predict"


@dataclass
class OverloadConfig:
    repository: Path
    duration_s: float = 20.0
    capacity_s: float = 5.0
    capacity_connections: int = 32
    connections: int = 1024
    wrk_threads: int = 2
    probe_rate: float = 50.0
    recovery_timeout_s: float = 30.0
    server_args: tuple[str, ...] = ()
    log_dir: Path | None = None


@dataclass
class OverloadReport:
    baseline_p50_ms: float = 0.0
    baseline_p99_ms: float = 0.0
    capacity_rps: float = 0.0
    overload_connections: int = 0
    answered_rps: float = 0.0  # accepted + refused, per second, during the overload
    offered_factor: float = 0.0  # answered_rps / capacity_rps
    accepted_rps: float = 0.0
    accepted_fraction_of_capacity: float = 0.0
    refused: int = 0
    refused_rps: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)  # server-side, /v1/predict, overload phase
    dropped: dict[str, int] = field(default_factory=dict)  # mnist_requests_dropped_total by reason
    other_5xx: int = 0  # any 5xx that is not a deliberate 503
    wrk_socket_errors: int = 0
    wrk_p50_ms: float = 0.0
    wrk_p99_ms: float = 0.0
    probe_statuses: dict[str, int] = field(default_factory=dict)
    probe_accepted_p50_ms: float = 0.0
    probe_accepted_p99_ms: float = 0.0
    probe_refused_p50_ms: float = 0.0
    probe_refused_p99_ms: float = 0.0
    fresh_statuses: dict[str, int] = field(default_factory=dict)
    fresh_healthz_p50_ms: float = 0.0
    fresh_healthz_max_ms: float = 0.0
    rss_start_mb: float = 0.0
    rss_max_mb: float = 0.0
    rss_end_mb: float = 0.0
    recovered: bool = False
    recovery_s: float = 0.0
    recovered_p50_ms: float = 0.0
    idle_after: bool = False  # nothing queued or in progress once the load stopped (the service's own metrics)
    after_statuses: dict[str, int] = field(default_factory=dict)  # 5 sequential requests once idle again
    exit_code: int | None = None

    def lines(self) -> list[str]:
        return [
            f"baseline (idle, sequential): p50 {self.baseline_p50_ms:.2f} ms, p99 {self.baseline_p99_ms:.2f} ms",
            f"capacity: {self.capacity_rps:.0f} req/s accepted",
            f"overload: {self.overload_connections} connections, {self.answered_rps:.0f} req/s answered "
            f"({self.offered_factor:.1f}x capacity)",
            f"  accepted: {self.accepted_rps:.0f} req/s ({self.accepted_fraction_of_capacity:.0%} of capacity)",
            f"  refused:  {self.refused} ({self.refused_rps:.0f} req/s), by reason {self.dropped}",
            f"  statuses: {self.statuses}; 5xx other than 503: {self.other_5xx}; "
            f"wrk socket errors and timeouts: {self.wrk_socket_errors}",
            f"  wrk latency, all answers: p50 {self.wrk_p50_ms:.1f} ms, p99 {self.wrk_p99_ms:.1f} ms",
            f"  probe on kept-alive connections ({sum(self.probe_statuses.values())} requests): {self.probe_statuses}",
            f"  probe accepted latency: p50 {self.probe_accepted_p50_ms:.1f} ms, p99 {self.probe_accepted_p99_ms:.1f} ms",
            f"  probe refusal latency:  p50 {self.probe_refused_p50_ms:.1f} ms, p99 {self.probe_refused_p99_ms:.1f} ms",
            f"  /healthz on a new connection (5/s, like a kubelet probe): {self.fresh_statuses}, "
            f"p50 {self.fresh_healthz_p50_ms:.1f} ms, max {self.fresh_healthz_max_ms:.1f} ms",
            f"memory (RSS): start {self.rss_start_mb:.0f} MiB, max {self.rss_max_mb:.0f} MiB, "
            f"end {self.rss_end_mb:.0f} MiB",
            f"recovery: {'yes' if self.recovered else 'NO'} after {self.recovery_s:.2f} s "
            f"(p50 then {self.recovered_p50_ms:.2f} ms); idle again: {'yes' if self.idle_after else 'NO'}, "
            f"then {self.after_statuses}",
            f"exit code after SIGTERM: {self.exit_code}",
        ]


def digit_body(seed: int = 0) -> bytes:
    img = (np.random.default_rng(seed).integers(0, 256, 784) / 255).round(4)
    return orjson.dumps({"image": img.tolist()})


def ms(v: float) -> float:
    return round(v * 1000, 3)


async def sequential(port: int, raw: bytes, n: int) -> list[float]:
    conn = await Connection.open("127.0.0.1", port)
    out = []
    for _ in range(n):
        reply = await conn.request(raw)
        if reply.status != 200:
            raise RuntimeError(f"baseline request answered {reply.status}: {reply.body[:200]!r}")
        out.append(reply.latency_s)
    conn.close()
    return sorted(out)


async def run_wrk(url: str, body_file: Path, connections: int, duration_s: float, threads: int) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise FileNotFoundError("wrk is not installed (Debian: apt-get install wrk)")
    cmd = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{duration_s:g}s", "--timeout", "10s",
           "-s", str(LUA), url + ROUTE, "--", str(body_file), "application/json", ROUTE]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("WRK_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out.decode()} {err.decode()}")
    result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    return result


async def recovery(port: int, raw: bytes, threshold_s: float, timeout_s: float) -> tuple[bool, float, float]:
    """Sequential probes until five in a row are 200 within ``threshold_s``; returns (ok, seconds, p50)."""
    start = time.perf_counter()
    window: list[float] = []
    conn: Connection | None = None
    while time.perf_counter() - start < timeout_s:
        try:
            if conn is None or conn.closed:
                conn = await Connection.open("127.0.0.1", port)
            async with asyncio.timeout(10):
                reply = await conn.request(raw)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            conn, window = None, []
            continue
        window = [*window, reply.latency_s] if reply.status == 200 and reply.latency_s <= threshold_s else []
        if len(window) == 5:
            if conn is not None:
                conn.close()
            return True, time.perf_counter() - start - sum(window), sorted(window)[2]
        if not window:
            await asyncio.sleep(0.01)
    return False, time.perf_counter() - start, float("nan")


async def settle(server: serverproc.ServerProcess, raw: bytes, timeout_s: float) -> tuple[bool, dict[str, int]]:
    """Once the load has stopped: wait until the service's metrics show nothing queued and nothing in progress
    on the route, then send five sequential requests; returns (idle reached, their statuses)."""
    deadline = time.monotonic() + timeout_s
    idle = False
    while not idle and time.monotonic() < deadline:
        m = await asyncio.to_thread(metrics.scrape, server.url)
        depth = sum(v for (name, _), v in m.items() if name == "mnist_queue_depth_images")
        busy = metrics.value(m, "http_requests_in_progress", route=ROUTE)
        idle = depth == 0 and busy == 0
        if not idle:
            await asyncio.sleep(0.1)
    statuses: Counter[str] = Counter()
    conn = await Connection.open("127.0.0.1", server.port)
    try:
        for _ in range(5):
            statuses[str((await conn.request(raw)).status)] += 1
    finally:
        conn.close()
    return idle, dict(statuses)


async def measure(cfg: OverloadConfig, server: serverproc.ServerProcess, rss: serverproc.RssSampler,
                  body_file: Path, body: bytes) -> OverloadReport:  # fmt: skip
    rep = OverloadReport(overload_connections=cfg.connections)
    raw = build_request("POST", ROUTE, body, {"Content-Type": "application/json"})
    base = await sequential(server.port, raw, 300)
    rep.baseline_p50_ms, rep.baseline_p99_ms = ms(percentile(base, 50)), ms(percentile(base, 99))
    rep.rss_start_mb = round(server.rss_mb(), 1)

    cap = await run_wrk(server.url, body_file, cfg.capacity_connections, cfg.capacity_s, cfg.wrk_threads)
    rep.capacity_rps = round(cap["statuses"].get("200", 0) / (cap["duration_us"] / 1e6), 1)
    m1 = metrics.scrape(server.url)

    stop = asyncio.Event()
    horizon = cfg.duration_s + 60
    probe_task = asyncio.create_task(
        open_loop(server.port, raw, cfg.probe_rate, horizon, max_connections=64, stop=stop, preopen=64)
    )
    health = build_request("GET", "/healthz")
    fresh_task = asyncio.create_task(open_loop(server.port, health, 5, horizon, 64, stop=stop, fresh=True))
    t0 = time.monotonic()
    wrk = await run_wrk(server.url, body_file, cfg.connections, cfg.duration_s, cfg.wrk_threads)
    stop.set()
    probes: Record = await probe_task
    fresh: Record = await fresh_task
    m2 = metrics.scrape(server.url)

    ok, rep.recovery_s, p50 = await recovery(server.port, raw, max(3 * percentile(base, 99), percentile(base, 99) + 0.005),
                                             cfg.recovery_timeout_s)  # fmt: skip
    rep.recovered, rep.recovery_s, rep.recovered_p50_ms = ok, round(rep.recovery_s, 3), ms(p50)
    rep.idle_after, rep.after_statuses = await settle(server, raw, cfg.recovery_timeout_s)
    rep.rss_end_mb = round(server.rss_mb(), 1)
    rep.rss_max_mb = round(max(rss.between(t0, time.monotonic()) or [rep.rss_end_mb]), 1)

    server_side = metrics.statuses(m1, m2, ROUTE)
    st = {int(k): int(v) for k, v in wrk["statuses"].items()}
    wall = wrk["duration_us"] / 1e6
    rep.statuses = {str(k): v for k, v in sorted(st.items())}
    rep.dropped = dict(metrics.dropped(m1, m2))
    rep.other_5xx = sum(
        max(st.get(k, 0), server_side.get(k, 0)) for k in set(st) | set(server_side) if k >= 500 and k != 503
    )
    rep.refused = st.get(503, 0)
    rep.accepted_rps = round(st.get(200, 0) / wall, 1)
    rep.refused_rps = round(rep.refused / wall, 1)
    rep.answered_rps = round(sum(st.values()) / wall, 1)
    rep.offered_factor = round(rep.answered_rps / rep.capacity_rps, 2) if rep.capacity_rps else 0.0
    rep.accepted_fraction_of_capacity = round(rep.accepted_rps / rep.capacity_rps, 3) if rep.capacity_rps else 0.0
    rep.wrk_socket_errors = wrk["errors_connect"] + wrk["errors_read"] + wrk["errors_write"] + wrk["errors_timeout"]
    rep.wrk_p50_ms, rep.wrk_p99_ms = wrk["p50_us"] / 1000, wrk["p99_us"] / 1000
    rep.probe_statuses = dict(probes.statuses())
    acc, ref = probes.latencies(200), probes.latencies(503)
    rep.probe_accepted_p50_ms, rep.probe_accepted_p99_ms = ms(percentile(acc, 50)), ms(percentile(acc, 99))
    rep.probe_refused_p50_ms, rep.probe_refused_p99_ms = ms(percentile(ref, 50)), ms(percentile(ref, 99))
    rep.fresh_statuses = dict(fresh.statuses())
    ok200 = fresh.latencies(200)
    rep.fresh_healthz_p50_ms, rep.fresh_healthz_max_ms = ms(percentile(ok200, 50)), ms(ok200[-1] if ok200 else 0.0)
    return rep


def run(cfg: OverloadConfig) -> OverloadReport:
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        log_dir = cfg.log_dir or Path(tmp)
        body_file = Path(tmp) / "body.json"
        body = digit_body()
        body_file.write_bytes(body)
        server = serverproc.start(cfg.repository, log_dir / "overload-server.log", *cfg.server_args)
        try:
            with serverproc.RssSampler(server.proc.pid) as rss:
                rep = uvloop.run(measure(cfg, server, rss, body_file, body))
        finally:
            code = server.stop()
        rep.exit_code = code
        return rep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reliability.overload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model-repository", type=Path, default=Path("models"), help="Model repository to serve.")
    p.add_argument("--duration", type=float, default=20.0, help="Seconds of overload (default 20).")
    p.add_argument("--capacity-duration", type=float, default=5.0, help="Seconds of the capacity run.")
    p.add_argument("--connections", type=int, default=1024, help="wrk connections during the overload.")
    p.add_argument("--probe-rate", type=float, default=50.0, help="Probe requests per second.")
    p.add_argument("--json", action="store_true", help="Also print the report as one JSON line.")
    p.add_argument(
        "server_args", nargs="*", help="Extra mnist-serve flags, after --, e.g. -- --max-inflight-requests 64"
    )
    args = p.parse_args(argv)
    cfg = OverloadConfig(args.model_repository, args.duration, args.capacity_duration,
                         connections=args.connections, probe_rate=args.probe_rate,
                         server_args=tuple(args.server_args))  # fmt: skip
    rep = run(cfg)
    print("\n".join(rep.lines()))
    if args.json:
        print("OVERLOAD_JSON " + json.dumps(asdict(rep)))
    ok = rep.other_5xx == 0 and rep.recovered and rep.exit_code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
