"""Reliability: admission under load, overload, slow clients, SIGTERM drain, disconnects, engine faults, bad
model files, and the security properties of errors, CORS and admin endpoints.

Every test drives a real ``python -m service.server`` process on 127.0.0.1. Where a test needs a slow or a
busy engine, the server runs on the stand-in of tests/standin.py: the real ONNX model behind a gate the test
holds and releases, so who is queued, refused or answered follows from events the test causes, on any
machine. Waits are on observable events (a metric reaching a value, an engine call held at the gate, a socket
closing), each bounded by a generous timeout; no assertion is on speed. Servers shared by several tests are
checked at teardown: exit code 0 and no error in their log, whichever tests ran and in whatever order.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto, helper, numpy_helper

from reliability.overload import OverloadConfig
from reliability.overload import run as run_overload
from tests.helpers import (
    ROOT,
    Server,
    assert_clean_shutdown,
    log_failures,
    read_until_closed,
    start_server,
    tiny_onnx,
    write_model,
)
from tests.standin import Engine

SENTINEL = 0.5  # a first pixel of exactly 0.5 makes the faulty model fail (never k/255 for an integer k)


# ---------------------------------------------------------------------------------------------- test models
def _model(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], name: str) -> bytes:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 784])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _linear(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.5, (784, 10)).astype(np.float32), rng.normal(0, 0.1, 10).astype(np.float32)


def faulty_onnx(seed: int = 0) -> bytes:
    """softmax(x W + b), except that a batch holding an image whose first pixel is SENTINEL fails at run time:
    the input is reshaped to [-1, 784 + any(x[:, 0] == SENTINEL)], impossible for 785."""
    w, b = _linear(seed)
    nodes = [
        helper.make_node("Slice", ["pixels", "zero", "one", "one"], ["col0"]),
        helper.make_node("Equal", ["col0", "sentinel"], ["hit"]),
        helper.make_node("Cast", ["hit"], ["hit_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["hit_f"], ["any_f"], keepdims=0),
        helper.make_node("Cast", ["any_f"], ["any_i"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["any_i", "one"], ["any_1"]),
        helper.make_node("Add", ["features", "any_1"], ["width"]),
        helper.make_node("Concat", ["minus_one", "width"], ["shape"], axis=0),
        helper.make_node("Reshape", ["pixels", "shape"], ["x"]),
        helper.make_node("MatMul", ["x", "W"], ["l0"]),
        helper.make_node("Add", ["l0", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    ints = {"zero": [0], "one": [1], "features": [784], "minus_one": [-1]}
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items()]
    inits += [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    inits.append(numpy_helper.from_array(np.array(SENTINEL, np.float32), "sentinel"))
    return _model(nodes, inits, "faulty")


# ---------------------------------------------------------------------------------------------- helpers
def wait_until(predicate: Callable[[], bool], timeout_s: float = 60, what: str = "condition") -> None:
    """Poll an observable condition (a metric, a log line) until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def metric(server: Server, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(\{\})?") + r" ([0-9.e+-]+)"
    found = re.search("^" + pattern + "$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def image(seed: int = 0) -> list[float]:
    return (np.random.default_rng(seed).integers(0, 256, 784) / 255).tolist()


def assert_error_shape(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, str]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"code", "message", "request_id"}, err
    if code is not None:
        assert err["code"] == code, err
    return dict(err)


LEAKS = ("Traceback", 'File "', "/work", "site-packages", ".py", "onnxruntime_src", " at 0x")


def assert_no_leak(text: str) -> None:
    for marker in LEAKS:
        assert marker not in text, f"{marker!r} leaked in {text[:300]!r}"


def post_one(url: str, seed: int, headers: dict[str, str] | None = None) -> httpx.Response:
    """One single-image request on its own connection."""
    with httpx.Client(timeout=120) as c:
        return c.post(f"{url}/v1/predict", json={"image": image(seed)}, headers=headers)


def queued(server: Server, queue: str = "interactive") -> float:
    return metric(server, "mnist_queue_depth_images", f'queue="{queue}"')


def settled(engine: Engine, server: Server, futures: list[Future[httpx.Response]]) -> Callable[[], bool]:
    """True once every request sent is accounted for: held in the engine, queued, or answered. Read in that
    order, so an item moving from the queue into the engine, or out of it, is never counted twice."""

    def check() -> bool:
        held = engine.in_progress()
        depth = queued(server)
        return held + depth + sum(f.done() for f in futures) == len(futures)

    return check


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    with Engine(tmp_path_factory.mktemp("engine")) as eng:
        yield eng


@pytest.fixture(scope="module")
def gated_server(tiny_repo: Path, engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The tiny model behind the stand-in's gate: one image per engine call and a 16-image queue, so admission
    is easy to drive; a request timeout far beyond any wait the tests cause (a 504 here is a bug)."""
    srv = start_server(tiny_repo, tmp_path_factory.mktemp("gated-srv"), "--max-batch-size", "1",
                       "--bulk-chunk-images", "1", "--max-queue-images", "16", "--request-timeout-s", "60",
                       launcher=engine.launcher())  # fmt: skip
    yield srv
    engine.release()
    assert_clean_shutdown(srv)


# ---------------------------------------------------------------------------------------------- admission
def test_tight_deadline_is_refused_at_once_when_the_queue_is_deep(gated_server: Server, engine: Engine) -> None:
    url = gated_server.url
    refusals = metric(gated_server, "mnist_requests_dropped_total", 'reason="deadline_unmeetable"')
    for i in range(3):  # the service estimates the wait from batches it ran: each costs at least the delay
        assert post_one(url, i).status_code == 200
    with ThreadPoolExecutor(13) as pool, engine.holding():
        backlog = [pool.submit(post_one, url, i) for i in range(12)]
        wait_until(settled(engine, gated_server, backlog), what="12 requests held or queued")
        assert not any(f.done() for f in backlog), "a request was answered while the engine was held"
        # The backlog cannot move while the engine is held: an answer now is an answer at once.
        refused = post_one(url, 99, {"X-Request-Deadline-Ms": "5"})
        generous = pool.submit(post_one, url, 98, {"X-Request-Deadline-Ms": "60000"})
        wait_until(settled(engine, gated_server, [*backlog, generous]), what="the generous request queued")
        assert not generous.done()
    assert_error_shape(refused, 503, "deadline_unmeetable")
    assert int(refused.headers["retry-after"]) >= 1
    assert generous.result().status_code == 200, generous.result().text
    assert [f.result().status_code for f in backlog] == [200] * 12
    assert metric(gated_server, "mnist_requests_dropped_total", 'reason="deadline_unmeetable"') == refusals + 1


def test_invalid_deadline_header_is_a_4xx(gated_server: Server) -> None:
    with gated_server.client() as c:
        for value in ("abc", "-5", "0", "1e309", "nan"):
            r = c.post("/v1/predict", json={"image": image()}, headers={"X-Request-Deadline-Ms": value})
            assert_error_shape(r, 422, "invalid_header")


def test_full_queue_refuses_with_retry_after(gated_server: Server, engine: Engine) -> None:
    """48 requests while the engine is held: the queue fills to its bound (16), those held in the engine or
    queued are answered 200 once it is released, every other one was answered 503 queue_full at once."""
    n, bound = 48, 16
    refusals = metric(gated_server, "mnist_requests_dropped_total", 'reason="queue_full"')
    with ThreadPoolExecutor(n) as pool, engine.holding():
        futures = [pool.submit(post_one, gated_server.url, i) for i in range(n)]
        wait_until(settled(engine, gated_server, futures), what="every request held, queued or answered")
        held, depth = engine.in_progress(), queued(gated_server)
        at_once = [f.done() for f in futures]
    answered_while_held = [f.result() for f, done in zip(futures, at_once, strict=True) if done]
    later = [f.result() for f, done in zip(futures, at_once, strict=True) if not done]
    assert depth == bound, "the queue holds exactly its bound"
    assert held >= 1
    assert len(answered_while_held) == n - bound - held
    for r in answered_while_held:
        assert_error_shape(r, 503, "queue_full")
        assert int(r.headers["retry-after"]) >= 1
    assert [r.status_code for r in later] == [200] * (bound + held), Counter(r.status_code for r in later)
    assert metric(gated_server, "mnist_requests_dropped_total", 'reason="queue_full"') == refusals + n - bound - held


# ---------------------------------------------------------------------------------------------- overload
@pytest.mark.slow
def test_overload_sheds_load_and_recovers(tiny_repo: Path, tmp_path: Path) -> None:
    """A short version of ``python -m reliability.overload``: functional properties only, never speed."""
    rep = run_overload(
        OverloadConfig(tiny_repo, duration_s=6, capacity_s=2, connections=256, probe_rate=20,
                       recovery_timeout_s=20, server_args=("--max-inflight-requests", "16"), log_dir=tmp_path)
    )  # fmt: skip
    print("\n".join(rep.lines()))
    assert rep.other_5xx == 0, rep.statuses
    assert set(rep.statuses) <= {"200", "503"}, rep.statuses
    assert rep.refused > 0, "256 connections against an in-flight limit of 16 must be shed"
    assert rep.accepted_rps > 0
    assert set(rep.probe_statuses) <= {"200", "503 too_many_requests", "503 queue_full", "not_sent"}
    assert set(rep.fresh_statuses) == {"200"}, "liveness on a new connection must be answered under overload"
    assert rep.rss_max_mb - rep.rss_start_mb < 200, (rep.rss_start_mb, rep.rss_max_mb)
    # Recovery as behaviour: the backlog drains and requests are served again. (The report also says when
    # latency came back near the idle baseline; that depends on the machine's other load, so it is shown,
    # not asserted.)
    assert rep.idle_after, "requests stayed queued or in progress after the load stopped"
    assert rep.after_statuses == {"200": 5}, rep.after_statuses
    assert rep.exit_code == 0
    assert not log_failures((tmp_path / "overload-server.log").read_text()), "overload is no error: none logged"


def test_inflight_limit_refuses_at_once_and_spares_probes(tiny_repo: Path, tmp_path: Path) -> None:
    """With the only inference slot taken, inference is refused without waiting for a slot (503, Retry-After,
    error shape) while health, readiness and metrics still answer; a body still uploading holds no slot."""
    engine = Engine(tmp_path / "engine")
    srv = start_server(tiny_repo, tmp_path, "--max-inflight-requests", "1", "--max-batch-size", "1",
                       "--bulk-chunk-images", "1", launcher=engine.launcher())  # fmt: skip
    try:
        with socket.create_connection(("127.0.0.1", srv.port)) as uploading, srv.client() as c:
            uploading.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 100\r\n\r\n{")  # fmt: skip
            assert c.post("/v1/predict", json={"image": image()}).status_code == 200

            raw = np.random.default_rng(0).integers(0, 256, (8, 784), dtype=np.uint8).tobytes()
            with ThreadPoolExecutor(1) as pool, engine.holding():
                bulk = pool.submit(httpx.post, f"{srv.url}/v1/predict/batch", content=raw, timeout=120,
                                   headers={"content-type": "application/octet-stream"})  # fmt: skip
                wait_until(lambda: engine.in_progress() >= 1, what="the bulk request held in the engine")
                refused = c.post("/v1/predict", json={"image": image()})
                health = [c.get(p).status_code for p in ("/healthz", "/readyz", "/metrics", "/v1/models")]
                assert not bulk.done()
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"] == "application/json"
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "too_many_requests"
        assert set(refused.json()["error"]) == {"code", "message", "request_id"}
        assert health == [200, 200, 200, 200]
        assert bulk.result().status_code == 200
    finally:
        engine.release()
        assert_clean_shutdown(srv)


def test_a_refusal_is_decided_from_the_headers_and_held_for_retry_after(tiny_repo: Path, tmp_path: Path) -> None:
    """With the only inference slot taken, a request whose body has not arrived is refused from its headers,
    its 503 held for the ``Retry-After`` second (default ``refusal_delay_s``) with the connection's reading
    paused: a client retrying at once cannot make the event loop refuse as fast as it can. Probes are answered
    meanwhile, the refusal is counted, and uvicorn logs no "Invalid HTTP request" warning for it."""
    engine = Engine(tmp_path / "engine")
    srv = start_server(tiny_repo, tmp_path, "--max-inflight-requests", "1", "--max-batch-size", "1",
                       "--bulk-chunk-images", "1", launcher=engine.launcher())  # fmt: skip
    try:
        raw = np.random.default_rng(0).integers(0, 256, (8, 784), dtype=np.uint8).tobytes()
        with ThreadPoolExecutor(1) as pool, engine.holding():
            bulk = pool.submit(httpx.post, f"{srv.url}/v1/predict/batch", content=raw, timeout=120,
                               headers={"content-type": "application/octet-stream"})  # fmt: skip
            wait_until(lambda: engine.in_progress() >= 1, what="the bulk request held in the engine")
            with socket.create_connection(("127.0.0.1", srv.port)) as s:
                start = time.perf_counter()
                s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100000\r\n\r\n{")  # fmt: skip
                health = httpx.get(f"{srv.url}/healthz", timeout=10).status_code
                probed_s = time.perf_counter() - start
                data = read_until_closed(s, 30)
                refused_s = time.perf_counter() - start
            assert not bulk.done()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), data[:200]
        assert b"\r\nretry-after: 1\r\n" in head.lower()
        assert json.loads(body)["error"]["code"] == "too_many_requests"
        assert health == 200
        assert probed_s < refused_s, (probed_s, refused_s)  # the probe did not wait for the held refusal
        assert refused_s >= 0.9, refused_s  # held (a lower bound: a slow machine only makes it longer)
        assert metric(srv, "mnist_requests_dropped_total", 'reason="too_many_requests"') >= 1
        assert bulk.result().status_code == 200
    finally:
        engine.release()
        assert_clean_shutdown(srv)
    assert "Invalid HTTP request" not in srv.logs()


def test_a_body_declared_over_the_limit_costs_nothing_in_flight() -> None:
    """It will be refused with 413 unread, so it must not take the in-flight budget (nor be refused 503 for it,
    as it was under a server with no protocol guard in front: granian, bench/guards_check.py)."""
    from service.inflight import JSON_WEIGHT, InflightLimit, body_cost

    def scope(*headers: tuple[bytes, bytes]) -> dict[str, object]:
        return {"headers": list(headers)}

    assert body_cost(scope((b"content-length", b"60")), 100) == 60
    assert body_cost(scope((b"content-length", b"60"), (b"content-type", b"application/json")), 100) == 60 * JSON_WEIGHT
    assert body_cost(scope((b"transfer-encoding", b"chunked")), 100) == 100
    assert body_cost(scope((b"content-length", b"101")), 100) == 0
    gate = InflightLimit(None, 16, max_body_bytes_in_flight=100, max_body_bytes=100)  # type: ignore[arg-type]
    assert gate.early_refusal("POST", "/v1/predict/batch", scope((b"content-length", b"90"))) is None
    assert gate.early_refusal("POST", "/v1/predict/batch", scope((b"content-length", b"101"))) is None  # to its 413
    assert gate.body_bytes == 90


def test_admission_from_the_headers_reserves_each_body_at_once() -> None:
    """Requests whose headers arrive in the same event-loop iteration are admitted against each other: the
    guard's ``early_refusal`` reserves an admitted body's cost at once (a request alone is always admitted,
    the next one that would pass the budget is refused), and the app layer releases exactly that reservation
    when the response ends, without checking the request again."""
    from service.inflight import RESERVED, InflightLimit

    seen: list[int] = []

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        seen.append(gate.body_bytes)

    gate = InflightLimit(app, 16, max_body_bytes_in_flight=100, max_body_bytes=100)  # type: ignore[arg-type]
    headers = [(b"content-type", b"application/octet-stream"), (b"content-length", b"60")]
    first: dict[str, object] = {"headers": headers}
    second: dict[str, object] = {"headers": headers}
    assert gate.early_refusal("POST", "/v1/predict/batch", first) is None
    assert first[RESERVED] == 60
    assert gate.body_bytes == 60
    refusal = gate.early_refusal("POST", "/v1/predict/batch", second)
    assert refusal is not None
    assert b"too_many_requests" in refusal[1]
    assert RESERVED not in second
    assert gate.body_bytes == 60

    async def serve() -> None:
        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: object) -> None:
            pass

        scope = {"type": "http", "method": "POST", "path": "/v1/predict/batch", **first}
        await gate(scope, receive, send)

    asyncio.run(serve())
    assert seen == [60]  # admitted as reserved: not counted a second time
    assert gate.body_bytes == 0
    assert gate.processing == 0


# ---------------------------------------------------------------------------------------------- slow clients
@pytest.fixture(scope="module")
def guarded_server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tiny_repo, tmp_path_factory.mktemp("guarded"), "--header-timeout-s", "1",
                       "--body-timeout-s", "1", "--max-header-bytes", "8192")  # fmt: skip
    yield srv
    assert_clean_shutdown(srv)


def test_slow_clients_cannot_exhaust_the_service(guarded_server: Server) -> None:
    """Idle connections, headers sent a byte at a time (slowloris) and trickling bodies are all closed by
    their timeouts, while normal requests keep being answered."""
    port = guarded_server.port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    slow_headers = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    slow_bodies = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    stop = threading.Event()

    def trickle() -> None:  # one header byte per connection every 0.1 s: never a complete request
        for s in slow_headers:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
        while not stop.is_set():
            for s in slow_headers:
                with contextlib.suppress(OSError):
                    s.sendall(b"X")
            stop.wait(0.1)

    for s in slow_bodies:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5000\r\n\r\n{\"image\": [")  # fmt: skip
    feeder = threading.Thread(target=trickle)
    feeder.start()
    try:
        with guarded_server.client() as c:
            for i in range(20):
                assert c.post("/v1/predict", json={"image": image(i)}).status_code == 200
        closed_headers = [read_until_closed(s, 10) for s in slow_headers]
        closed_bodies = [read_until_closed(s, 10) for s in slow_bodies]
        closed_idle = [read_until_closed(s, 10) for s in idle]
    finally:
        stop.set()
        feeder.join()
        for s in idle + slow_headers + slow_bodies:
            s.close()
    for data in closed_headers + closed_idle:
        assert data.startswith(b"HTTP/1.1 408 "), data[:100]
        assert b'"code":"header_timeout"' in data
    for data in closed_bodies:  # 400 body_timeout from the route, or closed by the connection's body timer
        assert data == b"" or (data.startswith(b"HTTP/1.1 400 ") and b'"code":"body_timeout"' in data), data[:100]
    with guarded_server.client() as c:  # and the service is still fine
        assert c.post("/v1/predict", json={"image": image()}).status_code == 200


def test_a_body_trickling_into_a_route_without_its_own_timeout_is_cut_off(guarded_server: Server) -> None:
    with socket.create_connection(("127.0.0.1", guarded_server.port)) as s:
        s.sendall(b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 500\r\n\r\n{\"request_id\": ")  # fmt: skip
        read_until_closed(s, 10)  # closed by the body timer (the route reads with FastAPI, no timeout)


def test_oversized_headers_get_431_and_cost_no_memory(guarded_server: Server) -> None:
    rss_before = psutil.Process(guarded_server.proc.pid).memory_info().rss
    with socket.create_connection(("127.0.0.1", guarded_server.port)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        try:
            for _ in range(4096):  # up to 32 MiB of headers: the server must cut it off long before
                s.sendall(b"X-Pad: " + b"a" * 8000 + b"\r\n")
                sent += 8000
        except OSError:
            pass
        data = read_until_closed(s, 10)
    assert data.startswith(b"HTTP/1.1 431 "), data[:100]
    assert b'"code":"headers_too_large"' in data
    assert sent < 8 * 2**20, "the server kept reading headers past its limit"
    rss_after = psutil.Process(guarded_server.proc.pid).memory_info().rss
    assert rss_after - rss_before < 32 * 2**20
    # One big header line, and a long URL, are refused the same way.
    for request in (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
                    b"GET /healthz?" + b"q" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"):  # fmt: skip
        with socket.create_connection(("127.0.0.1", guarded_server.port)) as s:
            s.sendall(request)
            assert read_until_closed(s, 10).startswith(b"HTTP/1.1 431 ")


def test_garbage_and_wrong_content_length(guarded_server: Server) -> None:
    """Not HTTP at all, a non-numeric or negative Content-Length, a body longer than declared (the rest is
    parsed as the next request), one shorter (then the client hangs up): 4xx in the JSON shape or a clean
    close, and the service keeps serving."""
    cases = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200),  # a TLS ClientHello on the plain port
        b"HELLO\r\n\r\n",
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: abc\r\n\r\n{}",
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: -1\r\n\r\n{}",
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
        b"{}GARBAGE GARBAGE\r\n\r\n",
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n0\r\n\r\n",
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ]
    for raw in cases:
        with socket.create_connection(("127.0.0.1", guarded_server.port)) as s:
            s.sendall(raw)
            data = read_until_closed(s, 10)
        statuses = re.findall(rb"^HTTP/1.1 (\d{3}) ", data, re.MULTILINE)
        assert statuses, (raw[:60], data[:200])
        assert all(400 <= int(st) < 500 for st in statuses), (raw[:60], data[:300])
        assert_no_leak(data.decode("latin-1"))
    with socket.create_connection(("127.0.0.1", guarded_server.port)) as s:  # declared 5000, sent 10, hung up
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5000\r\n\r\n{\"image\":[")  # fmt: skip
    with guarded_server.client() as c:
        assert c.post("/v1/predict", json={"image": image()}).status_code == 200
    assert "unhandled error" not in guarded_server.logs()


# ---------------------------------------------------------------------------------------------- SIGTERM drain
class KeepAliveClient(threading.Thread):
    """Sends requests back to back on one persistent ``http.client`` connection, reconnecting after a
    ``Connection: close``. Counts what was sent and what was answered: a request whose bytes were written
    and that got no response (reset, closed without an answer) is *lost*; a refused connect is not (the
    request never reached the server), and ends the client."""

    def __init__(self, port: int, body: bytes, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.body, self.stop = port, body, stop
        self.sent = self.answered = 0
        self.lost: list[str] = []
        self.statuses: Counter[str] = Counter()

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        headers = {"Content-Type": "application/json"}
        while not self.stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                try:
                    conn.connect()
                except ConnectionRefusedError:
                    return  # the listener is closed: nothing more can reach the server
            try:
                conn.request("POST", "/v1/predict", body=self.body, headers=headers)
            except OSError as exc:  # written into a connection the server had closed: the keep-alive race
                self.sent += 1
                self.lost.append(f"send: {exc!r}")
                conn.close()
                conn = None
                continue
            self.sent += 1
            try:
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self.lost.append(f"response: {exc!r}")
                conn.close()
                conn = None
                continue
            self.answered += 1
            code = json.loads(data)["error"]["code"] if resp.status != 200 else ""
            self.statuses[f"{resp.status} {code}".strip()] += 1
            if resp.will_close:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_sigterm_under_keepalive_load_loses_no_request(tiny_repo: Path, tmp_path: Path, event_loop: str) -> None:
    srv = start_server(tiny_repo, tmp_path, "--drain-timeout-s", "15", "--event-loop", event_loop)
    body = json.dumps({"image": image()}).encode()
    stop = threading.Event()
    clients = [KeepAliveClient(srv.port, body, stop) for _ in range(32)]
    readiness: list[str] = []

    def watch_readiness() -> None:  # its own kept-alive connection, polling /readyz
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        while not stop.is_set():
            try:
                conn.request("GET", "/readyz")
                resp = conn.getresponse()
                doc = json.loads(resp.read())
                readiness.append(f"{resp.status} {doc['status'] if resp.status == 200 else doc['error']['code']}")
                if resp.will_close:
                    return
            except OSError:
                return
            stop.wait(0.005)

    watcher = threading.Thread(target=watch_readiness, daemon=True)
    try:
        for c in clients:
            c.start()
        watcher.start()
        wait_until(lambda: sum(c.answered for c in clients) >= 1000, 120, what="1000 answered requests")
        signalled = time.monotonic()
        srv.proc.send_signal(15)
        code = srv.proc.wait(timeout=120)
        exit_s = time.monotonic() - signalled
    finally:
        stop.set()
        for c in clients:
            c.join(30)
        watcher.join(10)
        if srv.proc.poll() is None:
            srv.terminate()
    lost = [x for c in clients for x in c.lost]
    sent, answered = sum(c.sent for c in clients), sum(c.answered for c in clients)
    statuses = sum((c.statuses for c in clients), Counter())
    print(f"{event_loop}: sent {sent}, answered {answered}, lost {len(lost)}, statuses {dict(statuses)}, "
          f"exit after {exit_s:.2f} s")  # fmt: skip
    assert code == 0, srv.logs()
    assert not lost, lost[:5]
    assert sent == answered
    assert set(statuses) <= {"200", "503 draining"}, statuses
    assert readiness[0] == "200 ready"
    assert readiness[-1] == "503 draining", readiness[-3:]
    assert "drain timeout" not in srv.logs(), "the drain did not finish on its own within its grace period"
    assert not log_failures(srv.logs())


def test_drain_grace_period_bounds_a_client_that_never_finishes(tiny_repo: Path, tmp_path: Path) -> None:
    """A connection stuck mid-request (headers never complete) cannot hold the process past its grace period:
    the process exits 0 on its own after the grace period (2 s), long before the connection's own header
    timeout (600 s) would close it, and well before the test would kill it (120 s)."""
    srv = start_server(tiny_repo, tmp_path, "--drain-timeout-s", "2", "--header-timeout-s", "600")
    with socket.create_connection(("127.0.0.1", srv.port)) as stuck:
        stuck.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
        client_port = stuck.getsockname()[1]
        server = psutil.Process(srv.proc.pid)
        wait_until(lambda: any(c.raddr and c.raddr.port == client_port for c in server.net_connections()),
                   what="the server to accept the connection")  # fmt: skip
        code = srv.terminate(timeout=120)
    assert code == 0, srv.logs()
    assert "drain timeout: closing the remaining connections" in srv.logs()
    assert not log_failures(srv.logs())


# ---------------------------------------------------------------------------------------------- faults
def test_a_client_that_disconnects_while_queued_is_dropped(tiny_repo: Path, tmp_path: Path) -> None:
    """The engine is held by one batch; a second request waits in the queue, its client hangs up: the item is
    dropped before compute (counted as cancelled, logged as 499) and the batcher goes on serving."""
    engine = Engine(tmp_path / "engine")
    srv = start_server(tiny_repo, tmp_path, "--max-batch-size", "1", "--bulk-chunk-images", "1",
                       launcher=engine.launcher())  # fmt: skip
    try:
        processed = metric(srv, "mnist_images_processed_total", 'model="tiny",version="1"')
        with ThreadPoolExecutor(1) as holder, engine.holding():
            first = holder.submit(post_one, srv.url, 1)
            wait_until(lambda: engine.in_progress() == 1, what="the first request held in the engine")
            body = json.dumps({"image": image(7)}).encode()
            with socket.create_connection(("127.0.0.1", srv.port)) as s:
                s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
                client_port = s.getsockname()[1]
                wait_until(lambda: queued(srv) == 1, what="the request to be queued behind the held batch")
            # The client has hung up; once the server has closed its end, it knows (and the engine is still held).
            server = psutil.Process(srv.proc.pid)
            wait_until(lambda: not any(c.raddr and c.raddr.port == client_port for c in server.net_connections()),
                       what="the server to see the hang-up")  # fmt: skip
            assert not first.done()
        assert first.result().status_code == 200
        wait_until(lambda: metric(srv, "mnist_requests_dropped_total", 'reason="cancelled"') == 1,
                   what="the cancelled counter")  # fmt: skip
        assert post_one(srv.url, 8).status_code == 200
        # the first image and the one after: the abandoned image never reached the engine
        assert metric(srv, "mnist_images_processed_total", 'model="tiny",version="1"') == processed + 2
        assert metric(srv, "http_requests_total", 'method="POST",route="/v1/predict",status="499"') == 1
    finally:
        engine.release()
        assert_clean_shutdown(srv)


ENGINE_ERROR = "inference failed for a batch"  # the one error-level record an engine fault may cause


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("faulty-models")
    write_model(repo, "faulty", "1", blob=faulty_onnx())
    srv = start_server(repo, tmp_path_factory.mktemp("faulty-srv"))
    yield srv
    assert_clean_shutdown(srv, allow=[ENGINE_ERROR])


def test_an_engine_error_fails_only_its_batch_and_is_logged_once(faulty_server: Server) -> None:
    poisoned = image(3)
    poisoned[0] = SENTINEL
    log_start = len(faulty_server.logs())  # the server is shared: count only what this test causes
    failures = metric(faulty_server, "mnist_requests_dropped_total", 'reason="engine_error"')
    with faulty_server.client() as c:
        assert c.post("/v1/predict", json={"image": image(1)}).status_code == 200
        failed = c.post("/v1/predict", json={"image": poisoned})
        after = [c.post("/v1/predict", json={"image": image(i)}).status_code for i in range(5)]
        batch = c.post("/v1/predict/batch", json={"images": [image(4), image(5)]})
    err = assert_error_shape(failed, 500, "inference_failed")
    error_id = re.fullmatch(r"inference failed \(error id ([0-9a-f]{12})\)", err["message"])
    assert error_id, err["message"]
    assert_no_leak(failed.text)
    assert after == [200] * 5
    assert batch.status_code == 200
    wait_until(lambda: error_id.group(1) in faulty_server.logs()[log_start:], what="the error in the log")
    new_lines = faulty_server.logs()[log_start:].split("\n")
    records = [json.loads(line) for line in new_lines if line.startswith("{")]
    errors = [r for r in records if r["level"] == "error"]
    assert len(errors) == 1, errors
    assert errors[0]["message"] == ENGINE_ERROR
    assert errors[0]["error_id"] == error_id.group(1)
    assert "Reshape" in errors[0]["exception"]  # the cause is in the log, not in the response
    assert metric(faulty_server, "mnist_requests_dropped_total", 'reason="engine_error"') == failures + 1


def test_an_engine_error_in_a_shared_batch_fails_all_its_callers_only(faulty_server: Server) -> None:
    """Concurrent requests share engine calls: the poisoned one fails its whole batch (500 each), the
    service keeps serving; no caller gets anything but 200 or 500 inference_failed."""
    poisoned = image(3)
    poisoned[0] = SENTINEL

    def one(i: int) -> httpx.Response:
        with httpx.Client(timeout=30) as c:
            return c.post(f"{faulty_server.url}/v1/predict", json={"image": poisoned if i == 8 else image(i)})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(16)))
    assert responses[8].status_code == 500
    for r in responses:
        assert r.status_code in (200, 500)
        if r.status_code == 500:
            assert_error_shape(r, 500, "inference_failed")
    with faulty_server.client() as c:
        assert c.post("/v1/predict", json={"image": image(9)}).status_code == 200


def _start_and_fail(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.server", "--model-repository", str(repo), "--port", "0", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("no_repository", "does not exist"),
        ("empty_file", "not a loadable ONNX model"),
        ("model_file_missing", "cannot be read"),
        ("model_is_a_folder", "cannot be read"),
        ("sha256_mismatch", "does not match metadata"),
        ("metadata_not_json", "unreadable metadata"),
        ("metadata_missing", "no metadata.json"),
        ("wrong_classes", "does not match 10 class labels"),
        ("unknown_version", "has no version 7"),
    ],
)
def test_a_bad_model_stops_the_start_with_a_clear_message(tmp_path: Path, setup: str, message: str) -> None:
    repo = tmp_path / "repo"
    args: tuple[str, ...] = ()
    if setup != "no_repository":
        folder = write_model(repo, "m", "1")
        meta = json.loads((folder / "metadata.json").read_text())
    if setup == "empty_file":
        (folder / "model.onnx").write_bytes(b"")
        meta["sha256"] = ""
    elif setup == "model_file_missing":
        (folder / "model.onnx").unlink()
    elif setup == "model_is_a_folder":
        (folder / "model.onnx").unlink()
        (folder / "model.onnx").mkdir()
    elif setup == "sha256_mismatch":
        meta["sha256"] = "0" * 64
    elif setup == "wrong_classes":
        write_model(repo, "m", "1", blob=tiny_onnx(0, classes=7))
        meta = json.loads((folder / "metadata.json").read_text())
    elif setup == "unknown_version":
        args = ("--model-version", "7")
    if setup not in ("no_repository", "metadata_not_json", "metadata_missing"):
        (folder / "metadata.json").write_text(json.dumps(meta))
    if setup == "metadata_not_json":
        (folder / "metadata.json").write_text("{not json")
    elif setup == "metadata_missing":
        (folder / "metadata.json").unlink()
    proc = _start_and_fail(repo, *args)
    assert proc.returncode != 0, proc.stdout
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_invalid_settings_stop_the_start(tmp_path: Path) -> None:
    proc = _start_and_fail(tmp_path, "--max-header-bytes", "10")
    assert proc.returncode == 2
    assert "max_header_bytes" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- security
def _npy_header(descr: str, shape: str, fortran: str = "False") -> bytes:
    header = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}".encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


HOSTILE_REQUESTS: list[tuple[str, str, dict[str, str], bytes]] = [
    ("POST", "/v1/predict", {"content-type": "application/json"}, b'{"image": [0.1, '),
    ("POST", "/v1/predict", {"content-type": "application/json"}, b"\xff\xfe\x00garbage"),
    ("POST", "/v1/predict", {"content-type": "application/json"}, b'{"image": [1e309]}'),
    ("POST", "/v1/predict", {"content-type": "application/json"}, b"[" * 100_000 + b"]" * 100_000),
    ("POST", "/v1/predict", {"content-type": "application/json"}, b'{"image": ' + b"9" * 5000 + b"}"),
    ("POST", "/v1/predict", {"content-type": "application/json"}, b'{"image": "/etc/passwd"}'),
    ("POST", "/v1/predict", {"content-type": "image/png"}, b"\x89PNG\r\n\x1a\n" + b"\x00" * 100),
    ("POST", "/v1/predict", {"content-type": "multipart/form-data; boundary=x"}, b"--x\r\nbroken"),
    ("POST", "/v1/predict", {"content-type": "text/x-python"}, b"import os"),
    ("POST", "/v1/predict/batch", {"content-type": "application/x-npy"}, _npy_header("|O", "(1, 784)") + b"\x80\x04"),
    ("POST", "/v1/predict/batch", {"content-type": "application/x-npy"}, _npy_header("<f8", "(10**12, 784)")),
    ("POST", "/v1/predict/batch", {"content-type": "application/x-npy"}, b"\x93NUMPY\x09\x00junk"),
    ("POST", "/v1/predict/batch", {"content-type": "application/octet-stream"}, b"\x01" * 785),
    ("POST", "/v1/feedback", {"content-type": "application/json"}, b'{"request_id": "x", "label": 99}'),
    ("POST", "/v1/feedback", {"content-type": "application/json"}, b"\xff"),
    ("POST", "/v2/models/nope/infer", {"content-type": "application/json"}, b"{}"),
    ("POST", "/v2/models/tiny/infer", {"content-type": "application/json"}, b'{"inputs": [{"name": 1}]}'),
    ("GET", "/v1/predict", {}, b""),
    ("GET", "/admin/models", {"authorization": "Bearer guess"}, b""),
    ("DELETE", "/v1/models", {}, b""),
]


@pytest.fixture(scope="module")
def default_server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The service with its default settings (no admin token, no CORS origins)."""
    srv = start_server(tiny_repo, tmp_path_factory.mktemp("default-srv"))
    yield srv
    assert_clean_shutdown(srv)  # hostile input is the client's problem: no error-level record (it would page)


@pytest.mark.parametrize(("method", "path", "headers", "body"), HOSTILE_REQUESTS)
def test_hostile_requests_get_a_4xx_that_leaks_nothing(
    default_server: Server, method: str, path: str, headers: dict[str, str], body: bytes
) -> None:
    with default_server.client() as c:
        r = c.request(method, path, headers=headers, content=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert_no_leak(r.text)
    assert_no_leak(str(r.headers))
    if not path.startswith("/v2"):  # the v2 protocol has its own error shape, {"error": "message"}
        assert set(r.json()["error"]) == {"code", "message", "request_id"}


@pytest.mark.parametrize(
    "path",
    ["/../../etc/passwd", "/static/../service/app.py", "/static/..%2f..%2fservice%2fapp.py",
     "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/static/..%5c..%5cservice%5capp.py", "/static/app.js%00.py"],
)  # fmt: skip
def test_no_path_escapes_the_static_assets(default_server: Server, path: str) -> None:
    with socket.create_connection(("127.0.0.1", default_server.port)) as s:  # raw: no client-side normalising
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = read_until_closed(s, 10)
    assert data.startswith(b"HTTP/1.1 404 "), data[:200]
    assert b"root:" not in data
    assert b"import " not in data


def test_declared_oversized_body_is_refused_before_it_is_sent(default_server: Server) -> None:
    with socket.create_connection(("127.0.0.1", default_server.port)) as s:
        s.sendall(b"POST /v1/predict/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                  b"Content-Length: 1000000000\r\n\r\n")  # fmt: skip
        s.settimeout(10)
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413 "), head[:100]
    chunked = b"".join(b"%x\r\n%s\r\n" % (2**20, b"\x00" * 2**20) for _ in range(20)) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", default_server.port)) as s:
        s.sendall(b"POST /v1/predict/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        with contextlib.suppress(OSError):  # the server may answer and close before all 20 MiB are in
            s.sendall(chunked)
        s.settimeout(10)
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413 "), head[:100]


def test_cors_is_off_by_default(default_server: Server) -> None:
    origin = {"origin": "https://evil.example"}
    with default_server.client() as c:
        get = c.get("/healthz", headers=origin)
        pre = c.options("/v1/predict", headers={**origin, "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in get.headers
    assert "access-control-allow-origin" not in pre.headers


def test_cors_allows_only_the_configured_origins(tiny_repo: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_repo, tmp_path, env={"MNIST_CORS_ORIGINS": '["https://app.example"]'})
    try:
        with srv.client() as c:
            good = c.get("/healthz", headers={"origin": "https://app.example"})
            bad = c.get("/healthz", headers={"origin": "https://evil.example"})
            pre = c.options("/v1/predict", headers={"origin": "https://app.example",
                                                    "access-control-request-method": "POST"})  # fmt: skip
            predict = c.post("/v1/predict", json={"image": image()}, headers={"origin": "https://app.example"})
    finally:
        assert_clean_shutdown(srv)
    assert good.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in bad.headers
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    assert predict.status_code == 200
    assert predict.headers["access-control-allow-origin"] == "https://app.example"


def _admin_operations(server: Server) -> list[tuple[str, str]]:
    doc = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    ops = []
    for path, item in doc["paths"].items():
        for method in item:
            if method in ("get", "post", "put", "patch", "delete"):
                concrete = re.sub(r"\{[^}]+\}", "1", path)
                ops.append((method.upper(), concrete))
    return ops


def test_no_state_changing_endpoint_is_open_without_a_token(default_server: Server, tiny_repo: Path,
                                                            tmp_path: Path) -> None:  # fmt: skip
    """Every operation of the API that is not inference, feedback or read-only metadata is refused without
    the admin token: 404 when no token is configured, 401 with a wrong one."""
    public_posts = {"/v1/predict", "/v1/predict/batch", "/v1/feedback", "/v2/repository/index"}
    ops = [(m, p) for m, p in _admin_operations(default_server)
           if m != "GET" and p not in public_posts and not p.endswith("/infer")]  # fmt: skip
    ops += [(m, p) for m, p in _admin_operations(default_server) if p.startswith("/admin")]
    assert ops, "no admin operation found in the OpenAPI document"
    assert all(p.startswith("/admin") for _, p in ops), ops
    with default_server.client() as c:
        for method, path in ops:
            assert c.request(method, path).status_code == 404, (method, path)
    srv = start_server(tiny_repo, tmp_path, env={"MNIST_ADMIN_TOKEN": "s3cret-token"})
    try:
        with srv.client() as c:
            for method, path in ops:
                missing = c.request(method, path)
                wrong = c.request(method, path, headers={"authorization": "Bearer s3cret-tokeX"})
                assert missing.status_code == 401, (method, path, missing.text)
                assert wrong.status_code == 401, (method, path, wrong.text)
                assert missing.headers["www-authenticate"].startswith("Bearer")
                assert "s3cret" not in missing.text + wrong.text
            assert c.get("/admin/models", headers={"authorization": "Bearer s3cret-token"}).status_code == 200
    finally:
        assert_clean_shutdown(srv)
    assert "s3cret-token" not in srv.logs()


def test_limits_are_settings_with_safe_defaults() -> None:
    from service.settings import Settings, build_parser

    s = Settings()
    assert s.host == "127.0.0.1"  # nothing listens beyond the machine unless asked (containers set 0.0.0.0)
    assert 0 < s.max_body_bytes <= 64 * 2**20
    assert 0 < s.max_images_per_request <= 65536
    assert 0 < s.max_png_pixels <= 2**26
    assert 0 < s.max_header_bytes <= 64 * 2**10
    assert 0 < s.header_timeout_s <= 60
    assert 0 < s.body_timeout_s <= 60
    assert 0 < s.request_timeout_s <= 60
    assert s.max_inflight_requests > 0
    assert s.max_queue_images > 0
    assert s.admin_token is None
    assert s.cors_origins == []
    help_text = build_parser().format_help()
    for flag in ("--max-body-bytes", "--max-images-per-request", "--max-header-bytes", "--request-timeout-s",
                 "--header-timeout-s", "--body-timeout-s", "--max-inflight-requests", "--admin-token",
                 "--cors-origins"):  # fmt: skip
        assert flag in help_text
