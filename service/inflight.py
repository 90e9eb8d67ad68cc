"""The in-flight limits: inference requests processed at once, and request body bytes in flight.

``InflightLimit`` is pure ASGI and the outermost layer, so a refusal is a prebuilt 503 that costs far less than the
work it sheds; when the load falls it hands freed heap memory back to the operating system (``malloc_trim``).
The connection-level guards (header size and time, body time, transfer codings) are in service/guards.py.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import is_inference
from service.wire import MiB

log = logging.getLogger("service.inflight")


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _load_malloc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)``: returns free heap pages of every arena to the OS (None off glibc)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: int(trim(0))


_MALLOC_TRIM = _load_malloc_trim()
M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Bound glibc's heap arenas (``mallopt(M_ARENA_MAX)``, what ``MALLOC_ARENA_MAX`` does; that variable, when
    set, wins). glibc gives threads that allocate at once arenas of their own, up to 8 per core, and each keeps
    what was freed in it: the engine, bulk and decoding threads then multiply the peak under load. Call before
    those threads start. False off glibc."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    return bool(mallopt(M_ARENA_MAX, arenas)) if mallopt is not None else False


#: A prebuilt refusal: its headers and body (the status is 503).
Refusal = tuple[list[tuple[bytes, bytes]], bytes]
#: The scope key where the connection guard leaves the body cost it reserved for an admitted request.
RESERVED = "mnist.inflight_reserved"

#: What decoding a body costs in memory, per byte, relative to a binary batch (measured, docs/reliability.md):
#: a JSON batch about 10 times its size at peak (Python objects per number), a ``.npy`` batch 2 to 6 times.
JSON_WEIGHT = 6


def body_cost(scope: Scope, max_body_bytes: int) -> int:
    """What a request's body counts against the in-flight budget: its declared ``Content-Length`` (0 without a
    body); ``max_body_bytes``, the most it can grow to, when it is chunked or compressed
    (``Content-Encoding``); times ``JSON_WEIGHT`` for JSON. A declared size over ``max_body_bytes`` costs
    nothing: that body is refused with 413 unread."""
    size = 0
    encoded = json = False
    for name, value in scope["headers"]:
        if name == b"content-length":
            size = max(size, int(value) if value.isdigit() else 0)
        elif name == b"transfer-encoding":
            size = max_body_bytes
        elif name == b"content-encoding":
            encoded = value.strip().lower() not in (b"", b"identity")
        elif name == b"content-type":
            json = value.lstrip().lower().startswith(b"application/json")
    if size > max_body_bytes:
        return 0
    if size and encoded:
        size = max_body_bytes
    return size * JSON_WEIGHT if json else size


class InflightLimit:
    """Pure ASGI, outermost: two admission bounds answered at once with a prebuilt 503, and heap trimming.

    - At most ``limit`` inference requests are processed at once. A request counts from the moment its body
      has fully arrived (the app's ``receive`` returns the last chunk) until its response ends, so slow
      uploaders hold no slot (the body timeout bounds them).
    - At most ``max_body_bytes_in_flight`` bytes of request bodies, on every route, by declared size
      (``body_cost``: a chunked or compressed body counts as ``max_body_bytes``, the most it can become, and
      JSON six times its size), from the request's start to its response's end: what bodies, their copies
      and their decoded arrays hold at once grows with it, not with the number of connections. A request
      alone is always admitted (``max_body_bytes`` bounds it).

    The checks happen as soon as the request's headers are in (the connection guard asks ``early_refusal``,
    service/guards.py), before any ASGI task, routing or body read, and again when it reaches this layer; the
    refusal is a prebuilt response: under overload a refusal must cost far less than the work it sheds, or
    the refusals alone fill the CPU (measured in docs/reliability.md). The guard holds it ``refusal_delay_s``
    (the ``Retry-After``), reading paused, so a client retrying at once cannot make the event loop refuse as
    fast as it can. The refusal closes the connection: a retrying client must reconnect, and behind an L4
    balancer (a Kubernetes Service) the new connection may land on another replica. Requests without a body (health, readiness,
    metrics, metadata) are never limited, so probes keep working under overload.

    When no body is in flight any more and at least ``trim_after_bytes`` of bodies went through since the
    last trim, glibc's ``malloc_trim(0)`` runs in a worker thread: large buffers freed by the requests stay
    in the allocator's arenas otherwise, and the process's resident memory would never come back down
    after a burst (measured in docs/reliability.md). The bar is low (1 MiB) on purpose: a trim in a lull of a
    long load resets the count, and the few bulk bodies after it can regrow tens of MiB that must go too.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        on_refuse: Callable[[], None] | None = None,
        *,
        max_body_bytes_in_flight: int = 64 * MiB,
        max_body_bytes: int = 16 * MiB,
        trim_after_bytes: int = 1 * MiB,
        trim_delay_s: float = 0.5,
        http: ASGIApp | None = None,
    ) -> None:
        self.app = app
        self.http = http if http is not None else app  # HTTP requests (``app`` gets the rest: lifespan)
        self.limit = limit if limit > 0 else 2**62
        self.processing = 0
        self.body_bytes = 0
        self.max_body_bytes_in_flight = max_body_bytes_in_flight
        self.max_body_bytes = max_body_bytes
        self.on_refuse = on_refuse
        self.trim_after_bytes = trim_after_bytes
        self.trim_delay_s = trim_delay_s
        self.trims = 0
        self._since_trim = 0
        self._trim_pending = False  # a trim 0.5 s after the load fell is due (not the later ones: they never wait)
        self._later: asyncio.TimerHandle | None = None  # the next later trim
        self._refusal_requests = self._refusal(f"{limit} inference requests are already in progress; retry later")
        self._refusal_bytes = self._refusal(
            f"{max_body_bytes_in_flight} bytes of request bodies are already in progress; retry later"
        )

    @staticmethod
    def _refusal(message: str) -> Refusal:
        body = orjson.dumps({"error": {"code": "too_many_requests", "request_id": None, "message": message}})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"),
            (b"connection", b"close"),
        ]
        return headers, body

    def _refusal_for(self, method: str, path: str, cost: int) -> Refusal | None:
        if is_inference(method, path) and self.processing >= self.limit:
            return self._refusal_requests
        if cost and self.body_bytes and self.body_bytes + cost > self.max_body_bytes_in_flight:
            return self._refusal_bytes
        return None

    def early_refusal(self, method: str, path: str, scope: Scope) -> Refusal | None:
        """Admission decided by the connection guard as soon as a request's headers are in (service/guards.py;
        ``scope`` is the request's, still without method and path): a refusal (counted) costs no ASGI task
        and none of its body is parsed or copied. An admitted body's cost is reserved at once, marked in the
        scope for ``__call__``: requests whose headers arrive in the same event-loop iteration are admitted
        against each other, not all against the budget as it was before any of them started."""
        cost = body_cost(scope, self.max_body_bytes)
        refusal = self._refusal_for(method, path, cost)
        if refusal is not None:
            if self.on_refuse is not None:
                self.on_refuse()
        elif cost:
            self.body_bytes += cost
            scope[RESERVED] = cost
        return refusal

    async def _refuse(self, send: Send, refusal: Refusal) -> None:
        if self.on_refuse is not None:
            self.on_refuse()
        await send({"type": "http.response.start", "status": 503, "headers": refusal[0]})
        await send({"type": "http.response.body", "body": refusal[1]})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        inference = is_inference(scope["method"], scope["path"])
        cost: int | None = scope.pop(RESERVED, None)  # admitted (and reserved) by the connection guard
        if cost is None:
            cost = body_cost(scope, self.max_body_bytes)
            if not cost and not inference:
                await self.http(scope, receive, send)
                return
            refusal = self._refusal_for(scope["method"], scope["path"], cost)
            if refusal is not None:
                await self._refuse(send, refusal)
                return
            self.body_bytes += cost
        counted = False
        cycle = getattr(receive, "__self__", None)  # uvicorn's request cycle
        if inference and getattr(cycle, "more_body", True) is False:  # the body is all in already: counted now
            self.processing, counted = self.processing + 1, True

        if inference and not counted:  # counted when its last chunk is read
            inner = receive

            async def counting_receive() -> Message:
                nonlocal counted
                message = await inner()
                if not counted and message["type"] == "http.request" and not message.get("more_body", False):
                    self.processing += 1
                    counted = True
                return message

            # The batcher reads the connection state from ``receive.__self__`` (uvicorn's request cycle) to drop
            # callers that hung up without a task per request; keep it reachable through the wrapper.
            setattr(counting_receive, "connection", cycle)  # noqa: B010
            receive = counting_receive
        try:
            await self.http(scope, receive, send)
        finally:
            if counted:
                self.processing -= 1
            self.body_bytes -= cost
            self._since_trim += cost
            if not self.body_bytes and self._since_trim >= self.trim_after_bytes and not self._trim_pending:
                self._trim_pending = True
                asyncio.get_running_loop().call_later(self.trim_delay_s, self._trim_after_load)

    def _trim_after_load(self) -> None:
        self._trim_pending = False
        self._trim_if_idle((10, 50))

    def _trim_if_idle(self, later: tuple[int, ...]) -> None:
        if self.body_bytes or _MALLOC_TRIM is None:
            return  # load came back: trim when it falls again
        self._since_trim = 0
        self.trims += 1
        loop = asyncio.get_running_loop()
        # Off the event loop: trimming a large heap takes milliseconds (ctypes releases the GIL meanwhile).
        loop.run_in_executor(None, _MALLOC_TRIM)
        # Again 5 s and 30 s on: the last batches are let go a moment after their responses (seconds on a starved
        # machine: docs/reliability.md). A new load that falls meanwhile gets its own trims at once, from 0.5 s.
        if self._later is not None:
            self._later.cancel()
        self._later = loop.call_later(later[0] * self.trim_delay_s, self._trim_if_idle, later[1:]) if later else None
