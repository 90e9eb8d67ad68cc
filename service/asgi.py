"""Pure ASGI plumbing: headers, bodies and replies for the hot routes, and the edge every request crosses.

The hot routes are plain ``(scope, receive) -> Reply`` coroutines: no Starlette ``Request``/``Response``
objects, no dependency solving. ``endpoint`` turns one into an ASGI app that answers errors in the route's wire
shape; ``documented`` mounts it on a FastAPI router under a declaration that only feeds /docs. ``Edge`` is the
outermost layer: request id, ``Connection: close`` while draining, HTTP metrics, the access log, a last-resort
500 that never leaks internals, and a dispatch table that sends the hot routes past FastAPI's router.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ClientDisconnected, MalformedBody, PayloadTooLarge, ServiceError, error_json, oip_error_json
from service.metrics import route_label

if TYPE_CHECKING:
    from service.state import ServiceState

log = logging.getLogger("service")

Headers = list[tuple[bytes, bytes]]
#: status, body, headers (content-type included; content-length is added by ``endpoint``).
Reply = tuple[int, bytes, Headers]
Handler = Callable[[Scope, Receive], Awaitable[Reply]]
JSON = b"application/json"
_ID_PREFIX = uuid.uuid4().hex[:16]  # request ids: a per-process prefix plus a counter (correlation only)
_ID_COUNTER = itertools.count()
_SAFE_ID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


# ---------------------------------------------------------------------------------------------- requests
def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def header_values(scope: Scope, names: tuple[bytes, ...]) -> list[str | None]:
    """The first value of each of ``names`` (lower case), in one pass over the request's headers."""
    found: list[str | None] = [None] * len(names)
    for key, value in scope["headers"]:
        if key in names and found[i := names.index(key)] is None:
            found[i] = value.decode("latin-1")
    return found


def request_id(scope: Scope) -> str | None:
    state = scope.get("state")
    return state.get("request_id") if state else None


def client(scope: Scope) -> str:
    peer = scope.get("client")
    return str(peer[0]) if peer else "unknown"


def decimal(value: str, what: str) -> int:
    """A header that must be a plain non-negative ASCII integer (``str.isdigit`` accepts '²'; int() does not)."""
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise MalformedBody(f"invalid {what} header {value[:32]!r}", code="invalid_header")
    return int(text)


