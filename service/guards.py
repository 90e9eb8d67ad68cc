"""HTTP-level guards uvicorn lacks, and the in-flight limits.

uvicorn's httptools protocol (0.54) sets no limit on the size of the request headers (httptools buffers a
header name or value until its CRLF), no timer before the first response (a silent connection is held forever),
no body limit and no body timer. ``guarded_protocol`` returns a subclass that closes these holes and answers in
the service's JSON error shape, every answer closing the connection:

- 431 ``headers_too_large`` when the request line plus headers exceed ``max_header_bytes``: counted from the
  parser's callbacks and from the bytes received while the headers are incomplete (what the parser buffers);
- 408 ``header_timeout`` when a connection has not sent complete headers ``header_timeout_s`` after it
  opened (or after its previous request began);
- 413 ``payload_too_large`` when a declared ``Content-Length`` exceeds ``max_body_bytes`` (before any of the
  body is read, on every route), or when a chunked body passes it;
- 501 ``unsupported_transfer_encoding`` for any transfer coding but ``chunked``; 400
  ``invalid_transfer_encoding`` for ``Transfer-Encoding`` on HTTP/1.0 (RFC 9112, 6.1) or an empty coding;
- 400 ``body_timeout`` when the body has not fully arrived ``body_timeout_s`` after the headers and no response
  has started, unless this server is the one late (reading paused until the app takes what was read, or bytes
  sent and not yet read);
- 503 ``too_many_requests`` from the ``gate`` (``InflightLimit``, service/inflight.py), decided from the headers
  (no ASGI task, no body parsed), held ``refusal_delay_s`` (the ``Retry-After``) with reading paused for up to
  ``MAX_HELD_REFUSALS`` connections: a client retrying at once retries once per delay, not as fast as the loop
  can refuse (which starved ``/healthz``: reliability.md).

A body up to ``hold_body_bytes`` reaches the app whole, in one message and one copy, once it is all in (one
declared bigger is not held; a chunked one until it outgrows the hold); uvicorn hands a body over as it comes:
a copy into its buffer and a wake-up of the app per piece, reading paused past 64 KiB until the app takes it,
and a copy out.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from typing import ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service import wire
from service.wire import Gate, HttpLimits, OneTimer, OneWrite, error_response, framing, request_id, v2_path

log = logging.getLogger("service.guards")

MAX_HELD_REFUSALS = 1024  # held at once (each an fd, ~10 KiB, its unread bytes in the kernel); beyond: at once


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing: httptools turns it into HttpParserCallbackError."""


