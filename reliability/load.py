"""Load shapes shared by the scenarios: closed loop (N connections, back to back) and open loop (a fixed
arrival rate, whatever the service does), each request's outcome recorded."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import orjson

from reliability.client import Connection

#: The clock of every timestamp here (uvloop's ``loop.time()`` only ticks in whole milliseconds).
now = time.perf_counter

#: A kept-alive connection idle longer than this is not reused: the service closes idle connections after
#: ``timeout_keep_alive_s`` (5 s by default), and a request written as it does so is lost. Real clients
#: need the same rule (an idle expiry shorter than the server's), see docs/reliability.md.
IDLE_EXPIRY_S = 4.0

#: Outcomes that are not an HTTP status.
TIMEOUT, RESET, CONNECT_ERROR, NOT_SENT = "timeout", "reset", "connect_error", "not_sent"


@dataclass(slots=True)
class Outcome:
    at: float  # loop time the request was due (open loop) or sent (closed loop)
    latency_s: float  # from `at` to the last byte of the reply (or to the failure)
    status: int | str  # HTTP status, or one of TIMEOUT / RESET / CONNECT_ERROR / NOT_SENT
    code: str = ""  # the error code of a JSON error body


@dataclass
class Record:
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, at: float, latency_s: float, status: int | str, body: bytes = b"") -> None:
        code = ""
        if isinstance(status, int) and status >= 400 and body[:1] == b"{":
            try:
                code = str(orjson.loads(body)["error"]["code"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                code = "?"
        self.outcomes.append(Outcome(at, latency_s, status, code))

    def statuses(self) -> Counter[str]:
        return Counter(f"{o.status}" + (f" {o.code}" if o.code else "") for o in self.outcomes)

    def latencies(self, status: int | str) -> list[float]:
        return sorted(o.latency_s for o in self.outcomes if o.status == status)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


async def _one(conn: Connection, raw: bytes, timeout_s: float) -> tuple[int | str, bytes, float]:
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            reply = await conn.request(raw)
    except TimeoutError:
        conn.close()
        return TIMEOUT, b"", time.perf_counter() - start
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        conn.close()
        return RESET, b"", time.perf_counter() - start
    return reply.status, reply.body, reply.latency_s


async def closed_loop(port: int, raw: bytes, connections: int, duration_s: float, timeout_s: float = 10) -> Record:
    """``connections`` clients, each sending its next request as soon as the last one is answered."""
    record = Record()
    stop_at = now() + duration_s

    async def client() -> None:
        conn: Connection | None = None
        while now() < stop_at:
            at = now()
            if conn is None or conn.closed:
                try:
                    conn = await Connection.open("127.0.0.1", port)
                except OSError:
                    record.add(at, now() - at, CONNECT_ERROR)
                    await asyncio.sleep(0.01)
                    continue
            status, body, latency = await _one(conn, raw, timeout_s)
            record.add(at, latency, status, body)
        if conn is not None:
            conn.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return record


async def open_loop(
    port: int,
    raw: bytes,
    rate: float,
    duration_s: float,
    max_connections: int,
    timeout_s: float = 10,
    stop: asyncio.Event | None = None,
    preopen: int = 0,
    fresh: bool = False,
) -> Record:
    """Requests arrive at ``rate`` per second for ``duration_s`` (or until ``stop`` is set) whatever the
    service does; each takes an idle keep-alive connection or opens one (up to ``max_connections``; beyond
    it the arrival is NOT_SENT). Latency runs from the arrival, so time spent waiting for a connection
    counts. ``preopen`` connections are opened before the first arrival; with ``fresh`` every request
    opens its own connection (what a new client, or a kubelet probe, does)."""
    record = Record()
    idle: list[tuple[float, Connection]] = [(now(), await Connection.open("127.0.0.1", port)) for _ in range(preopen)]
    open_count = len(idle)
    tasks: set[asyncio.Task[None]] = set()

    async def arrival(at: float) -> None:
        nonlocal open_count
        conn = None
        while idle and conn is None:
            since, conn = idle.pop()
            if conn.closed or conn.reader.at_eof() or now() - since > IDLE_EXPIRY_S:
                conn.close()
                open_count -= 1
                conn = None
        if conn is None:
            if open_count >= max_connections:
                record.add(at, 0.0, NOT_SENT)
                return
            open_count += 1
            try:
                conn = await Connection.open("127.0.0.1", port)
            except OSError:
                open_count -= 1
                record.add(at, now() - at, CONNECT_ERROR)
                return
        status, body, _ = await _one(conn, raw, timeout_s)
        record.add(at, now() - at, status, body)
        if fresh:
            conn.close()
        if conn.closed:
            open_count -= 1
        else:
            idle.append((now(), conn))

    loop = asyncio.get_running_loop()
    start = now()
    due = 0
    while (t := now()) - start < duration_s and not (stop is not None and stop.is_set()):
        target = int((t - start) * rate) + 1  # arrival k is due at start + k / rate
        while due < target:
            task = loop.create_task(arrival(start + due / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            due += 1
        await asyncio.sleep(min(max(0.0, start + due / rate - now()), 0.05))  # 50 ms: see stop and the end
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s + 5)
    for _, conn in idle:
        conn.close()
    return record
