"""``python -m bench.guards_check``: the service's HTTP guards under uvicorn (``mnist-serve``) and under granian
(bench/granian_serve.py), probed with the same hostile connections over raw sockets on 127.0.0.1.

Each server runs the same app and settings, with short timeouts so the check is quick
(``MNIST_HEADER_TIMEOUT_S`` and ``MNIST_BODY_TIMEOUT_S`` = 2 s). Probes, and what holds the line under uvicorn
(service/guards.py; docs/security.md):

- ``huge-headers``: a 64 KiB header (``MNIST_MAX_HEADER_BYTES`` is 32 KiB): 431 expected;
- ``slow-headers``: half a request, then nothing: 408 (or the connection closed) within the header timeout;
- ``slow-body``: complete headers, 10 of 3,000 body bytes, then nothing: 400 (or closed) within the body timeout;
- ``declared-too-large``: ``Content-Length`` over ``MNIST_MAX_BODY_BYTES``, no body sent: 413 at once;
- ``idle-connections``: 256 connections that send nothing; a new client still gets ``/readyz`` at once, and the
  idle ones are closed by the header timeout.

Prints one line per (server, probe) and writes ``guards.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.models import DEFAULT_REPOSITORY, find_model
from bench.servers import ServerProcess, start

TIMEOUT_S = 2.0
SLACK_S = 2.0


@dataclass
class Probe:
    server: str
    probe: str
    expected: str
    got: str
    seconds: float
    held: bool


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _answer(s: socket.socket, wait_s: float) -> tuple[str, float]:
    """The status line's code, 'closed' (EOF or reset without a response) or 'nothing', and the seconds waited."""
    s.settimeout(wait_s)
    t0 = time.monotonic()
    try:
        data = s.recv(4096)
    except TimeoutError:
        return "nothing", time.monotonic() - t0
    except ConnectionResetError:
        return "closed", time.monotonic() - t0
    if not data:
        return "closed", time.monotonic() - t0
    parts = data.split(b" ", 2)
    return (parts[1].decode() if len(parts) > 1 else repr(data[:40])), time.monotonic() - t0


def huge_headers(port: int) -> tuple[str, float]:
    s = _connect(port)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
    try:
        return _answer(s, 5)
    finally:
        s.close()


def slow_headers(port: int) -> tuple[str, float]:
    s = _connect(port)
    s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
    try:
        return _answer(s, TIMEOUT_S + SLACK_S + 3)
    finally:
        s.close()


def slow_body(port: int) -> tuple[str, float]:
    s = _connect(port)
    s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 3000\r\n\r\n")
    s.sendall(b'{"image": ')
    try:
        return _answer(s, TIMEOUT_S + SLACK_S + 3)
    finally:
        s.close()


def declared_too_large(port: int) -> tuple[str, float]:
    s = _connect(port)
    s.sendall(b"POST /v1/predict/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
              b"Content-Length: 1000000000\r\n\r\n")  # fmt: skip
    try:
        return _answer(s, 5)
    finally:
        s.close()


def idle_connections(port: int, n: int = 256) -> tuple[str, float]:
    idle = [_connect(port) for _ in range(n)]
    try:
        s = _connect(port)
        t0 = time.monotonic()
        s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        code, _ = _answer(s, 5)
        first = time.monotonic() - t0
        s.close()
        time.sleep(TIMEOUT_S + SLACK_S)
        still_open = 0
        for c in idle:
            c.setblocking(False)
            try:
                c.recv(1)  # b"" (or an error): the server closed it; any answer counts as closed as well
            except BlockingIOError:
                still_open += 1  # nothing to read and not closed: still held open
            except OSError:
                pass
        return f"{code}, {still_open} of {n} idle still open after {TIMEOUT_S + SLACK_S:g} s", first
    finally:
        for c in idle:
            c.close()


PROBES: dict[str, tuple[Callable[[int], tuple[str, float]], str, Callable[[str, float], bool]]] = {
    "huge-headers": (huge_headers, "431", lambda got, t: got == "431"),
    "slow-headers": (slow_headers, f"408 or closed in {TIMEOUT_S:g}(+{SLACK_S:g}) s",
                     lambda got, t: got in ("408", "closed") and t <= TIMEOUT_S + SLACK_S),
    "slow-body": (slow_body, f"400 or closed in {TIMEOUT_S:g}(+{SLACK_S:g}) s",
                  lambda got, t: got in ("400", "closed") and t <= TIMEOUT_S + SLACK_S),
    "declared-too-large": (declared_too_large, "413 at once", lambda got, t: got == "413" and t < 1.0),
    "idle-connections": (idle_connections, "200 at once, 0 idle left open",
                         lambda got, t: got.startswith("200, 0 of") and t < 1.0),
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.guards_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = p.parse_args(argv)
    model = find_model(args.model_repository)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {
        "MNIST_MODEL_REPOSITORY": str(model.repository),
        "MNIST_MODEL_NAME": model.name,
        "MNIST_MODEL_VERSION": model.version,
        "MNIST_HEADER_TIMEOUT_S": str(TIMEOUT_S),
        "MNIST_BODY_TIMEOUT_S": str(TIMEOUT_S),
        "MNIST_ACCESS_LOG": "false",
        "MNIST_EVENT_LOOP": args.loop,
    }
    servers: dict[str, ServerProcess] = {
        "uvicorn": start("guards-uvicorn", ["-m", "service.server"], args.out / "logs", env),
        "granian": start("guards-granian", ["-m", "bench.granian_serve", "--app", "service"], args.out / "logs", env),
    }
    results: list[Probe] = []
    try:
        for s in servers.values():
            s.wait_ready()
        for name, s in servers.items():
            for probe, (fn, expected, ok) in PROBES.items():
                got, seconds = fn(s.port)
                r = Probe(name, probe, expected, got, round(seconds, 3), ok(got, seconds))
                results.append(r)
                print(f"{name:<8} {probe:<19} expected {expected:<32} got {got} after {seconds:.2f} s: "
                      f"{'HELD' if r.held else 'NOT HELD'}", flush=True)  # fmt: skip
    finally:
        for s in servers.values():
            s.stop()
    (args.out / "guards.json").write_text(json.dumps({
        "command": "python -m bench.guards_check" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
        "timeouts_s": TIMEOUT_S,
        "probes": [asdict(r) for r in results],
    }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
