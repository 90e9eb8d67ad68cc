"""HTTP-level guards uvicorn lacks: a header size cap, a header timeout and a request-read timeout.

uvicorn's httptools protocol (0.54) sets no limit on the size of the request headers (one client streaming an
endless header grows the process by as much as it sends) and no timer before the first response (a
connection that sends nothing, or a header a byte a second, is held forever). ``guarded_protocol`` returns a
subclass that closes both holes and answers in the service's JSON error shape:

- 431 ``headers_too_large`` when the request line plus headers exceed ``max_header_bytes``;
- 408 ``header_timeout`` when a connection has not sent complete headers ``header_timeout_s`` after it
  opened (or after its previous request began);
- a connection whose body has not fully arrived ``body_timeout_s`` after its headers is closed (the routes
  that read bodies answer 400 ``body_timeout`` before this backstop fires).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("service.guards")


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 32 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 11.0


class _HeadersTooLarge(Exception):
    """Raised inside a parser callback: httptools turns it into HttpParserCallbackError."""


def error_response(status: int, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 response in the service's error shape, closing the connection."""
    body = orjson.dumps({"error": {"code": code, "message": message, "request_id": None}})
    head = (
        b"content-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nconnection: close\r\n\r\n"
    )
    return STATUS_LINE[status] + head + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    limits: ClassVar[HttpLimits] = HttpLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0
        self._headers_too_large = False
        self._read_timer: asyncio.TimerHandle | None = None
        self._arm(self.limits.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # -------------------------------------------------------------- timers
    def _arm(self, delay_s: float, callback: Any) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(delay_s, callback)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _header_timeout(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        limit = self.limits.header_timeout_s
        log.info("closing a connection that sent no complete request headers in time",
                 extra={"client": self.client and self.client[0], "timeout_s": limit})  # fmt: skip
        if self.cycle is None or self.cycle.response_complete:  # never interleave with a response being sent
            self.transport.write(
                error_response(408, "header_timeout", f"request headers must arrive within {limit:g} s")
            )
        self.transport.close()

    def _body_timeout(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            log.info("closing a connection whose request body did not arrive in time",
                     extra={"client": self.client and self.client[0], "timeout_s": self.limits.body_timeout_s})  # fmt: skip
            self.transport.close()

    # -------------------------------------------------------------- parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        if self._read_timer is None:  # a request on a kept-alive connection: its headers get the same time
            self._arm(self.limits.header_timeout_s, self._header_timeout)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.limits.max_header_bytes:
            self._headers_too_large = True
            raise _HeadersTooLarge

    def on_headers_complete(self) -> None:
        self._arm(self.limits.body_timeout_s, self._body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this for any parser error; answer in the service's JSON shape (431 when ours)."""
        self._disarm()
        if self.transport.is_closing():
            return
        if self._headers_too_large:
            log.info("refusing oversized request headers", extra={"client": self.client and self.client[0]})
            limit = self.limits.max_header_bytes
            data = error_response(431, "headers_too_large", f"request line and headers exceed {limit} bytes")
        else:
            data = error_response(400, "malformed_http", "the request is not valid HTTP/1.1")
        self.transport.write(data)
        self.transport.close()


def guarded_protocol(limits: HttpLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``, bound to ``limits``."""

    class Bound(GuardedHttpToolsProtocol):
        pass

    Bound.limits = limits
    return Bound


def is_inference(scope: Scope) -> bool:
    path: str = scope["path"]
    return scope["method"] == "POST" and (path.startswith("/v1/predict") or path.endswith("/infer"))


class InflightLimit:
    """Pure ASGI, outermost: at most ``limit`` inference requests are processed at once; beyond it, 503 at once.

    A request counts from the moment its body has fully arrived (the app's ``receive`` returns the last
    chunk) until its response ends, so slow uploaders hold no slot (the body timeout bounds them). The
    check happens when the request starts, before any routing or decoding, and the refusal is a prebuilt
    response: under overload a refusal must cost far less than the work it sheds, or the refusals alone
    fill the CPU (measured in docs/reliability.md). The refusal closes the connection: a client retrying at
    once must reconnect (which slows a retry storm), and behind an L4 balancer (a Kubernetes Service) the new
    connection may land on another replica. Health, readiness, metrics and metadata are never limited, so
    probes keep working under overload.
    """

    def __init__(self, app: ASGIApp, limit: int, on_refuse: Callable[[], None] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.processing = 0
        self.on_refuse = on_refuse
        self._body = orjson.dumps(
            {"error": {"code": "too_many_requests", "request_id": None,
                       "message": f"{limit} inference requests are already in progress; retry later"}}
        )  # fmt: skip
        self._headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self._body)).encode()),
            (b"retry-after", b"1"),
            (b"connection", b"close"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_inference(scope):
            await self.app(scope, receive, send)
            return
        if self.processing >= self.limit:
            if self.on_refuse is not None:
                self.on_refuse()
            await send({"type": "http.response.start", "status": 503, "headers": self._headers})
            await send({"type": "http.response.body", "body": self._body})
            return
        counted = False

        async def counting_receive() -> Message:
            nonlocal counted
            message = await receive()
            if not counted and message["type"] == "http.request" and not message.get("more_body", False):
                self.processing += 1
                counted = True
            return message

        # The batcher reads the connection state from ``receive.__self__`` (uvicorn's request cycle) to drop
        # callers that hung up without a task per request; keep it reachable through the wrapper.
        setattr(counting_receive, "connection", getattr(receive, "__self__", None))  # noqa: B010
        try:
            await self.app(scope, counting_receive, send)
        finally:
            if counted:
                self.processing -= 1