class GuardedHttpToolsProtocol(OneTimer, HttpToolsProtocol):
    limits: ClassVar[HttpLimits] = HttpLimits()
    gate: ClassVar[Gate | None] = None
    held: ClassVar[int] = 0  # refusals being held, this server's

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0  # request line + headers, as the parser reports them
        self._head_bytes, self._in_head = 0, True  # bytes received while the headers were incomplete (buffered)
        self._events = 0  # headers-complete / message-complete events: a chunk with one is not all headers
        self._body_bytes = 0
        self._parts: list[bytes] | None = None  # the body held so far (on_body)
        self._refusal: tuple[int, str, str, str | None, bool] | None = None
        self._early: bytes | None = None  # the gate's 503, a complete response
        self._held, self._on_due, self._idle = False, self._header_timeout, False  # _idle: the keep-alive wait
        self._read_timer: asyncio.TimerHandle | None = None
        self._due: float | None = None  # when ``_on_due`` runs (loop time); None: no deadline
        self._arm(self.limits.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._unhold()
        super().connection_lost(exc)
        # Cut this object's reference cycles (its request cycle's ``on_response``, ``_on_due``): refcounting frees
        # a closed connection, and a body it read but the app never took (a 413), at once, not at the next GC pass.
        if self.cycle is not None:
            self.cycle.body = bytearray()
        self.cycle, self._on_due, self._parts = None, lambda: None, None  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        events = self._events
        if self._idle:  # the keep-alive wait ends with the first byte: the headers get their time from now
            self._idle = False
            self._arm(self.limits.header_timeout_s, self._header_timeout)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._early is None and self._refusal is None:  # ours are logged at info where decided, or not
                self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:  # as uvicorn does
            self.handle_websocket_upgrade() if self._should_upgrade() else self._unsupported_upgrade_warning()
            return
        if self._in_head and self._events == events and not self.transport.is_closing():
            # No event in this chunk: all of it belongs to headers still incomplete. httptools keeps a header
            # name or value without its CRLF in its own buffer, so the callbacks alone cannot see it grow.
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._answer(*self._too_large_headers())

    def _header_timeout(self) -> None:
        if self.transport.is_closing():
            return
        limit = self.limits.header_timeout_s
        log.info("closing a connection that sent no complete request headers in time",
                 extra={"client": self.client and self.client[0], "timeout_s": limit})  # fmt: skip
        self._answer(408, "header_timeout", f"request headers must arrive within {limit:g} s", None)

    def _body_timeout(self) -> None:
        if self.transport.is_closing():
            return
        limit, cycle = self.limits.body_timeout_s, self.cycle
        if cycle is not None and cycle.response_complete:  # answered already (a 413, say): only close
            self.transport.close()
            return
        if self.flow.read_paused or wire.unread_bytes(self.transport):  # the app has not taken what was read, or the
            # loop has not read what was sent (a stalled loop reads 256 KiB per turn): this server is late
            self._arm(limit, self._body_timeout)
            return
        log.info("closing a connection whose request body did not arrive in time",
                 extra={"client": self.client and self.client[0], "timeout_s": limit})  # fmt: skip
        rid = (cycle.scope.get("state") or {}).get("request_id") if cycle is not None else None
        self._answer(400, "body_timeout", f"the body did not arrive within {limit:g} s", rid, v2_path(self.url))

    # -------------------------------------------------------------- answering
    def _hold_refusal(self) -> None:
        if self.limits.refusal_delay_s <= 0 or type(self).held >= MAX_HELD_REFUSALS:
            return self._write_refusal()
        type(self).held += 1
        self._held = True
        self.transport.pause_reading()
        self._arm(self.limits.refusal_delay_s, self._write_refusal)

    def _unhold(self) -> None:
        if self._held:
            self._held, type(self).held = False, type(self).held - 1

    def _write_refusal(self) -> None:
        self._due = None
        self._unhold()
        if self._early is not None and not self.transport.is_closing():
            self.transport.write(self._early)
            self.transport.close()

    def _answer(self, status: int, code: str, message: str, request_id: str | None, v2: bool = False) -> None:
        """Write one error response and close, unless a response is already on its way (then only close).

        The request being handled, if any, is marked disconnected first: the app's ``receive`` then returns
        ``http.disconnect`` and whatever it sends is dropped, so two responses never interleave.
        """
        self._due = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                self.transport.close()
                return
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.write(error_response(status, code, message, request_id, v2=v2))
        self.transport.close()

    def _too_large_headers(self) -> tuple[int, str, str, None]:
        limit = self.limits.max_header_bytes
        log.info("refusing oversized request headers", extra={"client": self.client and self.client[0]})
        return 431, "headers_too_large", f"request line and headers exceed {limit} bytes", None

    def _refuse(self, status: int, code: str, message: str, request_id: str | None, v2: bool = False) -> None:
        """From a parser callback: stop parsing; ``send_400_response`` answers."""
        self._refusal = (status, code, message, request_id, v2)
        raise _Refused

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this for any parser error; answer in the service's JSON shape (ours when refused)."""
        if self._early is not None:
            return self._hold_refusal()
        refusal = self._refusal or (400, "malformed_http", "the request is not valid HTTP/1.1", None, False)
        self._answer(*refusal)

    # -------------------------------------------------------------- parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        if self._due is None:  # a request on a kept-alive connection: its headers get the same time
            self._arm(self.limits.header_timeout_s, self._header_timeout)

    def on_url(self, url: bytes) -> None:
        self._header_bytes += len(url)
        if self._header_bytes > self.limits.max_header_bytes:
            self._refuse(*self._too_large_headers())
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.limits.max_header_bytes:
            self._refuse(*self._too_large_headers())
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._events += 1
        self._in_head, self._head_bytes, self._body_bytes = False, 0, 0
        declared = self._check_framing()  # a body declared bigger than the hold is not held; a chunked one is
        self._parts = None if self.parser.should_upgrade() or declared > self.limits.hold_body_bytes else []
        self._admit()
        self._arm(self.limits.body_timeout_s, self._body_timeout)
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle is not before:  # a request cycle was made: one write per response, and
            cycle.__class__ = wire.ResponseCycle  # ``respond`` for whole responses (service/wire.py)
            cycle.transport = out = OneWrite(self.transport, cycle.on_response)  # type: ignore[assignment]
            cycle.on_response = out.done

    def _admit(self) -> None:
        """The gate's refusal stops parsing here: no request cycle, no ASGI task, no body copied. Not while an
        earlier request on this connection is being answered (pipelining): that one's response goes first."""
        if self.gate is None or self.parser.should_upgrade() or (self.cycle and not self.cycle.response_complete):
            return  # uvicorn starts no ASGI task for an upgrade: nothing would release a reservation
        url = self.url
        try:  # a plain origin-form target (the common case) is its own path: no URL parse
            plain = url[:1] == b"/" and b"?" not in url and b"%" not in url and b"#" not in url
            path = (url if plain else httptools.parse_url(url).path).decode("ascii")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            return  # uvicorn answers it
        refusal = self.gate.early_refusal(self.parser.get_method().decode("ascii"),
                                          urllib.parse.unquote(path) if "%" in path else path, self.scope)  # fmt: skip
        if refusal is not None:
            headers, body = refusal
            lines = b"".join(n + b": " + v + b"\r\n" for n, v in [*self.server_state.default_headers, *headers])
            self._early = STATUS_LINE[503] + lines + b"\r\n" + body
            raise _Refused

    def _check_framing(self) -> int:
        """Transfer codings and the declared body size (returned), before the request reaches the app."""
        refusal, declared = framing(self.headers, self.parser.get_http_version(), self.limits.max_body_bytes)
        if refusal is not None:
            self._refuse(*refusal, request_id(self.headers), v2_path(self.url))
        return declared

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        limit = self.limits.max_body_bytes
        if self._body_bytes > limit and not self.cycle.response_complete:  # a chunked body (Content-Length is checked)
            rid = (self.cycle.scope.get("state") or {}).get("request_id")
            message, v2 = f"the body exceeds the limit of {limit} bytes", v2_path(self.url)
            self._refuse(413, "payload_too_large", message, rid, v2)
        parts = self._parts  # held whole up to ``hold_body_bytes`` (the module's docstring says why)
        if parts is not None and self._body_bytes <= self.limits.hold_body_bytes and not self.cycle.response_complete:
            parts.append(body)
        else:
            self._release(complete=False)
            super().on_body(body)

    def _release(self, complete: bool = True) -> None:
        """The held body to the request cycle: a ``complete`` one as one ``bytes`` (``receive`` passes it on
        without a copy), else appended to uvicorn's buffer, which takes the rest."""
        parts, self._parts, cycle = self._parts, None, self.cycle
        if parts and cycle is not None and not cycle.response_complete:
            if complete and not cycle.body:
                cycle.body = parts[0] if len(parts) == 1 else b"".join(parts)  # type: ignore[assignment]
            else:
                for part in parts:
                    cycle.body += part

    def on_message_complete(self) -> None:
        self._events += 1
        self._in_head, self._head_bytes, self._due = True, 0, None
        self._release()
        super().on_message_complete()
        if self.cycle.response_complete and not self.transport.is_closing():  # answered before its body was in
            self._keep_alive()

    def on_response_complete(self) -> None:
        """uvicorn's, the keep-alive timeout armed as the connection's one deadline: only once the request is
        all in and no next one has begun (a body still arriving keeps its timeout; see on_message_complete)."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self._in_head and self._due is None:
            self._keep_alive()

    def _keep_alive(self) -> None:
        self._idle = True
        self._arm(self.timeout_keep_alive, self.timeout_keep_alive_handler)


def guarded_protocol(limits: HttpLimits, gate: Gate | None = None) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``, bound to ``limits`` and ``gate``."""
    return type("Bound", (GuardedHttpToolsProtocol,), {"limits": limits, "gate": gate, "held": 0})
