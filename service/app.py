"""``create_app(settings)``: the composition root. Builds the parts, mounts the transports, owns the lifespan.

Request path: the connection guards (service/guards.py) -> ``Edge`` (ids, metrics, access log; dispatches the hot
routes straight to their pure-ASGI handlers) -> the transports (service/rest.py, service/oip.py, admin, demo)
-> the inference core (service/inference.py) -> the batcher and the ONNX model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service import admin, demo, oip, rest
from service.asgi import Edge, request_id
from service.docs_assets import install_docs
from service.errors import ServiceError, error_json
from service.inference import Core
from service.registry import ModelRegistry
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("service")

DESCRIPTION = (
    "Classifies 28x28 handwritten digits with an ONNX model. Concurrent requests are batched into one ONNX "
    'Runtime call. Every error is `{"error": {"code", "message", "request_id"}}` (the `/v2` routes use the Open '
    'Inference Protocol\'s `{"error": "message"}`).'
)


def _json_error(status: int, code: str, message: str, scope: Scope, headers: dict[str, str] | None = None) -> Response:
    return Response(error_json(code, message, request_id(scope)), status_code=status, media_type="application/json",
                    headers=headers)  # fmt: skip


def _install_error_handlers(app: FastAPI) -> None:
    """The cold routes (FastAPI's router) answer in the same error shape as the hot ones."""

    async def service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return _json_error(exc.status_code, exc.code, exc.message, request.scope, exc.headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
        return _json_error(422, "validation_error", "; ".join(parts), request.scope)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _json_error(exc.status_code, code, str(exc.detail), request.scope, dict(exc.headers or {}))

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


class ServiceApp(FastAPI):
    """FastAPI for the cold routes and /docs, behind the edge (and CORS when configured)."""

    outer: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await super().__call__(scope, receive, send)
        else:
            await self.outer(scope, receive, send)

    async def inner(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)


class _Live:
    """The running parts of one app, set by its lifespan."""

    __slots__ = ("core", "state")

    def __init__(self) -> None:
        self.core: Core | None = None
        self.state: ServiceState | None = None


def create_app(settings: Settings, registry: ModelRegistry | None = None) -> ServiceApp:
    """Build the app. ``registry`` may be pre-loaded (the CLI does, to fail fast); else the lifespan loads it."""

    live = _Live()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reg = registry if registry is not None else await asyncio.to_thread(ModelRegistry.load, settings)
        state = ServiceState.build(settings, reg)
        core = Core(state)
        state.metrics.inline_max.set_function(lambda: state.batcher.inline_max_s)
        app.state.svc = state
        app.state.core = core
        live.state, live.core = state, core  # what the hot path reads (a plain attribute, not Starlette's State)
        state.batcher.start()
        default = reg.default
        log.info("model loaded", extra={"model": reg.name, "version": default.version, "provider": default.provider,
                                        "sha256": default.sha256})  # fmt: skip
        state.warmup = asyncio.create_task(core.warm_up())
        grpc_server = None
        grpc_drain: list[asyncio.Task[None]] = []
        if settings.grpc_port:  # imported only when enabled: grpcio costs memory a REST-only process does not need
            from service.grpc_server import start_grpc

            grpc_server = await start_grpc(core)
            # gRPC drains alongside HTTP (from the SIGTERM), not after it: one grace period for both.
            state.on_drain.append(
                lambda: grpc_drain.append(asyncio.ensure_future(grpc_server.drain(settings.drain_timeout_s)))
            )
        try:
            yield
        finally:
            state.begin_drain()
            state.warmup.cancel()
            if grpc_server is not None:  # RPCs in flight finish before the batcher stops
                await asyncio.gather(*grpc_drain)
            if not await state.batcher.drain(settings.drain_timeout_s):
                log.warning("drain timed out with work still queued")
            await state.batcher.stop()
            core.close()
            if state.access_log is not None:
                state.access_log.flush()
            log.info("stopped")

    app = ServiceApp(title="MNIST digit classifier", version="1.0.0", description=DESCRIPTION, lifespan=lifespan,
                     docs_url=None, redoc_url=None, redirect_slashes=False)  # fmt: skip
    _install_error_handlers(app)

    def core() -> Core:
        assert live.core is not None, "the lifespan has not started"
        return live.core

    def state() -> ServiceState | None:
        return live.state

    v1 = rest.Rest(core)
    v2 = oip.Oip(core)
    app.include_router(rest.router(v1))
    app.include_router(oip.router(v2))
    app.include_router(admin.router)
    app.include_router(demo.router)
    install_docs(app)
    outer: ASGIApp = Edge(app.inner, state, v1.apps(), v2.app())
    if settings.cors_origins:
        outer = CORSMiddleware(outer, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                               allow_headers=["*"])  # fmt: skip
    app.outer = outer
    return app
