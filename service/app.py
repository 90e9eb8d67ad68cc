"""``create_app(settings)``: the FastAPI app, its lifespan, and one ASGI middleware for ids, metrics and logs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from service.batcher import Batcher
from service.errors import ServiceError
from service.logs import AccessLog
from service.metrics import ROUTES, Metrics
from service.quality import Quality
from service.registry import ModelRegistry
from service.settings import Settings

log = logging.getLogger("service")


@dataclass(slots=True)
class _RouteSeries:
    in_progress: Any
    duration: Any
    requests: Any
    route: str
    by_status: dict[tuple[str, int], Any]

    def count(self, method: str, status: int) -> None:
        child = self.by_status.get((method, status))
        if child is None:
            child = self.by_status[(method, status)] = self.requests.labels(self.route, method, str(status))
        child.inc()


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
    access_log: AccessLog | None = field(default=None)
    _series: dict[str, _RouteSeries] = field(default_factory=dict)

    def http_series(self, route: str) -> _RouteSeries:
        """The route's metric children, resolved once (``labels()`` costs a lock and a tuple per call)."""
        series = self._series.get(route)
        if series is None:
            m = self.metrics
            series = self._series[route] = _RouteSeries(
                m.http_in_progress.labels(route), m.http_duration.labels(route), m.http_requests, route, {}
            )
        return series

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
# Request ids: a random per-process prefix plus a counter (unique across replicas, 10x cheaper than uuid4).
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count()
_SAFE_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


#: A hot-path handler: takes the request, returns the response, raises ServiceError for a 4xx/5xx.
FastHandler = Callable[[Request], Awaitable[Response]]


class ServiceApp(FastAPI):
    """FastAPI with one outer pure-ASGI layer (no BaseHTTPMiddleware): request id, ``Connection: close``
    while draining, HTTP metrics, the JSON access log, and a last-resort 500 that never leaks internals.

    The layer also dispatches the hot POST routes in ``fast_routes`` straight to their handlers, skipping
    FastAPI's router, dependency solving and inner middleware (measured in docs/performance.md). They are
    still declared as FastAPI routes, so /docs and the OpenAPI schema describe them as usual.
    """

    fast_routes: dict[str, FastHandler]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
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
            rid = f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"
        scope.setdefault("state", {})["request_id"] = rid
        svc: ServiceState | None = getattr(self.state, "svc", None)
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

        series = svc.http_series(route) if svc is not None else None
        if series is not None:
            series.in_progress.inc()
        try:
            handler = self.fast_routes.get(scope["path"]) if scope["method"] == "POST" else None
            if handler is None:
                await super().__call__(scope, receive, send_wrapper)
            else:
                scope["app"] = self
                try:
                    response = await handler(Request(scope, receive))
                except ServiceError as exc:
                    response = error_json(exc.status_code, exc.code, exc.message, rid, exc.headers)
                await response(scope, receive, send_wrapper)
        except Exception as exc:
            error_id = uuid.uuid4().hex[:12]
            log.error("unhandled error", extra={"request_id": rid, "error_id": error_id}, exc_info=exc)
            status = 500
            if not started:
                response = error_json(500, "internal_error", f"internal error (error id {error_id})", rid)
                await response(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            if series is not None:
                series.in_progress.dec()
                series.count(scope["method"], status)
                series.duration.observe(elapsed)
            if svc is not None and svc.access_log is not None:
                client = scope.get("client")
                svc.access_log.write(
                    rid, scope["method"], scope["path"], status, elapsed, client[0] if client else None
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
            sizes = await asyncio.to_thread(model.warm_up, svc.settings.largest_batch)
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
            bulk_chunk_images=settings.bulk_chunk_images,
            max_bulk_queue_images=settings.max_bulk_queue_images,
            pipeline_depth=settings.pipeline_depth,
        )
        svc = ServiceState(settings, reg, metrics, quality, batcher)
        svc.access_log = AccessLog() if settings.access_log else None
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
            if svc.access_log is not None:
                svc.access_log.flush()
            log.info("stopped")

    from service import admin, demo, oip, routes  # local import: routes import this module's helpers

    app = ServiceApp(
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
    app.include_router(oip.router)
    app.include_router(admin.router)
    app.include_router(demo.router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    # CORS headers come from CORSMiddleware inside FastAPI: with CORS on, every route goes through it.
    fast: dict[str, FastHandler] = {"/v1/predict": routes.predict, "/v1/predict/batch": routes.predict_batch}
    app.fast_routes = {} if settings.cors_origins else fast
    return app


def state_of(request: Request) -> ServiceState:
    svc: Any = request.app.state.svc
    return svc  # type: ignore[no-any-return]
