"""Slow and hostile clients: can a few hundred connections that never finish a request exhaust the service?

Against a fresh ``python -m service.server`` on 127.0.0.1, opens at once: idle connections (nothing sent),
slowloris connections (headers a byte every ``--trickle`` seconds, never complete) and trickling bodies
(headers complete, body never complete); then, while they are held, measures ordinary requests on a
separate connection. Reports how long the service kept each kind open, the latency of ordinary requests
before and during, the process's open file descriptors and memory, and what an endless header costs.

``--unguarded`` starts the service with the guards effectively off (timeouts of a day, a 2 GiB header cap):
what plain uvicorn does.

    .venv/bin/python -m reliability.slowclients --model-repository models --connections 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson
import psutil
import uvloop

from reliability import serverproc
from reliability.client import Connection, build_request
from reliability.load import percentile


@dataclass
class SlowReport:
    guarded: bool
    connections_per_kind: int
    held_idle_s: list[float]  # p50, max seconds the service kept them open (capped at --hold)
    held_slowloris_s: list[float]
    held_slow_body_s: list[float]
    closed_by_server: dict[str, int]
    normal_before_p50_ms: float
    normal_before_p99_ms: float
    normal_during_p50_ms: float
    normal_during_p99_ms: float
    normal_during_errors: int
    fds_before: int
    fds_during: int
    rss_before_mb: float
    rss_during_mb: float
    header_bomb_sent_mb: float
    header_bomb_rss_growth_mb: float
    header_bomb_answer: str

    def lines(self) -> list[str]:
        k = self.connections_per_kind
        return [
            f"service: {'guarded (defaults)' if self.guarded else 'UNGUARDED (no header/body timers, no header cap)'}",
            f"{k} idle + {k} slowloris + {k} trickling-body connections held open by the clients",
            f"  closed by the service: {self.closed_by_server}",
            f"  kept open (p50 / max s): idle {self.held_idle_s}, slowloris {self.held_slowloris_s}, "
            f"trickling body {self.held_slow_body_s}",
            f"ordinary requests before: p50 {self.normal_before_p50_ms:.2f} ms, p99 {self.normal_before_p99_ms:.2f} ms",
            f"ordinary requests during: p50 {self.normal_during_p50_ms:.2f} ms, p99 {self.normal_during_p99_ms:.2f} ms, "
            f"errors {self.normal_during_errors}",
            f"open file descriptors: {self.fds_before} before, {self.fds_during} during",
            f"RSS: {self.rss_before_mb:.1f} MiB before, {self.rss_during_mb:.1f} MiB during",
            f"endless header: sent {self.header_bomb_sent_mb:.1f} MiB before the service stopped reading; "
            f"RSS grew {self.header_bomb_rss_growth_mb:.1f} MiB; answer: {self.header_bomb_answer}",
        ]


async def hold(port: int, kind: str, hold_s: float, trickle_s: float) -> tuple[float, bool]:
    """Open one connection of ``kind``; returns (seconds it stayed open, whether the service closed it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()
    if kind == "slowloris":
        writer.write(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    elif kind == "body":
        writer.write(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{\"image\": [")  # fmt: skip
    closed = False
    try:
        while time.perf_counter() - start < hold_s:
            try:
                data = await asyncio.wait_for(reader.read(65536), trickle_s)
            except TimeoutError:
                if kind == "slowloris":
                    writer.write(b"X")
                elif kind == "body":
                    writer.write(b"0,")
                continue
            if not data:
                closed = True
                break
    except OSError:
        closed = True
    writer.close()
    return time.perf_counter() - start, closed


async def normal_requests(port: int, n: int, pause_s: float) -> tuple[list[float], int]:
    body = orjson.dumps({"image": [0.1] * 784})
    raw = build_request("POST", "/v1/predict", body, {"Content-Type": "application/json"})
    out, errors = [], 0
    for _ in range(n):
        try:
            conn = await Connection.open("127.0.0.1", port)  # a new client each time
            reply = await asyncio.wait_for(conn.request(raw), 10)
            conn.close()
            if reply.status == 200:
                out.append(reply.latency_s)
            else:
                errors += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            errors += 1
        await asyncio.sleep(pause_s)
    return sorted(out), errors


def header_bomb(port: int, proc: psutil.Process, limit_mb: float = 256) -> tuple[float, float, str]:
    """Stream one endless header; returns (MiB sent before the service stopped reading, the service's RSS
    growth while the connection is still open, its answer)."""
    sent = 0
    answer = "none"
    rss0 = proc.memory_info().rss
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(2)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        chunk = b"X-Pad: " + b"a" * 8000 + b"\r\n"
        try:
            while sent < limit_mb * 2**20:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        try:
            answer = s.recv(200).split(b"\r\n", 1)[0].decode() or "closed"
        except OSError as exc:
            answer = f"no answer ({type(exc).__name__})"
        growth = (proc.memory_info().rss - rss0) / 2**20
    return sent / 2**20, growth, answer


async def measure(
    server: serverproc.ServerProcess, k: int, hold_s: float, trickle_s: float, guarded: bool
) -> SlowReport:
    proc = psutil.Process(server.proc.pid)
    fds_before, rss_before = proc.num_fds(), proc.memory_info().rss / 2**20
    before, _ = await normal_requests(server.port, 100, 0.01)
    holders = [asyncio.create_task(hold(server.port, kind, hold_s, trickle_s))
               for kind in ("idle", "slowloris", "body") for _ in range(k)]  # fmt: skip
    await asyncio.sleep(1.0)
    fds_during, rss_during = proc.num_fds(), proc.memory_info().rss / 2**20
    during, errors = await normal_requests(server.port, 100, 0.02)
    held = await asyncio.gather(*holders)
    kinds = {"idle": held[:k], "slowloris": held[k : 2 * k], "body": held[2 * k :]}

    def summary(rows: list[tuple[float, bool]]) -> list[float]:
        times = sorted(t for t, _ in rows)
        return [round(percentile(times, 50), 2), round(times[-1], 2)]

    sent_mb, growth, answer = await asyncio.to_thread(header_bomb, server.port, proc)
    return SlowReport(
        guarded, k, summary(kinds["idle"]), summary(kinds["slowloris"]), summary(kinds["body"]),
        {kind: sum(c for _, c in rows) for kind, rows in kinds.items()},
        percentile(before, 50) * 1000, percentile(before, 99) * 1000,
        percentile(during, 50) * 1000, percentile(during, 99) * 1000, errors,
        fds_before, fds_during, round(rss_before, 1), round(rss_during, 1),
        round(sent_mb, 1), round(growth, 1), answer,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reliability.slowclients", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model-repository", type=Path, default=Path("models"), help="Model repository to serve.")
    p.add_argument("--connections", type=int, default=300, help="Connections of each kind (default 300).")
    p.add_argument("--hold", type=float, default=30.0, help="Seconds the clients try to hold them (default 30).")
    p.add_argument("--trickle", type=float, default=1.0, help="Seconds between trickled bytes (default 1).")
    p.add_argument("--unguarded", action="store_true", help="Turn the guards off (what plain uvicorn does).")
    p.add_argument("--json", action="store_true", help="Also print the report as one JSON line.")
    args = p.parse_args(argv)
    extra = ("--header-timeout-s", "86400", "--body-timeout-s", "86400", "--request-timeout-s", "86400",
             "--max-header-bytes", str(2**31)) if args.unguarded else ()  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="slowclients-") as tmp:
        server = serverproc.start(args.model_repository, Path(tmp) / "server.log", "--no-access-log", *extra)
        try:
            rep = uvloop.run(measure(server, args.connections, args.hold, args.trickle, not args.unguarded))
        finally:
            server.stop(timeout_s=120)
    print("\n".join(rep.lines()))
    if args.json:
        print("SLOWCLIENTS_JSON " + json.dumps(asdict(rep)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
