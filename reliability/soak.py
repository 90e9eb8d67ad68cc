"""Soak: moderate, steady load for a long time (default 10 minutes), watching for drift and leaks.

Open-loop traffic at a fixed rate (well under capacity) in three kinds: single images as JSON, single
images as PNG, and .npy batches, against a fresh ``python -m service.server`` child process on 127.0.0.1.
Reports errors, latency per window (p50/p99, first window vs last), resident memory per window (start,
end, max) and the service's own 5xx count. Not part of CI (it takes minutes); the figures of one run are in
docs/reliability.md.

    .venv/bin/python -m reliability.soak --model-repository models --duration 600
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson
import uvloop
from PIL import Image

from reliability import metrics, serverproc
from reliability.client import build_request
from reliability.load import NOT_SENT, Record, open_loop, percentile

MAX_CONNECTIONS = 256  # per kind of request


@dataclass
class Window:
    start_s: float
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    rss_mb: float


@dataclass
class SoakReport:
    duration_s: float
    rates: dict[str, float]
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # anything but a 200 for a request that was sent
    not_sent: int = 0  # arrivals the load generator could not send: all its connections were busy
    server_5xx: int = 0
    windows: list[Window] = field(default_factory=list)
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_max_mb: float = 0.0
    exit_code: int | None = None
    load_average: tuple[float, float] = (0.0, 0.0)  # the machine's 1-minute load at start and end (shared?)

    def lines(self) -> list[str]:
        first, last = self.windows[0], self.windows[-1]
        out = [
            f"soak: {self.duration_s:.0f} s at {sum(self.rates.values()):.0f} req/s "
            f"({', '.join(f'{k} {v:g}/s' for k, v in self.rates.items())})",
            f"requests: {self.requests}; statuses: {self.statuses}; errors: {self.errors}; "
            f"server-side 5xx: {self.server_5xx}; not sent (all {MAX_CONNECTIONS} client connections busy): "
            f"{self.not_sent}",
            "window   requests  errors  p50 ms   p99 ms   RSS MiB",
        ]
        out += [
            f"{w.start_s:6.0f}s  {w.requests:8d}  {w.errors:6d}  {w.p50_ms:7.2f}  {w.p99_ms:7.2f}  {w.rss_mb:8.1f}"
            for w in self.windows
        ]
        out += [
            f"latency drift (single JSON image, first vs last window): p50 {first.p50_ms:.2f} -> {last.p50_ms:.2f} ms, "
            f"p99 {first.p99_ms:.2f} -> {last.p99_ms:.2f} ms",
            f"memory (RSS): start {self.rss_start_mb:.1f} MiB, end {self.rss_end_mb:.1f} MiB, "
            f"max {self.rss_max_mb:.1f} MiB",
            f"exit code after SIGTERM: {self.exit_code}; machine load average (1 min) at start / end: "
            f"{self.load_average[0]:.2f} / {self.load_average[1]:.2f} on {os.cpu_count()} CPUs",
        ]
        return out


def bodies(seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    digit = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(digit).save(png, format="PNG")
    npy = io.BytesIO()
    np.save(npy, rng.integers(0, 256, (16, 28, 28), dtype=np.uint8), allow_pickle=False)
    image = orjson.dumps({"image": (digit.ravel() / 255).round(4).tolist()})
    return {
        "json": build_request("POST", "/v1/predict", image, {"Content-Type": "application/json"}),
        "png": build_request("POST", "/v1/predict", png.getvalue(), {"Content-Type": "image/png"}),
        "npy16": build_request("POST", "/v1/predict/batch", npy.getvalue(), {"Content-Type": "application/x-npy"}),
    }


async def drive(port: int, rates: dict[str, float], duration_s: float) -> dict[str, Record]:
    raws = bodies()
    tasks = {k: open_loop(port, raws[k], rate, duration_s, MAX_CONNECTIONS) for k, rate in rates.items()}
    results = await asyncio.gather(*tasks.values())
    return dict(zip(tasks, results, strict=True))


def run(repository: Path, duration_s: float, rates: dict[str, float], server_args: tuple[str, ...] = (),
        window_s: float | None = None) -> SoakReport:  # fmt: skip
    rep = SoakReport(duration_s, rates)
    window_s = window_s or min(60.0, duration_s / 5)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        server = serverproc.start(repository, Path(tmp) / "soak-server.log", "--no-access-log", *server_args)
        try:
            m0 = metrics.scrape(server.url)
            load_start = os.getloadavg()[0]
            with serverproc.RssSampler(server.proc.pid, interval_s=1.0) as rss:
                t0 = time.monotonic()
                records = uvloop.run(drive(server.port, rates, duration_s))
                t_end = time.monotonic()
            rep.load_average = (load_start, os.getloadavg()[0])
            m1 = metrics.scrape(server.url)
        finally:
            rep.exit_code = server.stop()
    outcomes = [o for r in records.values() for o in r.outcomes]
    rep.requests = len(outcomes)
    statuses: Counter[str] = Counter()
    for r in records.values():
        statuses.update(r.statuses())
    rep.statuses = dict(statuses)
    rep.errors = sum(n for s, n in statuses.items() if s not in ("200", NOT_SENT))
    rep.not_sent = statuses.get(NOT_SENT, 0)
    rep.server_5xx = sum(
        int(v - m0.get(k, 0.0))
        for k, v in m1.items()
        if k[0] == "http_requests_total" and dict(k[1]).get("status", "").startswith("5")
    )
    base = min(o.at for o in outcomes)  # loop time of the first arrival
    json_outcomes = records["json"].outcomes
    n_windows = max(1, int(duration_s // window_s))
    for w in range(n_windows):
        lo, hi = base + w * window_s, base + (w + 1) * window_s
        inside = [o for o in outcomes if lo <= o.at < hi and o.status != NOT_SENT]
        lat = sorted(o.latency_s for o in json_outcomes if lo <= o.at < hi and o.status == 200)
        mem = rss.between(t0 + w * window_s, t0 + (w + 1) * window_s)
        rep.windows.append(Window(round(w * window_s, 1), len(inside), sum(o.status != 200 for o in inside),
                                  round(percentile(lat, 50) * 1000, 3), round(percentile(lat, 99) * 1000, 3),
                                  round(max(mem) if mem else float("nan"), 1)))  # fmt: skip
    samples = rss.between(t0, t_end)
    rep.rss_start_mb, rep.rss_end_mb, rep.rss_max_mb = (
        round(samples[0], 1),
        round(samples[-1], 1),
        round(max(samples), 1),
    )
    return rep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reliability.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model-repository", type=Path, default=Path("models"), help="Model repository to serve.")
    p.add_argument("--duration", type=float, default=600.0, help="Seconds of load (default 600).")
    p.add_argument("--json-rate", type=float, default=200.0, help="Single JSON images per second.")
    p.add_argument("--png-rate", type=float, default=25.0, help="Single PNG images per second.")
    p.add_argument("--npy-rate", type=float, default=25.0, help=".npy batches of 16 images per second.")
    p.add_argument("--window", type=float, default=None, help="Window length in seconds (default: 60).")
    p.add_argument("--json", action="store_true", help="Also print the report as one JSON line.")
    p.add_argument("server_args", nargs="*", help="Extra mnist-serve flags, after --.")
    args = p.parse_args(argv)
    rates = {"json": args.json_rate, "png": args.png_rate, "npy16": args.npy_rate}
    rep = run(args.model_repository, args.duration, rates, tuple(args.server_args), args.window)
    print("\n".join(rep.lines()))
    if args.json:
        print("SOAK_JSON " + json.dumps(asdict(rep)))
    return 0 if rep.errors == 0 and rep.server_5xx == 0 and rep.exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
