"""``create_app(settings)``: the FastAPI app, its lifespan, and one ASGI middleware for ids, metrics and logs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batcher import Batcher
from service.errors import ServiceError
from service.metrics import ROUTES, Metrics
from service.quality import Quality
from service.registry import ModelRegistry
from service.settings import Settings

log = logging.getLogger("service")
access_log = logging.getLogger("service.access")


@dataclass
class ServiceState:
    """Everything a request needs, built by the lifespan; reached through ``app.state.svc``."""

    settings: Settings
    registry: ModelRegistry
    metrics: Metrics
    quality: Quality
    batcher: Batcher
    ready: bool = False
    draining: bool = False
    warmup: asyncio.Task[None] | None = field(default=None)

    def begin_drain(self) -> None:
        """Readiness goes 503 first; responses then carry ``Connection: close``; new work is refused."""
        if not self.draining:
            self.draining = True
            self.ready = False
            self.metrics.ready.set(0)
            log.info("draining: readiness is now 503 and new work is refused")


def error_json(
    status: int, code: str, message: str, request_id: str | None, headers: dict[str, str] | None = None
) -> Response:
    body = orjson.dumps({"error": {"code": code, "message": message, "request_id": request_id}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def request_id_of(scope: Scope) -> str | None:
    state = scope.get("state")
    return state.get("request_id") if state else None


def route_label(path: str) -> str:
    if path in _STATIC_ROUTES:
        return path
    if path.startswith("/v2"):
        if path.endswith("/infer"):
            return "/v2/infer"
        return "/v2/health" if "/health" in path or path.endswith("/ready") else "/v2/metadata"
    if path.startswith("/admin"):
        return "/admin"
    if path.startswith(("/static", "/docs", "/openapi", "/redoc")):
        return "/"
    return "other"


_STATIC_ROUTES = frozenset(r for r in ROUTES if not r.startswith("/v2") and r not in ("/admin", "other"))
_SAFE_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


class Observability:
    """Pure ASGI middleware (no BaseHTTPMiddleware overhead): request id, Connection: close while draining,
    HTTP metrics, the JSON access log, and a last-resort 500 that never leaks internals."""

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                candidate = value.decode("latin-1")
                if 0 < len(candidate) <= 128 and set(candidate) <= _SAFE_ID:
                    rid = candidate
                break
        if rid is None:
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        svc: ServiceState | None = getattr(self.fastapi_app.state, "svc", None)
        route = route_label(scope["path"])
        status = 500
        started = False
        rid_header = (b"x-request-id", rid.encode())

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = list(message.get("headers", ()))
                headers.append(rid_header)
                if svc is not None and svc.draining:
                    headers.append((b"connection", b"close"))
                message["headers"] = headers
            await send(message)

        metrics = svc.metrics if svc is not None else None
        if metrics is not None:
            metrics.http_in_progress.labels(route).inc()
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            error_id = uuid.uuid4().hex[:12]
            log.error("unhandled error", extra={"request_id": rid, "error_id": error_id}, exc_info=exc)
            status = 500
            if not started:
                response = error_json(500, "internal_error", f"internal error (error id {error_id})", rid)
                await response(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            if metrics is not None:
                metrics.http_in_progress.labels(route).dec()
                metrics.http_requests.labels(route, scope["method"], str(status)).inc()
                metrics.http_duration.labels(route).observe(elapsed)
            if svc is not None and svc.settings.access_log:
                access_log.info(
                    "request",
                    extra={
                        "request_id": rid,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                        "client": scope["client"][0] if scope.get("client") else None,
                    },
                )


def _install_error_handlers(app: FastAPI) -> None:
    async def service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return error_json(exc.status_code, exc.code, exc.message, request_id_of(request.scope), exc.headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
        return error_json(422, "validation_error", "; ".join(parts), request_id_of(request.scope))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_json(exc.status_code, code, str(exc.detail), request_id_of(request.scope), dict(exc.headers or {}))

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


async def _warm_up(svc: ServiceState) -> None:
    try:
        for model in svc.registry.models:
            sizes = await asyncio.to_thread(model.warm_up, svc.settings.max_batch_size)
            log.info("warmed up", extra={"model": model.name, "version": model.version, "batch_sizes": sizes})
    except Exception:
        log.exception("warm-up failed; the service stays not ready")
        return
    if not svc.draining:
        svc.ready = True
        svc.metrics.ready.set(1)
        log.info("ready", extra={"model": svc.registry.name, "version": svc.registry.default.version})


def create_app(settings: Settings, registry: ModelRegistry | None = None) -> FastAPI:
    """Build the app. ``registry`` may be pre-loaded (the CLI does, to fail fast); else the lifespan loads it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reg = registry if registry is not None else await asyncio.to_thread(ModelRegistry.load, settings)
        metrics = Metrics()
        quality = Quality(reg.default.n_classes, settings.drift_window, settings.feedback_window)
        quality.set_reference(reg.default.reference)
        metrics.registry.register(quality)
        metrics.set_models(reg.models, reg.default)
        batcher = Batcher(
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue_images=settings.max_queue_images,
            request_timeout_s=settings.request_timeout_s,
            metrics=metrics,
            observer=quality.record_batch,
        )
        svc = ServiceState(settings, reg, metrics, quality, batcher)
        app.state.svc = svc
        batcher.start()
        log.info(
            "model loaded",
            extra={"model": reg.name, "version": reg.default.version, "provider": reg.default.provider,
                   "sha256": reg.default.sha256},
        )  # fmt: skip
        svc.warmup = asyncio.create_task(_warm_up(svc))
        try:
            yield
        finally:
            svc.begin_drain()
            if svc.warmup is not None:
                svc.warmup.cancel()
            finished = await batcher.drain(settings.drain_timeout_s)
            if not finished:
                log.warning("drain timed out with work still queued")
            await batcher.stop()
            log.info("stopped")

    from service import routes  # local import: routes import this module's helpers

    app = FastAPI(
        title="MNIST digit classifier",
        version="1.0.0",
        description=(
            "Classifies 28x28 handwritten digits with an ONNX model. Concurrent requests are batched into "
            'one ONNX Runtime call. Every error is `{"error": {"code", "message", "request_id"}}`.'
        ),
        lifespan=lifespan,
    )
    _install_error_handlers(app)
    app.include_router(routes.router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    app.add_middleware(Observability, fastapi_app=app)
    return app


def state_of(request: Request) -> ServiceState:
    svc: Any = request.app.state.svc
    return svc  # type: ignore[no-any-return]
