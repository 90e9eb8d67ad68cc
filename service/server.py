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
import logging
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.types import ASGIApp

from service import logs
from service.app import ServiceState, create_app
from service.errors import ModelLoadError
from service.guards import HttpLimits, InflightLimit, guarded_protocol
from service.registry import ModelRegistry
from service.settings import Settings, settings_from_args

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
        body_timeout_s=settings.body_timeout_s + 1.0,  # a backstop: read_body answers 400 body_timeout first
    )
    asgi: ASGIApp = app
    if settings.max_inflight_requests > 0:
        asgi = InflightLimit(app, settings.max_inflight_requests, on_refuse=_count_refusal(app))
    return uvicorn.Config(
        asgi,
        host=settings.host,
        port=settings.port,
        loop=settings.event_loop,
        http=guarded_protocol(limits),
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_keep_alive=settings.timeout_keep_alive_s,
        timeout_graceful_shutdown=max(int(settings.drain_timeout_s), 1),
        server_header=False,
        proxy_headers=False,  # no X-Forwarded-* rewriting on the hot path; the access log shows the peer
    )


def run(settings: Settings) -> int:
    try:
        registry = ModelRegistry.load(settings)
    except ModelLoadError as exc:
        log.error("cannot start: %s", exc)
        print(f"mnist-serve: error: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, registry)
    server = DrainingServer(build_config(settings, app), app, settings.drain_timeout_s)
    server.run()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        print(f"mnist-serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
