"""wrk, the load generator: one C process (epoll, LuaJIT) per measured point, on 127.0.0.1.

Bodies are written to files once and each wrk thread formats every request once (bench/wrk/post.lua),
so wrk spends its time on sockets. Its own CPU time comes back from ``wait4`` so the report can show it
was not the bottleneck.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LUA = Path(__file__).resolve().parent / "wrk" / "post.lua"


@dataclass(frozen=True)
class Workload:
    """One kind of request: where it goes and the pool of bodies it cycles through."""

    name: str  # e.g. "json", "png", "bulk-raw-1024"
    path: str
    content_type: str
    accept: str | None
    bodies: tuple[bytes, ...]
    images_per_request: int

    def write(self, folder: Path) -> str:
        """Write the bodies under ``folder``; returns the prefix post.lua reads."""
        folder.mkdir(parents=True, exist_ok=True)
        prefix = folder / self.name
        for i, body in enumerate(self.bodies):
            Path(f"{prefix}.{i}").write_bytes(body)
        return str(prefix)


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    errors: int  # non-2xx/3xx statuses + socket errors (connect, read, write, timeout)
    errors_status: int
    errors_socket: int
    latency_mean_ms: float
    latency_max_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    p999_ms: float
    wrk_cpu_s: float  # user + system CPU seconds of the wrk process

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def good_rps(self) -> float:
        """Answered requests per second that were not errors (4xx/5xx are not throughput)."""
        return (self.requests - self.errors_status) / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def wrk_cpu_util(self) -> float:
        """wrk's CPU use in cores (1.0 = one core busy all the time)."""
        return self.wrk_cpu_s / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "rps": self.rps, "good_rps": self.good_rps, "wrk_cpu_util": self.wrk_cpu_util}


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise FileNotFoundError("wrk is not installed (Debian: apt-get install wrk)")
    return found


class WrkRun:
    """A running wrk process; ``result()`` waits for it and parses its JSON line."""

    def __init__(
        self, url: str, workload: Workload, prefix: str, connections: int, duration_s: float, threads: int
    ) -> None:
        threads = max(1, min(threads, connections))
        self.cmd = [
            wrk_binary(),
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(duration_s))}s",  # wrk takes whole seconds
            "--timeout",
            "10s",
            "-s",
            str(LUA),
            url + workload.path,
            "--",
            workload.path,
            workload.content_type,
            workload.accept or "-",
            prefix,
            str(len(workload.bodies)),
        ]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def result(self) -> WrkResult:
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        with self.proc.stdout, self.proc.stderr:  # small outputs: read both to EOF, then reap with rusage
            out = self.proc.stdout.read().decode()
            err = self.proc.stderr.read().decode()
        _, status, rusage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        line = next((ln for ln in out.splitlines() if ln.startswith("WRK_JSON ")), None)
        if self.proc.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({self.proc.returncode}): {' '.join(self.cmd)}\n{out}\n{err}")
        d = json.loads(line.removeprefix("WRK_JSON "))
        socket_errors = d["errors_connect"] + d["errors_read"] + d["errors_write"] + d["errors_timeout"]
        return WrkResult(
            requests=d["requests"],
            duration_s=d["duration_us"] / 1e6,
            errors=d["errors_status"] + socket_errors,
            errors_status=d["errors_status"],
            errors_socket=socket_errors,
            latency_mean_ms=d["latency_mean_us"] / 1000,
            latency_max_ms=d["latency_max_us"] / 1000,
            p50_ms=d["p50_us"] / 1000,
            p90_ms=d["p90_us"] / 1000,
            p95_ms=d["p95_us"] / 1000,
            p99_ms=d["p99_us"] / 1000,
            p999_ms=d["p999_us"] / 1000,
            wrk_cpu_s=rusage.ru_utime + rusage.ru_stime,
        )


def run_wrk(url: str, workload: Workload, prefix: str, connections: int, duration_s: float, threads: int) -> WrkResult:
    return WrkRun(url, workload, prefix, connections, duration_s, threads).result()
