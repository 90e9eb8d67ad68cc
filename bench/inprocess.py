"""``python -m bench.inprocess``: the CPU one single-image JSON request costs the service's own code, end to
end through the real app (edge, guards of the app, REST route, decoding, admission, batcher, engine call,
feedback ring, metrics, reply) but without a socket or an HTTP server: the ASGI app is called directly, one
request at a time (or ``--concurrency`` clients at once, whose requests batch as under load), with the same real
MNIST bodies ``mnist-bench`` sends. The event loop, the kernel and the
load generator do not take part, so it moves far less with the machine than a socket benchmark.

``--http`` measures the server's HTTP layer too: each client is a connection of uvicorn's protocol with the
service's guards and in-flight limit, built as ``mnist-serve`` builds them, fed the raw request bytes, its
transport recording what is written (still no socket, no kernel).

``--source`` may name other checkouts (e.g. a ``git worktree`` of an older commit): each is measured in its
own process running this file against that checkout's ``service`` package, the checkouts taking turns round
by round, so a comparison sees the same machine. Writes ``inprocess.json`` (``inprocess-c64.json`` with
``--concurrency 64``, ``inprocess-http-c64.json`` with ``--http`` too: every round, and the best per checkout)
to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]


async def _measure(model_repository: Path, requests: int, bodies: Sequence[bytes], concurrency: int = 1) -> float:
    """CPU microseconds per request, over ``requests`` requests after 500 unmeasured ones: one at a time, this
    thread's CPU; or ``concurrency`` clients at once (their requests batch as under load), the process's CPU
    (the engine thread's included)."""
    from service.app import create_app  # the checkout's own, found first on sys.path
    from service.settings import settings_from_args

    app = create_app(settings_from_args(["--model-repository", str(model_repository), "--no-access-log"]))
    statuses: set[int] = set()

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    async def one(body: bytes) -> None:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)  # the client never hangs up
            return {"type": "http.disconnect"}

        headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"",
                 "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000),
                 "server": ("127.0.0.1", 8000), "state": {}}  # fmt: skip
        await app(scope, receive, send)

    async with app.router.lifespan_context(app):
        core = app.state.core
        for _ in range(6000):  # warm-up and calibration take a few seconds
            if core.ready:
                break
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("the app did not become ready")
        for i in range(500):
            await one(bodies[i % len(bodies)])
        if concurrency == 1:
            t0 = time.thread_time()
            for i in range(requests):
                await one(bodies[i % len(bodies)])
            cpu = time.thread_time() - t0
        else:

            async def client(first: int) -> None:
                for i in range(first, requests, concurrency):
                    await one(bodies[i % len(bodies)])

            t0 = time.process_time()
            await asyncio.gather(*(client(k) for k in range(concurrency)))
            cpu = time.process_time() - t0
    if statuses != {200}:
        raise RuntimeError(f"unexpected statuses {sorted(statuses)}")
    return cpu / requests * 1e6


class _Transport(asyncio.Transport):
    """Where the socket transport stands: hands each write to its connection."""

    def __init__(self, conn: _Connection) -> None:
        super().__init__()
        self.conn, self.closing = conn, False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def write(self, data: Any) -> None:
        self.conn.received(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class _Connection:
    """One keep-alive client of the protocol: sends a request, reads its whole response, sends the next."""

    def __init__(self, protocol: Any, requests: Sequence[bytes], left: list[int], done: asyncio.Future[None]) -> None:
        self.protocol, self.requests, self.left, self.done = protocol, requests, left, done
        self.sent, self.got, self.statuses = 0, b"", set[int]()
        protocol.connection_made(_Transport(self))

    def next(self) -> None:
        if self.left[0] <= 0:
            if self.left[1] == 0 and not self.done.done():
                self.done.set_result(None)
            return
        self.left[0] -= 1
        self.left[1] += 1
        self.sent += 1
        self.protocol.data_received(self.requests[self.sent % len(self.requests)])

    def received(self, data: bytes) -> None:
        self.got += data
        head, sep, body = self.got.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]) if sep else -1
        if 0 <= length <= len(body):
            self.statuses.add(int(head[9:12]))
            self.got, self.left[1] = b"", self.left[1] - 1
            asyncio.get_running_loop().call_soon(self.next)  # the client's turn, as after a socket read


