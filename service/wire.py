"""What the HTTP protocol (service/guards.py) writes itself: whole error responses in the service's shape, and
the request cycle's transport that sends a response's head and body in one ``send``.

uvicorn's request cycle writes the status line and headers as soon as the app sends ``http.response.start``,
and the body at ``http.response.body``: two ``send`` calls, and two wake-ups of the client, per response.
``OneWrite`` holds the head until the body's write (every route sends both in one step).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from service.errors import error_json, oip_error_json

_SAFE_ID = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


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
