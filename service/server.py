"""``mnist-serve``: load and check the model, then run uvicorn with a graceful, keep-alive-safe drain.

SIGTERM (or SIGINT) starts the drain instead of uvicorn's immediate shutdown:
1. readiness goes 503, the listening socket closes (new connections are refused), every response
   now carries ``Connection: close`` and new work on open connections is answered 503 ``draining``;
2. queued and running batches finish; each client connection closes after the response that told it to
   (so no request a client is sending on a kept-alive connection is reset);
3. when no connection is left, or after ``drain_timeout_s``, uvicorn shuts down and the process exits 0.
A second signal forces the exit.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service import logs
from service.app import ServiceApp, create_app
from service.errors import ModelLoadError
from service.guards import guarded_protocol
from service.inflight import InflightLimit, limit_malloc_arenas
from service.registry import ModelRegistry
from service.settings import InvalidSettings, Settings, settings_from_args
from service.state import ServiceState
from service.wire import HttpLimits

log = logging.getLogger("service.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_timeout_s = drain_timeout_s
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)  # type: ignore[arg-type]
        if self.servers:
            ports = sorted({s.getsockname()[1] for srv in self.servers for s in srv.sockets})
            log.info("listening", extra={"host": self.config.host, "ports": ports})

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it at exit and the exit code would be 143.
        if self._drain_task is not None or self._loop is None:
            self.force_exit = self._drain_task is not None
            self.should_exit = True
            return
        log.info("signal received, draining", extra={"signal": signal.Signals(sig).name})
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        svc: ServiceState | None = getattr(self._app.state, "svc", None)
        if svc is not None:
            svc.begin_drain()
        for server in self.servers:
            server.close()  # refuse new connections; open ones are answered, then closed
        deadline = time.monotonic() + self._drain_timeout_s
        while self.server_state.connections and time.monotonic() < deadline:  # noqa: ASYNC110 (uvicorn has no event for it)
            await asyncio.sleep(0.05)
        if self.server_state.connections:
            log.warning("drain timeout: closing the remaining connections",
                        extra={"connections": len(self.server_state.connections)})  # fmt: skip
        self.should_exit = True


def _count_refusal(app: FastAPI) -> Callable[[], None]:
    def count() -> None:
        svc: ServiceState | None = getattr(app.state, "svc", None)
        counter = svc.metrics.dropped.get("too_many_requests") if svc is not None else None
        if counter is not None:
            counter.inc()

    return count


def build_config(settings: Settings, app: FastAPI) -> uvicorn.Config:
    """uvicorn settings: uvloop + httptools with the guards of service/guards.py, and the in-flight limit."""
    limits = HttpLimits(
        max_header_bytes=settings.max_header_bytes,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,  # the protocol answers 400 body_timeout, whatever the route
        max_body_bytes=settings.max_body_bytes,
        refusal_delay_s=settings.refusal_delay_s,
        hold_body_bytes=settings.body_hold_bytes,
    )
    inflight = InflightLimit(  # a request limit of 0 means none; the body budget always applies
        app,
        settings.max_inflight_requests,
        on_refuse=_count_refusal(app),
        max_body_bytes=settings.max_body_bytes,
        max_body_bytes_in_flight=settings.max_inflight_body_bytes,
        http=app.outer if isinstance(app, ServiceApp) else None,  # the edge at once, past FastAPI's __call__
    )
    return uvicorn.Config(
        inflight,
        host=settings.host,
        port=settings.port,
        loop=settings.event_loop,
        http=guarded_protocol(limits, inflight),  # refusals from the headers, before any ASGI task
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_keep_alive=settings.timeout_keep_alive_s,
        timeout_graceful_shutdown=max(int(settings.drain_timeout_s), 1),
        server_header=False,
        proxy_headers=False,  # no X-Forwarded-* rewriting on the hot path; the access log shows the peer
        ws="none",  # no WebSocket routes: an upgrade request is an ordinary HTTP request, whatever is installed
    )


#: Exit codes: 0 after a drain, 2 for unusable settings or model (nothing started), 3 when the server cannot
#: listen (the port is taken, the address is not this machine's, ...) or its start-up failed.
EXIT_CONFIG = 2
EXIT_START = 3


def _fail(message: str, code: int) -> int:
    log.error("cannot start: %s", message)
    print(f"mnist-serve: error: {message}", file=sys.stderr)
    return code


def listen_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (None if it can), checked by binding it as uvicorn will.

    Done before the model is loaded, so a taken port is reported at once and in words; the socket is closed
    again at once (uvicorn binds it itself; a port taken in between still fails, with uvicorn's log line)."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve the host {host!r} ({exc.strerror}); check --host / MNIST_HOST"
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does: TIME_WAIT is fine
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"port {port} is in use; stop what listens there or pick another with --port / MNIST_PORT"
                if exc.errno == errno.EACCES:
                    return f"no permission to listen on port {port} (ports below 1024 need privileges); use --port"
                if exc.errno == errno.EADDRNOTAVAIL:
                    return f"cannot listen on {host}: not an address of this machine; check --host / MNIST_HOST"
                return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


def run(settings: Settings) -> int:
    repository = settings.model_repository
    if not repository.is_dir():
        return _fail(
            f"model repository {repository} does not exist (looked in {repository.resolve()}); pass "
            "--model-repository PATH or set MNIST_MODEL_REPOSITORY to a folder of <name>/<version>/model.onnx",
            EXIT_CONFIG,
        )
    problem = listen_problem(settings.host, settings.port)
    if problem is not None:
        return _fail(problem, EXIT_START)
    limit_malloc_arenas()  # before any engine or worker thread allocates: bounds the heap's peak under load
    try:
        registry = ModelRegistry.load(settings)
    except ModelLoadError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    app = create_app(settings, registry)
    server = DrainingServer(build_config(settings, app), app, settings.drain_timeout_s)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits 3 when binding or the lifespan start-up fails; its log says why
        if server.started:
            raise
        return _fail(
            f"the server could not start on {settings.host}:{settings.port} (the JSON log above says why)",
            exc.code if isinstance(exc.code, int) and exc.code else EXIT_START,
        )
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
    except InvalidSettings as exc:
        for problem in exc.problems:
            print(f"mnist-serve: error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(settings.log_level)
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
