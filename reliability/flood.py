"""Liveness under a bulk flood: how long ``/healthz`` takes on a new connection while wrk floods the service.

Against a fresh ``python -m service.server`` child process, wrk posts 4096-image uint8 ``.npy`` bodies
(3.1 MiB) back to back on ``--connections`` connections for ``--duration`` seconds, ``--rounds`` times with a
pause; meanwhile (probes between rounds are not counted) a probe process (its own interpreter, like a kubelet) opens a new connection every
``--interval`` seconds and asks ``GET /healthz``. Each probe is split into connect (the kernel's accept queue),
answer (request sent to the complete response) and the probe's own lateness (how much later than asked its
timer fired: the probe client starved of CPU, not the service). Peak and settled memory come from
``/proc/<pid>/status``.

    flock /tmp/bench.lock .venv/bin/python -m reliability.flood --model-repository models
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from reliability import metrics, serverproc

LUA = Path(__file__).resolve().parent / "wrk_post.lua"

PROBE = r"""
import json, socket, sys, time
port, interval_s, timeout_s = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
request = b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
due = time.perf_counter()
while True:
    start = time.perf_counter()
    late = start - due
    record = {"t": time.time(), "late_ms": late * 1000}
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            connected = time.perf_counter()
            s.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        done = time.perf_counter()
        record.update(status=int(data.split(b" ", 2)[1]), connect_ms=(connected - start) * 1000,
                      answer_ms=(done - connected) * 1000, total_ms=(done - start) * 1000)
    except Exception as exc:
        record.update(status=0, error=type(exc).__name__)
    print(json.dumps(record), flush=True)
    due = time.perf_counter() + interval_s
    time.sleep(interval_s)
"""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def summary(name: str, values: list[float]) -> str:
    return (f"{name} p50 {percentile(values, 0.5):.1f} ms, p99 {percentile(values, 0.99):.1f} ms, "
            f"max {max(values, default=float('nan')):.1f} ms")  # fmt: skip


def probe_report(records: list[dict[str, Any]]) -> list[str]:
    ok = [r for r in records if r["status"] == 200]
    total = [r["total_ms"] for r in ok]
    return [
        f"/healthz on a new connection: {len(ok)} answered, {len(records) - len(ok)} failed; "
        + summary("total", total)
        + f"; {sum(t > 100 for t in total)} over 100 ms, {sum(t > 2000 for t in total)} over 2 s",
        "  " + summary("connect", [r["connect_ms"] for r in ok]),
        "  " + summary("answer", [r["answer_ms"] for r in ok]),
        "  " + summary("probe's own timer lateness", [r["late_ms"] for r in records]),
    ]


def proc_status(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wrk(url: str, body: Path, connections: int, duration_s: float, threads: int, cpus: str = "") -> dict[str, Any]:
    exe = shutil.which("wrk")
    if exe is None:
        raise FileNotFoundError("wrk is not installed (Debian: apt-get install wrk)")
    pin = ["taskset", "-c", cpus] if cpus else []
    cmd = [*pin, exe, "-t", str(threads), "-c", str(connections), "-d", f"{duration_s:g}s", "--timeout", "30s",
           "-s", str(LUA), url, "--", str(body), "application/x-npy", "/v1/predict/batch"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 120, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--connections", type=int, default=200)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pause", type=float, default=5.0, help="seconds between rounds")
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--wrk-cpus", default="", help="pin wrk to these CPUs (taskset -c), e.g. 1")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between probes")
    p.add_argument("--json", type=Path, help="also write the raw probe records and figures here")
    p.add_argument("server_args", nargs="*", help="extra mnist-serve flags (after --)")
    args = p.parse_args(argv)

    images = np.random.default_rng(7).integers(0, 256, (4096, 784), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="flood-") as tmp:
        body = Path(tmp) / "flood.npy"
        buf = io.BytesIO()
        np.save(buf, images)
        body.write_bytes(buf.getvalue())
        server = serverproc.start(args.model_repository.resolve(), Path(tmp) / "server.log", *args.server_args)
        try:
            pid = server.proc.pid
            base = proc_status(pid, "VmRSS")
            before = metrics.scrape(server.url)
            probe = subprocess.Popen([sys.executable, "-c", PROBE, str(server.port), str(args.interval), "10"],
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
            rounds: list[dict[str, Any]] = []
            after: list[float] = []
            windows: list[tuple[float, float]] = []
            try:
                time.sleep(1.0)
                for i in range(args.rounds):
                    began = time.time()
                    rounds.append(
                        wrk(server.url, body, args.connections, args.duration, args.wrk_threads, args.wrk_cpus)
                    )
                    windows.append((began, time.time()))
                    time.sleep(args.pause if i < args.rounds - 1 else 2.0)
                    after.append(proc_status(pid, "VmRSS"))
            finally:
                probe.terminate()
                out, _ = probe.communicate(timeout=30)
            peak = proc_status(pid, "VmHWM")
            dropped = dict(metrics.dropped(before, metrics.scrape(server.url)))
        finally:
            code = server.stop()
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    records = [r for r in records if any(t0 <= r["t"] <= t1 for t0, t1 in windows)]  # under load only
    lines = [
        f"flood: {args.rounds} x {args.duration:g} s, {args.connections} connections of 3.1 MiB .npy (wrk -t "
        f"{args.wrk_threads}{', on CPUs ' + args.wrk_cpus if args.wrk_cpus else ''}); statuses {[r['statuses'] for r in rounds]}; wrk p99 "
        f"{[round(r['p99_us'] / 1000) for r in rounds]} ms; refused by reason (the service's count) {dropped}",
        f"memory: RSS base {base:.0f} MiB, after each round {[round(a) for a in after]} MiB, VmHWM {peak:.0f} MiB",
        *probe_report(records),
        f"exit code after SIGTERM: {code}",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"args": sys.argv[1:], "lines": lines, "wrk": rounds, "probes": records}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