async def _measure_http(model_repository: Path, requests: int, bodies: Sequence[bytes], concurrency: int = 1) -> float:
    """As ``_measure``, through the server's HTTP layer (``--http``): the process's CPU per request."""
    from uvicorn.server import ServerState

    from service.app import create_app
    from service.registry import ModelRegistry
    from service.server import build_config
    from service.settings import settings_from_args

    settings = settings_from_args(["--model-repository", str(model_repository), "--no-access-log"])
    app = create_app(settings, ModelRegistry.load(settings))
    config = build_config(settings, app)
    config.load()
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    )
    wire = [head % len(b) + b for b in bodies]
    state, protocol_class = ServerState(), cast(Any, config.http_protocol_class)
    statuses: set[int] = set()

    async def run(count: int) -> None:
        left, done = [count, 0], asyncio.get_running_loop().create_future()
        conns = [_Connection(protocol_class(config=config, server_state=state, app_state={}), wire, left,
                             done) for _ in range(concurrency)]  # fmt: skip
        for conn in conns:
            conn.next()
        await done
        for conn in conns:
            statuses.update(conn.statuses)
            conn.protocol.connection_lost(None)

    async with app.router.lifespan_context(app):
        for _ in range(6000):
            if app.state.core.ready:
                break
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("the app did not become ready")
        await run(500)
        t0 = time.process_time()
        await run(requests)
        cpu = time.process_time() - t0
    if statuses != {200}:
        raise RuntimeError(f"unexpected statuses {sorted(statuses)}")
    return cpu / requests * 1e6


def _child(source: Path, model_repository: Path, requests: int, concurrency: int, http: bool) -> None:
    sys.path.insert(0, str(source))
    from bench.models import find_model, real_digits  # this checkout's bench: the same bodies as mnist-bench's
    from bench.workloads import single_json

    bodies = single_json(real_digits(64, find_model(model_repository))).bodies
    measure = _measure_http if http else _measure
    print(json.dumps({"us_per_request": asyncio.run(measure(model_repository, requests, bodies, concurrency))}))


def _commit(source: Path) -> str:
    out = subprocess.run(["git", "-C", str(source), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, action="append", help="Checkout to measure (repeatable; default .).")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "models")
    parser.add_argument("--requests", type=int, default=4000, help="Measured requests per round (default 4000).")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="Clients at once (default 1: one request at a time; 64: requests batch as under load).")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5, help="Rounds per checkout; the best is kept (default 5).")
    parser.add_argument("--http", action="store_true",
                        help="Through the server's HTTP layer too (uvicorn's protocol, the guards, the in-flight limit).")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sources = [s.resolve() for s in (args.source or [ROOT])]
    if args.child:
        _child(sources[0], args.model_repository.resolve(), args.requests, args.concurrency, args.http)
        return 0
    rounds: list[list[float]] = [[] for _ in sources]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for r in range(args.rounds):
        for s, taken in zip(sources, rounds, strict=True):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--source", str(s), "--requests",
                   str(args.requests), "--concurrency", str(args.concurrency),
                   "--model-repository", str(args.model_repository.resolve()), *(["--http"] if args.http else [])]  # fmt: skip
            out = subprocess.run(cmd, cwd=s, capture_output=True, text=True, check=True)
            us = json.loads(out.stdout.strip().splitlines()[-1])["us_per_request"]
            taken.append(us)
            print(f"round {r + 1}: {s.name or s} {us:.1f} us/request", flush=True)
    result: dict[str, Any] = {
        "command": "python -m bench.inprocess " + " ".join(sys.argv[1:] if argv is None else argv),
        "started_utc": started,
        "requests_per_round": args.requests,
        "http": args.http,
        "concurrency": args.concurrency,
        "sources": [
            {
                "path": str(s),
                "commit": _commit(s),
                "rounds_us_per_request": taken,
                "best_us_per_request": min(taken),
            }
            for s, taken in zip(sources, rounds, strict=True)
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "inprocess" + ("-http" if args.http else "") + ("" if args.concurrency == 1 else f"-c{args.concurrency}")
    name += ".json"
    (args.out / name).write_text(json.dumps(result, indent=1))
    for entry in result["sources"]:
        print(f"{entry['commit']} ({entry['path']}): best {entry['best_us_per_request']:.1f} us of CPU per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
