"""service/wire.py: the framing rules, one ``send`` per response (the head held until the body), whole responses
written at once (``ResponseCycle.respond``, the hot routes), with every response still whole and in order over a
real server: HEAD, ``Expect: 100-continue``, pipelining, big bodies, keep-alive."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from uvicorn.protocols.http.flow_control import FlowControl

from service.wire import OneWrite, ResponseCycle, framing, unread_bytes, v2_path
from tests.helpers import Server, complete, running_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("headers", "version", "expected"),
    [
        ([(b"content-length", b"10")], "1.1", None),
        ([(b"content-length", b"101")], "1.1", (413, "payload_too_large")),
        ([(b"content-length", b"100")], "1.1", None),  # at the limit
        ([(b"transfer-encoding", b"chunked")], "1.1", None),
        ([(b"transfer-encoding", b"Chunked ")], "1.1", None),  # codings are case-insensitive, trimmed
        ([(b"transfer-encoding", b"chunked")], "1.0", (400, "invalid_transfer_encoding")),
        ([(b"transfer-encoding", b"chunked, ")], "1.1", (400, "invalid_transfer_encoding")),
        ([(b"transfer-encoding", b"gzip, chunked")], "1.1", (501, "unsupported_transfer_encoding")),
        (
            [(b"transfer-encoding", b"gzip"), (b"transfer-encoding", b"chunked")],
            "1.1",
            (501, "unsupported_transfer_encoding"),
        ),
    ],
)
def test_framing(headers: list[tuple[bytes, bytes]], version: str, expected: tuple[int, str] | None) -> None:
    refusal, declared = framing(headers, version, limit=100)
    assert (refusal[:2] if refusal else None) == expected
    length = next((int(v) for n, v in headers if n == b"content-length"), -1)
    assert declared == length


def test_v2_path() -> None:
    assert v2_path(b"/v2/models/mnist-mlp/infer?x=1")
    assert not v2_path(b"/v1/predict")
    assert not v2_path(b"/v2")  # only paths under /v2/
    assert not v2_path(b"http://[::1")  # does not parse


class Recorder:
    """Stands where the socket transport stands: records each ``write`` (one ``send`` each)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def drive(*steps: bytes | str) -> tuple[list[list[bytes]], Recorder, list[str]]:
    """Feed ``steps`` (bytes: a write; "done": the response completes; "close") and record the writes after
    each, and the calls of the cycle's ``on_response``."""
    rec = Recorder()
    seen: list[list[bytes]] = []
    completed: list[str] = []
    out = OneWrite(rec, lambda: completed.append(f"after {len(rec.writes)} writes"))  # type: ignore[arg-type]
    for step in steps:
        if step == "done":
            out.done()
        elif step == "close":
            out.close()
        else:
            assert isinstance(step, bytes)
            out.write(step)
        seen.append(list(rec.writes))
    return seen, rec, completed


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


class _SocketTransport:
    def __init__(self, sock: object) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None


def test_unread_bytes_counts_what_the_peer_sent_and_the_server_has_not_read() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert unread_bytes(_SocketTransport(b)) == 0  # type: ignore[arg-type]
        a.sendall(b"x" * 1000)
        assert unread_bytes(_SocketTransport(b)) == 1000  # type: ignore[arg-type]
        b.recv(600)
        assert unread_bytes(_SocketTransport(b)) == 400  # type: ignore[arg-type]
    assert unread_bytes(_SocketTransport(None)) == 0  # type: ignore[arg-type]  # no socket: unknown, 0


def test_head_and_body_go_out_in_one_write() -> None:
    seen, rec, completed = drive(HEAD, b"hello", "done")
    assert seen[0] == []  # the head waits for the body
    assert rec.writes == [HEAD + b"hello"]
    assert completed == ["after 1 writes"]


def test_a_response_without_a_body_write_sends_its_head_when_it_completes() -> None:
    seen, rec, completed = drive(HEAD, "done")
    assert seen[0] == []
    assert rec.writes == [HEAD]
    assert completed == ["after 1 writes"]  # the head was out before the cycle moved on