async def read_body(scope: Scope, receive: Receive, limit: int, declared: str | None) -> bytes:
    """The whole body, refusing a ``declared`` (the ``Content-Length`` header) or actual size over ``limit`` (413)
    before reading further.

    A body in several chunks with a declared ``Content-Length`` is copied once, into a buffer of that size (the
    parser delivers exactly that many bytes); a chunked one is joined at the end. A body that trickles in is
    answered by the connection guard (400 ``body_timeout``, service/guards.py).
    """
    length = None if declared is None else decimal(declared, "Content-Length")
    if length is not None and length > limit:
        raise PayloadTooLarge(f"the body is {length} bytes; the limit is {limit}")
    message = await receive()
    body: bytes = message.get("body", b"")
    if message["type"] == "http.disconnect":
        raise ClientDisconnected("the client disconnected while sending its body")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
        return body
    if length is not None:
        return await _read_into(bytearray(length), body, receive)
    chunks, size = [body], len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected while sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_into(buffer: bytearray, first: bytes, receive: Receive) -> bytes:
    """The rest of a body of declared size into ``buffer``: one copy of each chunk, no join."""
    view, pos, chunk, more = memoryview(buffer), 0, first, True
    while True:
        if pos + len(chunk) > len(buffer):  # the parser keeps to Content-Length; never trust it blindly
            raise MalformedBody("the body is longer than its Content-Length", code="invalid_header")
        view[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
        if not more:
            break
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected while sending its body")
        chunk, more = message.get("body", b""), message.get("more_body", False)
    view.release()
    if pos != len(buffer):
        raise ClientDisconnected("the body ended before its Content-Length")
    return buffer  # type: ignore[return-value]  # bytes-like: every decoder reads it through the buffer protocol


def gone_probe(receive: Receive) -> Callable[[], bool] | None:
    """A cheap "has the client hung up?" for the batcher: uvicorn's request cycle keeps a ``disconnected``
    flag once the body is read (the in-flight guard passes it on as ``receive.connection``)."""
    cycle = getattr(receive, "__self__", None) or getattr(receive, "connection", None)
    if cycle is not None and isinstance(getattr(cycle, "disconnected", None), bool):
        return lambda: bool(cycle.disconnected)
    return None


# ---------------------------------------------------------------------------------------------- replies
def json_reply(body: bytes, headers: Headers | None = None, status: int = 200) -> Reply:
    return status, body, [(b"content-type", JSON), *(headers or ())]


def error_reply(exc: ServiceError, scope: Scope, oip: bool = False) -> Reply:
    """The reply for a ServiceError: the service's error JSON, or the Open Inference Protocol's."""
    body = oip_error_json(exc.message) if oip else error_json(exc.code, exc.message, request_id(scope))
    headers = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    if exc.status_code == 413:  # the rest of the body is not read: the connection cannot be reused
        headers.append((b"connection", b"close"))
    return json_reply(body, headers, exc.status_code)


async def send_reply(send: Send, reply: Reply) -> None:
    status, body, headers = reply
    headers.append((b"content-length", b"%d" % len(body)))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Endpoint:
    """A hot-route handler as an ASGI app; its ServiceErrors are answered in the route's error shape. The edge
    awaits ``handler`` and sends the reply itself: no wrapper around ``send``, no extra coroutine level."""

    __slots__ = ("handler", "oip")

    def __init__(self, handler: Handler, oip: bool) -> None:
        self.handler, self.oip = handler, oip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            reply = await self.handler(scope, receive)
        except ServiceError as exc:
            reply = error_reply(exc, scope, self.oip)
        await send_reply(send, reply)


def endpoint(handler: Handler, *, oip: bool = False) -> Endpoint:
    return Endpoint(handler, oip)


def documented(router: APIRouter, path: str, app: ASGIApp, doc: Callable[..., Any], methods: list[str],
               **openapi: Any) -> None:  # fmt: skip
    """Mount ``app`` at ``path`` on ``router``, declared by ``doc`` (a signature for /docs, never called)."""
    router.add_api_route(path, doc, methods=methods, **openapi)
    router.routes[-1].app = app  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- the edge
class Edge:
    """Outermost ASGI layer of the app (inside the connection guards)."""

    def __init__(self, app: ASGIApp, state: Callable[[], ServiceState | None],
                 fast: dict[tuple[str, str], ASGIApp], infer: ASGIApp | None = None) -> None:  # fmt: skip
        self.app = app
        self.state = state
        self.fast = fast  # (method, path) -> app, matched exactly
        self.infer = infer  # POST /v2/models/{name}[/versions/{v}]/infer

    def _dispatch(self, scope: Scope) -> ASGIApp:
        method, path = scope["method"], scope["path"]
        app = self.fast.get((method, path))
        if app is not None:
            return app
        if self.infer is not None and method == "POST" and path.startswith("/v2/models/") and path.endswith("/infer"):
            parts = path.split("/")  # '', v2, models, name, [versions, v,] infer
            if len(parts) == 5 or (len(parts) == 7 and parts[4] == "versions"):
                scope["path_params"] = {"name": parts[3], **({"version": parts[5]} if len(parts) == 7 else {})}
                return self.infer
        return self.app

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
            rid = f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"
        scope.setdefault("state", {})["request_id"] = rid
        svc = self.state()
        status = 500
        started = False
        extra = [(b"x-request-id", rid.encode())]
        if svc is not None and svc.draining:
            extra.append((b"connection", b"close"))
        stats = svc.metrics.stats.route(route_label(scope["path"])) if svc is not None else None
        if stats is not None:
            stats.in_progress += 1
        app = self._dispatch(scope)
        try:
            if type(app) is Endpoint:  # a hot route: its reply is sent from here, no wrapper around ``send``
                try:
                    status, body, headers = await app.handler(scope, receive)
                except ServiceError as exc:
                    status, body, headers = error_reply(exc, scope, app.oip)
                started = True
                headers += extra
                respond = getattr(getattr(send, "__self__", None), "respond", None)  # the guarded server's cycle
                if respond is None or not respond(status, headers, body):
                    await send_reply(send, (status, body, headers))
            else:

                async def send_wrapper(message: Message) -> None:
                    nonlocal status, started
                    if message["type"] == "http.response.start":
                        started = True
                        status = message["status"]
                        message["headers"] = [*message.get("headers", ()), *extra]
                    await send(message)

                await app(scope, receive, send_wrapper)
        except Exception as exc:
            error_id = uuid.uuid4().hex[:12]
            log.error("unhandled error", extra={"request_id": rid, "error_id": error_id}, exc_info=exc)
            status = 500
            if not started:
                status, body, headers = json_reply(
                    error_json("internal_error", f"internal error (error id {error_id})", rid), status=500
                )
                await send_reply(send, (status, body, headers + extra))
        finally:
            elapsed = time.perf_counter() - start
            if stats is not None and svc is not None:
                svc.metrics.stats.finished(stats, scope["method"], status, elapsed)
            if svc is not None and svc.access_log is not None:
                svc.access_log.write(rid, scope["method"], scope["path"], status, elapsed, client(scope))
