"""A small HTTP/1.1 keep-alive client on raw asyncio streams, cheap enough to overload the service.

httpx costs a few hundred microseconds of CPU per request; on a shared 2-core machine that would make the
load generator, not the service, the bottleneck. This client formats each request once and parses only
the status line, the headers it needs and a Content-Length body.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    latency_s: float


def build_request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 request, ready to write (Host is always 127.0.0.1, the only target allowed here)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Connection:
    """One keep-alive connection; ``closed`` becomes True when the server says ``Connection: close``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> Reply:
        """Send one request and read its reply. Raises OSError / asyncio.IncompleteReadError on a broken link."""
        start = time.perf_counter()
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        body = await self.reader.readexactly(length) if length else b""
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Reply(status, headers, body, time.perf_counter() - start)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()
