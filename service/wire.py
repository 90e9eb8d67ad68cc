"""HTTP/1.1 details of the guarded protocol (service/guards.py): its limits, the framing rules a request must pass
before it reaches the app, whole error responses in the service's shape, the request cycle's transport that
sends a response's head and body in one ``send``, and the connection's one timer.

uvicorn's request cycle writes the status line and headers as soon as the app sends ``http.response.start``,
and the body at ``http.response.body``: two ``send`` calls, and two wake-ups of the client, per response.
``OneWrite`` holds the head until the body's write (every route sends both in one step). The hot routes skip
both messages: ``ResponseCycle.respond`` writes a whole response at once (service/asgi.py's edge calls it).
"""

from __future__ import annotations

import asyncio
import fcntl
import operator
import struct
import termios
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httptools
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE, RequestResponseCycle

from service.errors import error_json, oip_error_json

_SAFE_ID = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
MiB = 1024 * 1024
Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 32 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    max_body_bytes: int = 16 * MiB
    refusal_delay_s: float = 1.0
    hold_body_bytes: int = MiB  # a body up to this size is read whole before the app is woken (0: as it comes)


class Gate(Protocol):
    """Admission from the headers (``InflightLimit``): a 503's headers and body, or None to go on."""

    def early_refusal(self, method: str, path: str, scope: Any) -> tuple[Headers, bytes] | None: ...


def error_response(status: int, code: str, message: str, request_id: str | None = None, *, v2: bool = False) -> bytes:
    """A complete HTTP/1.1 response in the service's error shape (``v2``: the Open Inference Protocol's,
    ``{"error": "message"}``), closing the connection."""
    body = oip_error_json(message) if v2 else error_json(code, message, request_id)
    rid = b"x-request-id: " + request_id.encode() + b"\r\n" if request_id else b""
    head = b"content-type: application/json\r\ncontent-length: %d\r\n%sconnection: close\r\n\r\n" % (len(body), rid)
    return STATUS_LINE[status] + head + body


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-ID`` when it is safe to echo (the app's rule), else a fresh one."""
    for name, value in headers:
        if name == b"x-request-id":
            if 0 < len(value) <= 128 and set(value) <= _SAFE_ID:
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


def framing(headers: list[tuple[bytes, bytes]], version: str, limit: int) -> tuple[tuple[int, str, str] | None, int]:
    """The refusal (status, code, message) a request's framing earns, or None: transfer codings other than
    ``chunked`` (501), ``Transfer-Encoding`` on HTTP/1.0 or with an empty coding (400), and a declared
    ``Content-Length`` over ``limit`` (413); with the declared length (-1: none, or not a number)."""
    codings: list[bytes] = []
    length = None
    for name, value in headers:
        if name == b"transfer-encoding":
            codings += [c.strip().lower() for c in value.split(b",")]
        elif name == b"content-length":
            length = value
    size = int(length) if length is not None and length.isdigit() else -1
    if codings and version != "1.1":
        return (400, "invalid_transfer_encoding", "Transfer-Encoding is not allowed in HTTP/1.0"), size
    if codings and not all(codings):
        return (400, "invalid_transfer_encoding", "Transfer-Encoding has an empty coding"), size
    if codings and codings != [b"chunked"]:
        shown = b", ".join(codings).decode("latin-1")[:100]
        return (
            501,
            "unsupported_transfer_encoding",
            f"transfer coding {shown!r} is not supported; only chunked is",
        ), size
    if size > limit:
        return (413, "payload_too_large", f"the body is {size} bytes; the limit is {limit}"), size
    return None, size


def v2_path(url: bytes) -> bool:
    """Whether a request target's path is under ``/v2`` (the Open Inference Protocol, whose errors take its
    shape); False for a target that does not parse."""
    try:
        return bool(httptools.parse_url(url).path.startswith(b"/v2/"))
    except httptools.HttpParserInvalidURLError:
        return False


def unread_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes the peer sent that the server has not read yet (the kernel's receive queue); 0 if unknown."""
    sock = transport.get_extra_info("socket")
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])
    except (AttributeError, OSError, ValueError):
        return 0