def test_100_continue_is_never_held() -> None:
    seen, rec, _ = drive(b"HTTP/1.1 100 Continue\r\n\r\n", HEAD, b"hello")
    assert seen[0] == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    assert rec.writes == [b"HTTP/1.1 100 Continue\r\n\r\n", HEAD + b"hello"]


def test_a_large_body_is_not_copied_and_keeps_its_order() -> None:
    big = b"x" * 100_000
    _, rec, _ = drive(HEAD, big, b"tail")
    assert rec.writes == [HEAD, big, b"tail"]


def test_only_the_head_is_held() -> None:
    """A body chunk that happens to look like a status line goes out at once."""
    lookalike = b"HTTP/1.1 200 OK, said the body"
    seen, _, _ = drive(HEAD, b"hello", lookalike)
    assert seen[2] == [HEAD + b"hello", lookalike]


def test_close_sends_what_is_held_first() -> None:
    _, rec, _ = drive(HEAD, "close")
    assert rec.writes == [HEAD]
    assert rec.closed


class _Reading:
    """What FlowControl needs of a transport."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def cycle(*, method: str = "POST", keep_alive: bool = True) -> tuple[ResponseCycle, Recorder, list[str]]:
    """A request cycle as the guarded protocol makes it: its transport a ``OneWrite`` over ``Recorder``."""
    rec, completed = Recorder(), []
    c = ResponseCycle(scope={"method": method}, transport=rec, flow=FlowControl(_Reading()),  # type: ignore[arg-type,typeddict-item]
                      logger=logging.getLogger("t"), access_logger=logging.getLogger("t"), access_log=False,
                      default_headers=[(b"date", b"Thu, 03 Dec 2026 04:00:00 GMT")], message_event=asyncio.Event(),
                      expect_100_continue=False, keep_alive=keep_alive,
                      on_response=lambda: completed.append("done"))  # fmt: skip
    out = OneWrite(rec, c.on_response)  # type: ignore[arg-type]
    c.transport, c.on_response = out, out.done  # type: ignore[assignment]
    return c, rec, completed


def test_respond_writes_a_whole_response_once_with_the_server_headers_and_its_length() -> None:
    c, rec, completed = cycle()
    assert c.respond(200, [(b"content-type", b"application/json"), (b"x-batch-size", b"3")], b'{"a":1}')
    assert rec.writes == [b"HTTP/1.1 200 OK\r\ndate: Thu, 03 Dec 2026 04:00:00 GMT\r\ncontent-type: application/json"
                          b'\r\nx-batch-size: 3\r\ncontent-length: 7\r\n\r\n{"a":1}']  # fmt: skip
    assert (c.response_started, c.response_complete, c.keep_alive, rec.closed) == (True, True, True, False)
    assert completed == ["done"]  # the protocol moves on (keep-alive, the next pipelined request)


@pytest.mark.parametrize(("keep_alive", "headers"), [(False, []), (True, [(b"connection", b"close")])])
def test_respond_closes_the_connection_once_written_when_it_is_not_kept(
    keep_alive: bool, headers: list[tuple[bytes, bytes]]
) -> None:
    c, rec, _ = cycle(keep_alive=keep_alive)
    assert c.respond(503, headers, b"{}")
    assert rec.writes[0].count(b"connection: close\r\n") == 1, rec.writes
    assert (rec.closed, c.keep_alive) == (True, False)


@pytest.mark.parametrize("bad", [(b"x-id", b"a\r\nset-cookie: x=1"), (b"x id", b"1"), (b"x-id", b"a\x00")])
def test_respond_refuses_what_send_refuses(bad: tuple[bytes, bytes]) -> None:
    """A header that would split the response (or is not a token) is an error, as in uvicorn's ``send``."""
    c, rec, _ = cycle()
    with pytest.raises(RuntimeError, match="Invalid HTTP header"):
        c.respond(200, [bad], b"{}")
    assert rec.writes == []
    assert not c.response_started  # so uvicorn still answers (500) when the app returns


def test_respond_leaves_to_send_what_it_does_not_handle() -> None:
    """HEAD (no body goes out), a response already started, a full write buffer (``send`` waits for it)."""
    head, _, _ = cycle(method="HEAD")
    started, _, _ = cycle()
    started.response_started = True
    paused, _, _ = cycle()
    paused.flow.write_paused = True
    for c in (head, started, paused):
        assert not c.respond(200, [], b"{}")
        assert (c.transport._head, c.response_complete) == (b"", False)  # type: ignore[attr-defined]


def test_respond_to_a_client_that_is_gone_writes_nothing() -> None:
    c, rec, completed = cycle()
    c.disconnected = True
    assert c.respond(200, [], b"{}")
    assert (rec.writes, completed) == ([], [])


# ---------------------------------------------------------------------------------------------- real server
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(ROOT / "models", tmp_path_factory.mktemp("wire")) as srv:
        yield srv


def exchange(
    port: int, data: bytes, responses: int, *, pause_after: bytes | None = None, head_only: bool = False
) -> bytes:
    """Send ``data`` (stopping after ``pause_after`` until the server answers something), read ``responses``
    (``head_only``: one response head, as to HEAD)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        got = b""
        if pause_after is not None:
            first, rest = data.split(pause_after, 1)
            s.sendall(first + pause_after)
            got = s.recv(65536)
            data = rest
        s.sendall(data)
        while not (got.endswith(b"\r\n\r\n") if head_only else complete(got, responses)):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        return got


def test_a_response_head_with_no_body_after_it_is_sent(server: Server) -> None:
    """An answer to HEAD is a head alone (here 405: /healthz is GET only): it must not wait for a body."""
    got = exchange(server.port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 1, head_only=True)
    assert got.startswith(b"HTTP/1.1 405"), got[:300]
    assert b"content-length: " in got, got[:300]


def test_expect_100_continue_gets_its_interim_answer_then_the_prediction(server: Server) -> None:
    body = json.dumps({"image": [0.0] * 784}).encode()
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))  # fmt: skip
    got = exchange(server.port, head + body, 1, pause_after=b"\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), got[:200]
    assert b"HTTP/1.1 200" in got, got[:400]
    assert b'"label"' in got, got[:400]


def test_pipelined_requests_are_answered_whole_and_in_order(server: Server) -> None:
    image = json.dumps({"image": [0.0] * 784}).encode()
    post = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(image) + image)  # fmt: skip
    got = exchange(server.port, post + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + post, 3)
    assert complete(got, 3), got[-300:]
    order = [got.find(b'"label"'), got.find(b'"status"'), got.rfind(b'"label"')]
    assert order == sorted(order), order
    assert order[0] != order[2], order


def test_predictions_on_one_kept_alive_connection_each_arrive_whole_with_the_server_headers(server: Server) -> None:
    image = json.dumps({"image": [0.0] * 784}).encode()
    post = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(image) + image)  # fmt: skip
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        for _ in range(3):  # one connection: each answer leaves it open for the next request
            s.sendall(post)
            got = b""
            while not complete(got, 1):
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
            head = got.split(b"\r\n\r\n", 1)[0].lower()
            assert head.startswith(b"http/1.1 200"), head
            assert (head.count(b"\r\ndate: "), head.count(b"\r\ncontent-length: ")) == (1, 1), head
            assert (b"connection: close" in head, b"\r\nx-request-id: " in head) == (False, True), head
            assert b'"label"' in got


def test_a_response_over_64_kib_arrives_whole(server: Server) -> None:
    raw = np.zeros((4096, 784), dtype=np.uint8).tobytes()
    head = (b"POST /v1/predict/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % len(raw))  # fmt: skip
    got = exchange(server.port, head + raw, 1)
    assert got.startswith(b"HTTP/1.1 200"), got[:300]
    payload = json.loads(got.split(b"\r\n\r\n", 1)[1])
    assert payload["count"] == 4096
    assert len(payload["labels"]) == 4096


def test_a_websocket_upgrade_is_answered_as_plain_http(server: Server) -> None:
    """No route speaks WebSocket: an upgrade request is served as the HTTP request it also is (never a 101),
    whatever WebSocket library happens to be installed."""
    head = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip
    got = exchange(server.port, head, 1)
    assert got.startswith(b"HTTP/1.1 200"), got[:300]
    assert b'"status"' in got, got[:300]