class OneWrite:
    """The request cycle's transport, holding the response head until the body's first write: one ``send`` (and
    one wake-up of the client) per response instead of two. A response with no body write (an answer to HEAD)
    sends its head when it completes (``done``, the cycle's ``on_response``); a streamed body's head goes with
    its first chunk; ``close`` sends what is held first. Bodies over 64 KiB are not copied to join them."""

    __slots__ = ("_head", "_headless", "_on_response", "_transport")

    def __init__(self, transport: asyncio.Transport, on_response: Callable[[], None]) -> None:
        self._transport, self._head, self._on_response = transport, b"", on_response
        self._headless = True  # the response head is the first write that is not a 100 Continue

    def write(self, data: bytes) -> None:
        head = self._head
        if self._headless and not data.startswith(b"HTTP/1.1 100"):
            self._head, self._headless = data, False
        elif head and len(data) <= 65536:
            self._head = b""
            self._transport.write(head + data)
        else:
            self.flush()
            self._transport.write(data)

    def whole(self, response: bytes) -> None:
        """A complete response, head and body: written at once."""
        self._headless = False
        self.flush()
        self._transport.write(response)

    def flush(self) -> None:
        head, self._head = self._head, b""
        if head:
            self._transport.write(head)

    def done(self) -> None:
        self.flush()
        self._on_response()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


_NAME, _VALUE, _LINE = operator.itemgetter(0), operator.itemgetter(1), b"%s: %s\r\n".__mod__


class ResponseCycle(RequestResponseCycle):
    """uvicorn's request cycle (the guarded protocol makes every one this class) with ``respond``: a whole
    response without ASGI messages, for the hot routes."""

    def respond(self, status: int, headers: Headers, body: bytes) -> bool:
        """Write a complete response (``content-length`` added) as ``send`` would, checked the same way, in one
        write; dropped if the client is gone. False, with nothing done, where ``send`` must do it: a response
        already started, the transport's buffer full (``send`` waits for it to drain), a HEAD request."""
        if self.response_started or self.flow.write_paused or self.scope["method"] == "HEAD":
            return False
        if self.disconnected:
            return True
        headers = [*self.default_headers, *headers]
        names = b"".join(map(_NAME, headers))
        if HEADER_RE.search(names) or HEADER_VALUE_RE.search(b"".join(map(_VALUE, headers))):
            raise RuntimeError("Invalid HTTP header name or value.")  # the checks of ``send``, on all at once
        self.response_started = self.response_complete = True  # not before: uvicorn answers 500 after a raise
        self.waiting_for_100_continue = False
        close = b"connection" in names and any(n == b"connection" and b"close" in v.lower() for n, v in headers)
        if close:
            self.keep_alive = False
        lines = b"".join(map(_LINE, headers))
        end = b"" if self.keep_alive or close else b"connection: close\r\n"
        head = b"%s%s%scontent-length: %d\r\n\r\n" % (STATUS_LINE[status], lines, end, len(body))
        out: Any = self.transport  # a OneWrite under the guarded protocol
        out.whole(head + body) if isinstance(out, OneWrite) else out.write(head + body)
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()
        return True


class OneTimer:
    """One deadline per connection (headers, body, keep-alive or a held refusal) and at most one timer handle: a
    later deadline arms nothing (the pending handle re-arms for what is left when it fires), so a request on a
    kept-alive connection costs no timer of its own (uvicorn's keep-alive timer was one per response)."""

    loop: asyncio.AbstractEventLoop
    _due: float | None  # when ``_on_due`` runs (loop time); None: no deadline
    _on_due: Callable[[], None]
    _read_timer: asyncio.TimerHandle | None

    def _arm(self, delay_s: float, callback: Any) -> None:
        self._due, self._on_due = (due := self.loop.time() + delay_s), callback
        if (handle := self._read_timer) is None or handle.when() > due:
            self._cancel_timer(keep_due=True)
            self._read_timer = self.loop.call_at(due, self._fire)

    def _cancel_timer(self, keep_due: bool = False) -> None:
        self._due = self._due if keep_due else None
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _fire(self) -> None:
        self._read_timer, due = None, self._due
        if due is not None and due > self.loop.time():
            self._read_timer = self.loop.call_at(due, self._fire)
        elif due is not None:
            self._due = None
            self._on_due()
