"""Hostile clients at the HTTP layer, and proof that memory stays bounded.

Each case is what an attacker would send to a service with its default settings, anonymous, on 127.0.0.1;
the answer must be a clear 4xx/5xx in the service's JSON shape (never a 500, never a hang), and the process's
peak resident memory (``VmHWM`` in ``/proc/<pid>/status``, read from a fresh server where the case needs its
own peak) must stay far below the pod's limit (512 MiB in k8s/base/deployment.yaml). While abuse runs, a
probe process keeps asking ``/healthz``: the assertion is that every probe is answered (none hangs for
``PROBE_HANG_S``); the latencies measured, and how many exceeded 100 ms and the Kubernetes probe's 2 s
timeout, are printed (``-s``) and recorded in docs/reliability.md, not asserted, since they depend on the machine (the
development machine's other jobs put its load average at 7-18 on 2 CPUs while these were measured).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import io
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.settings import Settings
from tests.helpers import ROOT, Server, free_port, read_until_closed, start_server

MiB = 2**20
POD_LIMIT_MIB = 512  # k8s/base/deployment.yaml resources.limits.memory
BUDGET_MIB = 0.6 * POD_LIMIT_MIB  # peak RSS under the worst mix: 60% of the pod limit
K8S_PROBE_TIMEOUT_S = 2.0  # k8s/base/deployment.yaml livenessProbe.timeoutSeconds
PROBE_TARGET_MS = 100  # the liveness target (docs/reliability.md): reported, not asserted
PROBE_HANG_S = 10.0  # a probe not answered within this is a failure (a stalled event loop), whatever the machine
MAX_BODY = 16 * MiB  # the default max_body_bytes
ADMIN_TOKEN = "hostile-admin-token"
MODEL = "mnist-mlp"
IMAGES = np.random.default_rng(7).integers(0, 256, (4096, 784), dtype=np.uint8)
JSON_LIMIT = Settings.model_fields["max_json_bytes"].default


def json_batch_under_the_limit() -> bytes:
    """The largest JSON batch of 4-character numbers under the default JSON limit (each image 3,921 bytes)."""
    image = b"[" + b",".join([b"0.25"] * 784) + b"]"
    return b'{"images": [' + b",".join([image] * ((JSON_LIMIT - 16) // (len(image) + 1))) + b"]}"


# ---------------------------------------------------------------------------------------------- helpers
def proc_status(pid: int, key: str) -> float:
    """A ``/proc/<pid>/status`` memory line (VmRSS, VmHWM) in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(rf"^{key}:\s+(\d+) kB$", text, re.MULTILINE)
    assert found, f"{key} not in /proc/{pid}/status"
    return int(found.group(1)) / 1024


def hwm(server: Server) -> float:
    return proc_status(server.proc.pid, "VmHWM")


def rss(server: Server) -> float:
    return proc_status(server.proc.pid, "VmRSS")


def parse(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers lower-cased, body) of the first response in ``data``."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    found = re.match(r"HTTP/1\.[01] (\d{3}) ", lines[0])
    assert found, data[:200]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(found.group(1)), headers, body


def assert_service_error(data: bytes, status: int, code: str, path: str = "") -> dict[str, object]:
    """One response in the service's error shape: status, JSON content type, code, and a request id that
    matches the ``X-Request-ID`` header when there is one. Under /v2 the shape is that protocol's,
    ``{"error": "message"}``."""
    got, headers, body = parse(data)
    assert got == status, data[:300]
    assert headers["content-type"].startswith("application/json"), headers
    err = json.loads(body)["error"]
    if path.startswith("/v2/"):
        assert isinstance(err, str), err
        assert err
        return {"message": err}
    assert set(err) == {"code", "message", "request_id"}, err
    assert err["code"] == code, err
    assert err["message"]
    if "x-request-id" in headers:
        assert err["request_id"] == headers["x-request-id"]
    return dict(err)


def send_then_read(port: int, head: bytes, body_chunks: Iterable[bytes] = (), timeout_s: float = 30) -> bytes:
    """Send ``head``, then body chunks until the server stops reading, then read its answer."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head)
        with contextlib.suppress(OSError):  # the server answers and closes before the rest is in
            for chunk in body_chunks:
                s.sendall(chunk)
        return read_until_closed(s, timeout_s)


def chunked(piece: bytes, total: int) -> Iterator[bytes]:
    """``total`` bytes of ``piece`` repeated, in chunked transfer coding, 1 MiB a chunk."""
    block = (piece * (MiB // len(piece) + 1))[:MiB]
    sent = 0
    while sent < total:
        yield b"%x\r\n%s\r\n" % (len(block), block)
        sent += len(block)
    yield b"0\r\n\r\n"


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def v2_binary_body(images: np.ndarray) -> tuple[bytes, int]:
    """An Open Inference Protocol request with UINT8 images in the binary tensor data extension."""
    header = json.dumps({
        "inputs": [{"name": "pixels", "shape": list(images.shape), "datatype": "UINT8",
                    "parameters": {"binary_data_size": images.nbytes}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    return header + images.tobytes(), len(header)


_PROBE = """
import http.client, sys, time
port, interval_s, timeout_s = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
while True:
    start = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        conn.request("GET", "/healthz")
        status = conn.getresponse().status
        conn.close()
        print(status, (time.perf_counter() - start) * 1000, flush=True)
    except Exception as exc:
        print("failed", type(exc).__name__, flush=True)
    time.sleep(interval_s)
"""


class Prober:
    """Asks ``/healthz`` every ``interval_s`` on a new connection, from its own process (the load threads of
    this one would otherwise delay it on the GIL); keeps every latency, and every failure: no answer within
    ``PROBE_HANG_S``, a refused connection, a status other than 200."""

    def __init__(self, port: int, interval_s: float = 0.1, hang_s: float = PROBE_HANG_S) -> None:
        self.args = [sys.executable, "-c", _PROBE, str(port), str(interval_s), str(hang_s)]
        self.latencies_ms: list[float] = []
        self.failures: list[str] = []

    def __enter__(self) -> Prober:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        for line in out.splitlines():
            status, value = line.split()
            if status == "200":
                self.latencies_ms.append(float(value))
            else:
                self.failures.append(line)

    def summary(self) -> str:
        lat = sorted(self.latencies_ms)
        if not lat:
            return "no probe answered"
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        slow = sum(v > K8S_PROBE_TIMEOUT_S * 1000 for v in lat)
        over = sum(v > PROBE_TARGET_MS for v in lat)
        return (f"/healthz: {len(lat)} answered, {len(self.failures)} failed; p50 {statistics.median(lat):.1f} ms, "
                f"p99 {p99:.1f} ms, max {lat[-1]:.1f} ms, {over} over {PROBE_TARGET_MS} ms, "
                f"{slow} over {K8S_PROBE_TIMEOUT_S:g} s")  # fmt: skip


def run_for(seconds: float, workers: list[Callable[[threading.Event], None]]) -> None:
    """Run each worker in its own thread until ``seconds`` have passed, then stop and join them."""
    stop = threading.Event()
    threads = [threading.Thread(target=w, args=(stop,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a load thread did not stop"


_COUNT_LOCK = threading.Lock()
ODD_ANSWERS: list[bytes] = []  # the first answers other than 200 and 503 the posters got, for the failure message


def poster(port: int, path: str, headers: dict[str, str], body: bytes, statuses: Counter[int]) -> Callable[
        [threading.Event], None]:  # fmt: skip
    """A worker posting ``body`` back to back on fresh connections, counting the statuses it gets."""
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()  # fmt: skip

    def work(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                    s.sendall(head)
                    with contextlib.suppress(OSError):  # refused early: the server closed while we sent
                        s.sendall(body)
                    data = read_until_closed(s, 60)
            except OSError:
                data = b""
            status = parse(data)[0] if data else 0
            with _COUNT_LOCK:
                statuses[status] += 1
                if status not in (200, 503) and len(ODD_ANSWERS) < 5:
                    ODD_ANSWERS.append(data[:600])

    return work


# ---------------------------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the shipped model repository (admin tests add version folders to it)."""
    root = tmp_path_factory.mktemp("hostile-models")
    shutil.copytree(ROOT / "models" / MODEL / "1", root / MODEL / "1")
    return root


@contextlib.contextmanager
def fresh(repo: Path, tmp: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """A new server process: its VmHWM is this case's own peak."""
    srv = start_server(repo, tmp, *args, env=env)
    try:
        yield srv
    finally:
        code = srv.terminate()
        assert code == 0, srv.logs()[-3000:]


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Default settings, plus an admin token."""
    with fresh(repo, tmp_path_factory.mktemp("hostile-srv"), env={"MNIST_ADMIN_TOKEN": ADMIN_TOKEN}) as srv:
        yield srv
    assert "unhandled error" not in srv.logs()
    assert "Traceback" not in srv.logs()


# ---------------------------------------------------------------------------------------------- body size
BODY_ROUTES = [
    ("POST", "/v1/feedback"),
    ("POST", "/v1/predict"),
    ("POST", "/v1/predict/batch"),
    ("POST", f"/v2/models/{MODEL}/infer"),
    ("POST", "/v2/repository/index"),
    ("POST", f"/admin/models/{MODEL}/versions/1/load"),
    ("POST", "/no/such/route"),
    ("GET", "/healthz"),
]


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
def test_a_declared_oversized_body_is_413_before_it_is_read_on_every_route(server: Server, method: str,
                                                                           path: str) -> None:  # fmt: skip
    """512 MiB declared: the answer comes from the headers alone (nothing of the body is sent)."""
    head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"X-Request-ID: big-{path.count('/')}\r\nContent-Length: {512 * MiB}\r\n\r\n").encode()  # fmt: skip
    data = send_then_read(server.port, head)
    err = assert_service_error(data, 413, "payload_too_large", path)
    if not path.startswith("/v2/"):
        assert err["request_id"] == f"big-{path.count('/')}"


@pytest.mark.parametrize(("path", "piece"), [("/v1/feedback", b" "), ("/v1/feedback", b"[],"),
                                             ("/v1/predict/batch", b"\x00"), ("/v1/predict", b"\t")])  # fmt: skip
def test_a_chunked_body_past_the_limit_is_413_and_costs_no_memory(repo: Path, tmp_path: Path, path: str,
                                                                  piece: bytes) -> None:  # fmt: skip
    """64 MiB of whitespace or ``[]`` items, chunked (no declared size): 413 once 16 MiB are in."""
    with fresh(repo, tmp_path) as srv:
        before = hwm(srv)
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\n\r\n").encode()  # fmt: skip
        data = send_then_read(srv.port, head, chunked(piece, 64 * MiB))
        peak = hwm(srv)
    print(f"\n{path} chunked {piece!r} x 64 MiB: {data[:12]!r}; VmHWM {before:.0f} -> {peak:.0f} MiB")
    assert_service_error(data, 413, "payload_too_large")
    assert peak - before < 3 * MAX_BODY / MiB, (before, peak)


# ---------------------------------------------------------------------------------------------- headers
@pytest.mark.parametrize(
    "start",
    [b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"GET /"],
    ids=["header-name", "header-value", "url"],
)
def test_an_endless_header_without_crlf_is_431_and_costs_no_memory(repo: Path, tmp_path: Path,
                                                                   start: bytes) -> None:  # fmt: skip
    """A header name, a header value or a URL streamed with no CRLF, on 30 connections at once: httptools
    buffers it without a callback, so the cap is applied to the bytes received."""
    sent: list[int] = []
    answers: list[bytes] = []

    def stream() -> None:
        total = 0
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            try:
                s.sendall(start)
                for _ in range(64):  # up to 16 MiB; the server must stop reading long before
                    s.sendall(b"a" * (256 * 1024))
                    total += 256 * 1024
            except OSError:
                pass
            answers.append(read_until_closed(s, 30))
        sent.append(total)

    with fresh(repo, tmp_path) as srv:
        before = hwm(srv)
        threads = [threading.Thread(target=stream) for _ in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        peak = hwm(srv)
        assert httpx.get(f"{srv.url}/healthz", timeout=10).status_code == 200
    print(f"\nendless {start[-6:]!r}: sent at most {max(sent) / MiB:.2f} MiB; VmHWM {before:.0f} -> {peak:.0f} MiB")
    assert len(answers) == 30
    for data in answers:
        assert_service_error(data, 431, "headers_too_large")
    assert max(sent) < 8 * MiB, "the server kept reading a header past its limit"
    assert peak - before < 32, (before, peak)


# ---------------------------------------------------------------------------------------------- framing
@pytest.mark.parametrize(
    ("request_head", "status", "code"),
    [
        (b"POST /v1/predict/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501,
         "unsupported_transfer_encoding"),
        (b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n\r\n",
         501, "unsupported_transfer_encoding"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: x-custom, chunked\r\n\r\n", 501,
         "unsupported_transfer_encoding"),
        (b"POST /v1/predict HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
         "invalid_transfer_encoding"),
        (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: \xc2\xb2\r\n\r\n", 400, "malformed_http"),
    ],
    ids=["gzip-chunked", "deflate-then-chunked", "unknown-coding-on-a-probe", "te-on-http-1.0", "superscript-length"],
)  # fmt: skip
def test_unknown_transfer_codings_and_bad_framing_are_refused(server: Server, request_head: bytes, status: int,
                                                              code: str) -> None:  # fmt: skip
    body = b"5\r\nhello\r\n0\r\n\r\n" if b"chunked" in request_head else b""
    assert_service_error(send_then_read(server.port, request_head + body), status, code)


def test_a_chunked_request_is_still_served(server: Server) -> None:
    body = json.dumps({"image": [0.0] * 784}).encode()
    head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    data = send_then_read(server.port, head + b"Connection: close\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    status, _, payload = parse(data)
    assert status == 200, data[:300]
    assert 0 <= json.loads(payload)["label"] <= 9


def test_a_connection_answered_before_its_body_ended_is_closed_when_idle(server: Server) -> None:
    """``GET /healthz`` declaring a body: answered at once; the body arrives after the answer, then nothing
    more: the idle connection is closed by the keep-alive timer like any other."""
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        s.settimeout(30)
        first = s.recv(65536)
        for _ in range(10):
            s.sendall(b" " * 100)
            time.sleep(0.05)
        rest = read_until_closed(s, 30)
    assert parse(first + rest)[0] == 200


def test_a_kept_alive_connection_is_served_until_idle_for_the_keep_alive_timeout(server: Server) -> None:
    """A next request sent within the keep-alive timeout (5 s) is served on the same connection; a connection idle
    after its answer is closed by the server, not before the timeout."""
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.settimeout(30)
        for _ in range(2):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b'"alive"}'):
                answer += s.recv(65536) or pytest.fail(f"closed while idle for less than the timeout: {answer!r}")
            assert parse(answer)[0] == 200
            time.sleep(1)
        idle_from = time.monotonic() - 1
        assert read_until_closed(s, 30) == b""
    assert time.monotonic() - idle_from >= 4.5  # never before the timeout (a timer may fire late, not early)


def test_no_redirect_is_built_from_the_host_header(server: Server) -> None:
    for path in ("/v1/models/", "/docs/", "/v1/predict/"):
        data = send_then_read(server.port, f"GET {path} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
                              .encode())  # fmt: skip
        status, headers, _ = parse(data)
        assert b"evil.example" not in data, (path, data[:300])
        assert not 300 <= status < 400 or headers.get("location", "").startswith("/"), (path, data[:300])


# ---------------------------------------------------------------------------------------------- slow bodies
@pytest.fixture(scope="module")
def slow_server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with fresh(repo, tmp_path_factory.mktemp("slow-body"), "--body-timeout-s", "2") as srv:
        yield srv


#: How early a timer may fire by this process's monotonic clock: uvloop (libuv) keeps its loop time in whole
#: milliseconds, cached per iteration, so a 1 s timer was seen firing 0.09 ms short of 1 s.
TIMER_SLACK_S = 0.005


def _trickle(port: int, path: str, interval_s: float) -> tuple[bytes, float]:
    """Headers declaring 500 bytes, then one body byte every ``interval_s``: (answer, seconds since the headers
    were sent; taken before sending them, as a server in this process may read them before the send returns)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.monotonic()
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n"
                  "\r\n".encode())  # fmt: skip
        s.settimeout(interval_s)
        data = b""
        for _ in range(500):
            try:
                s.sendall(b" ")
            except OSError:
                break
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            data += chunk
            break
        return data + read_until_closed(s, 30), time.monotonic() - start


@pytest.mark.parametrize("path", ["/v1/feedback", "/v1/predict", "/v1/predict/batch", f"/v2/models/{MODEL}/infer"])
def test_a_trickling_body_gets_400_body_timeout_on_every_route(slow_server: Server, path: str) -> None:
    data, seconds = _trickle(slow_server.port, path, 0.25)
    print(f"\n{path}: answered after {seconds:.2f} s (body_timeout_s 2)")
    assert_service_error(data, 400, "body_timeout", path)
    assert seconds >= 2.0 - TIMER_SLACK_S  # not before the timer (no upper bound asserted)


@pytest.mark.slow
def test_a_body_sent_a_byte_a_second_gets_400_body_timeout_at_the_default(server: Server) -> None:
    data, seconds = _trickle(server.port, "/v1/feedback", 1.0)
    print(f"\n1 byte/s with the default body_timeout_s (10 s): answered after {seconds:.2f} s")
    assert_service_error(data, 400, "body_timeout")
    assert seconds >= 10.0 - TIMER_SLACK_S


async def _late_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads its body late: ``/loop`` blocks the event loop 2.5 s first (a stalled server), ``/app`` awaits
    2.5 s (a busy one), anything else reads at once. Answers with the body's length."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/loop":
        time.sleep(2.5)  # noqa: ASYNC251 (the point: the event loop stalls)
    elif scope["path"] == "/app":
        await asyncio.sleep(2.5)
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size, more = size + len(message.get("body", b"")), message.get("more_body", False)
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def _guarded_server(app: Any, loop: str, **limits: Any) -> Iterator[Any]:
    """A real uvicorn (httptools) in a thread of this process, with the service's guarded protocol."""
    import uvicorn

    from service.guards import guarded_protocol
    from service.wire import HttpLimits

    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), loop=loop, lifespan="off", log_config=None,
                            http=guarded_protocol(HttpLimits(**limits)))  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the test server did not start"
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def late_server() -> Iterator[int]:
    """uvicorn (uvloop, httptools) with the service's guarded protocol, a 1 s body timeout, and ``_late_app``."""
    with _guarded_server(_late_app, "uvloop", body_timeout_s=1.0) as server:
        yield server.config.port


@pytest.mark.parametrize(("path", "pause_s"), [("/app", 0.0), ("/loop", 0.3)])
def test_a_body_the_server_is_late_to_read_is_not_a_client_timeout(late_server: int, path: str, pause_s: float) -> None:
    """The body timeout is the client's: a body sent whole in time is not a 400 ``body_timeout`` because the
    server read it late, whether the app had not taken what was read (reading paused) or the event loop was
    stalled past the deadline. A trickle to the same server still is."""
    size = 2 * MiB
    with socket.create_connection(("127.0.0.1", late_server), timeout=30) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                  % (path.encode(), size))  # fmt: skip
        time.sleep(pause_s)
        s.sendall(b"x" * size)
        data = read_until_closed(s, 30)
    status, _, body = parse(data)
    assert (status, body) == (200, str(size).encode()), data[:300]
    data, seconds = _trickle(late_server, "/", 0.25)
    assert_service_error(data, 400, "body_timeout")
    assert seconds >= 1.0 - TIMER_SLACK_S


async def _counting_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers ``<messages>,<bytes>``: how many ``http.request`` messages its body came in, and its size."""
    if scope["type"] != "http":
        return
    messages, size, more = 0, 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        messages, size, more = messages + 1, size + len(message["body"]), message.get("more_body", False)
    body = b"%d,%d" % (messages, size)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def _send_in_pieces(port: int, size: int, *, chunked: bool = False) -> tuple[int, int]:
    """A body of ``size`` bytes in 64 KiB pieces 10 ms apart (each its own read), plainly or chunked: the app's
    (messages, bytes)."""
    piece = 64 * 1024
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n%s\r\nConnection: close\r\n\r\n" % framing)
        for start in range(0, size, piece):
            data = b"x" * min(piece, size - start)
            s.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            time.sleep(0.01)
        if chunked:
            s.sendall(b"0\r\n\r\n")
        status, _, body = parse(read_until_closed(s, 30))
    assert status == 200, body
    messages, got = (int(v) for v in body.split(b","))
    assert got == size
    return messages, got


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_up_to_the_hold_reaches_the_app_whole_in_one_message(chunked: bool) -> None:
    """``hold_body_bytes``: a body that arrives in many reads is handed over once, whole; a bigger one, and any
    with the hold off (uvicorn's way), in several messages, every byte there."""
    with _guarded_server(_counting_app, "asyncio", hold_body_bytes=MiB) as server:
        port = server.config.port
        assert _send_in_pieces(port, 800 * 1024, chunked=chunked) == (1, 800 * 1024)
        assert _send_in_pieces(port, MiB, chunked=chunked) == (1, MiB)  # at the hold: still whole
        assert _send_in_pieces(port, 2 * MiB, chunked=chunked)[0] > 1
    with _guarded_server(_counting_app, "asyncio", hold_body_bytes=0) as server:
        assert _send_in_pieces(server.config.port, 800 * 1024, chunked=chunked)[0] > 1


async def _refusing_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 413 and closes without reading the body, as the service does for JSON over its cap."""
    if scope["type"] != "http":
        return
    body = b'{"error": {"code": "payload_too_large"}}'
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-length", b"%d" % len(body)), (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def test_a_closed_connection_and_the_body_it_read_are_freed_without_the_cyclic_gc() -> None:
    """A connection answered before its body was read (a 413) holds what it read of the body. Once closed it
    must be freed by reference counting: the service tunes the cyclic GC to run rarely, and clients sending
    bodies over the JSON cap again and again kept about 40 MiB of dead connections resident."""
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    with _guarded_server(_refusing_app, "asyncio") as server:

        def alive() -> list[object]:  # this server's connections and request cycles
            port, objects = server.config.port, gc.get_objects()
            return [o for o in objects if isinstance(o, server.config.http)] + [
                o for o in objects if isinstance(o, RequestResponseCycle) and o.scope["server"][1] == port]  # fmt: skip

        gc.collect()
        gc.disable()  # what is not freed by reference counting stays, and is counted below
        try:
            for _ in range(20):
                with socket.create_connection(("127.0.0.1", server.config.port), timeout=30) as s:
                    s.sendall(b"POST /v1/predict/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: %d\r\n\r\n" % MiB + b"[" * (256 * 1024))  # fmt: skip
                    data = read_until_closed(s, 30)  # b"": the unread body made the close a reset, answer lost
                    assert not data or parse(data)[0] == 413, data[:200]
            deadline = time.monotonic() + 10
            while (left := alive()) and time.monotonic() < deadline:
                time.sleep(0.05)
            # What the collector would have to free is held by objects it sees (a cycle). One closed connection
            # was sometimes still alive with no such referrer (held from outside its view, not by a cycle).
            kept = {repr(o): [type(r).__name__ for r in gc.get_referrers(o) if r is not left] for o in left}
            kept = {o: held_by for o, held_by in kept.items() if held_by}
            assert not kept, (
                f"{len(kept)} objects of closed connections wait for the cyclic GC: {list(kept.items())[:4]}"
            )
        finally:
            gc.enable()


# ---------------------------------------------------------------------------------------------- decoding
def _bomb(prefix: bytes, item: bytes, suffix: bytes, size: int = 15 * MiB) -> bytes:
    n = (size - len(prefix) - len(suffix)) // (len(item) + 1)
    return prefix + b",".join([item] * n) + suffix


JSON_BOMBS = {
    "predict-dicts": ("/v1/predict", _bomb(b'{"image": [', b"{}", b"]}")),
    "batch-lists": ("/v1/predict/batch", _bomb(b'{"images": [', b"[]", b"]}")),
    "feedback-lists": ("/v1/feedback", _bomb(b'{"prediction_id": "x", "label": 1, "index": [', b"[]", b"]}")),
    "v2-lists": (f"/v2/models/{MODEL}/infer",
                 _bomb(b'{"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [', b"[]",
                       b"]}]}")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(JSON_BOMBS))
def test_a_json_element_bomb_is_refused_without_the_memory(repo: Path, tmp_path: Path, case: str) -> None:
    """15 MiB of ``{}`` or ``[]`` items (under the body limit): millions of Python objects if decoded in
    full; refused while decoding, by element count."""
    path, body = JSON_BOMBS[case]
    with fresh(repo, tmp_path) as srv:
        before = hwm(srv)
        start = time.perf_counter()
        r = httpx.post(f"{srv.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
        seconds = time.perf_counter() - start
        peak = hwm(srv)
    print(f"\n{case}: {r.status_code} after {seconds:.2f} s; VmHWM {before:.0f} -> {peak:.0f} MiB")
    assert 400 <= r.status_code < 500, r.text[:300]
    assert peak - before < 4 * len(body) / MiB, (before, peak)


def test_json_bombs_do_not_stall_the_probes(repo: Path, tmp_path: Path) -> None:
    """Three clients sending element bombs back to back: decoding that can take more than a few ms runs off
    the event loop (and bombs are refused early), so every probe is answered within the Kubernetes probe's
    own timeout. The one latency bound asserted in this file: 2 s is 100 times the probe's latency under
    this load once the fix is in, and a decode on the event loop stalls it for seconds (2.8-8 s measured)."""
    statuses: Counter[int] = Counter()
    with fresh(repo, tmp_path) as srv:
        workers = [poster(srv.port, path, {"content-type": "application/json"}, body, statuses)
                   for path, body in (JSON_BOMBS["predict-dicts"], JSON_BOMBS["batch-lists"],
                                      JSON_BOMBS["feedback-lists"])]  # fmt: skip
        with Prober(srv.port, hang_s=K8S_PROBE_TIMEOUT_S) as probes:
            run_for(10, workers)
        peak = hwm(srv)
    print(f"\n3 JSON-bomb clients for 10 s: statuses {dict(statuses)}; {probes.summary()}; VmHWM {peak:.0f} MiB")
    assert not probes.failures, probes.failures[:5]
    assert probes.latencies_ms
    assert all(400 <= s < 500 or s == 503 for s in statuses), statuses  # 503: the in-flight body budget


@pytest.mark.parametrize(
    ("path", "doc"),
    [("/v1/predict", {"image": [True] + [0] * 783}),
     ("/v1/predict", {"image": [[False] * 28] + [[0] * 28] * 27}),
     ("/v1/predict/batch", {"images": [[0] * 783 + [True]]}),
     (f"/v2/models/{MODEL}/infer", {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32",
                                               "data": [True] + [0] * 783}]})],
    ids=["flat", "nested", "batch", "v2"],
)  # fmt: skip
def test_booleans_are_not_pixels(server: Server, path: str, doc: object) -> None:
    r = httpx.post(f"{server.url}{path}", json=doc, timeout=30)
    if path.startswith("/v2"):
        assert 400 <= r.status_code < 500, r.text[:300]
    else:
        assert r.status_code == 422, r.text[:300]


# ---------------------------------------------------------------------------------------------- never a 500
@pytest.mark.parametrize("digit", [b"\xb2", b"\xc2\xb2"], ids=["latin-1", "utf-8"])
def test_a_non_ascii_digit_in_a_header_or_a_path_is_400_not_500(server: Server, digit: bytes) -> None:
    """``²`` is a digit to ``str.isdigit`` but not to ``int``: a number check must not let it through."""
    body, _ = v2_binary_body(IMAGES[:1])
    head = (b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Inference-Header-Content-Length: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (MODEL.encode(), digit, len(body)))  # fmt: skip
    data = send_then_read(server.port, head + body)
    status, _, payload = parse(data)
    assert status == 400, data[:300]
    assert isinstance(json.loads(payload)["error"], str)  # the protocol's own error shape
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Request-Deadline-Ms: %s\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}" % digit)  # fmt: skip
    status, _, payload = parse(send_then_read(server.port, head))
    assert 400 <= status < 500, payload[:300]
    r = httpx.post(f"{server.url}/admin/models/{MODEL}/versions/%C2%B2/load", timeout=30,
                   headers={"authorization": f"Bearer {ADMIN_TOKEN}"})  # fmt: skip
    assert 400 <= r.status_code < 500, r.text[:300]
    assert set(r.json()["error"]) == {"code", "message", "request_id"}


# ---------------------------------------------------------------------------------------------- model metadata
def _version(repo: Path, version: str, **changes: object) -> Path:
    """A copy of version 1 as ``version`` with ``changes`` applied to its metadata (None deletes a key)."""
    folder = repo / MODEL / version
    shutil.copytree(repo / MODEL / "1", folder)
    meta = json.loads((folder / "metadata.json").read_text())
    meta["version"] = version
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def _outside_model(tmp: Path) -> Path:
    outside = tmp / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(ROOT / "models" / MODEL / "1" / "model.onnx", outside / "model.onnx")
    return outside / "model.onnx"


def _symlinked_version(repo: Path, tmp: Path, version: str) -> None:
    """A whole version folder that is a symlink to a valid-looking version outside the repository."""
    outside = tmp / f"outside-version-{version}"
    shutil.copytree(repo / MODEL / "1", outside)
    meta = json.loads((outside / "metadata.json").read_text())
    meta["version"] = version
    (outside / "metadata.json").write_text(json.dumps(meta))
    (repo / MODEL / version).symlink_to(outside, target_is_directory=True)


def _symlinked_file(repo: Path, tmp: Path, version: str) -> None:
    folder = _version(repo, version)
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to(_outside_model(tmp))


METADATA_CASES: dict[str, Callable[[Path, Path, str], object]] = {
    "dev-zero": lambda repo, tmp, v: _version(repo, v, file="/dev/zero"),
    "absolute-path": lambda repo, tmp, v: _version(repo, v, file=str(_outside_model(tmp))),
    "dot-dot": lambda repo, tmp, v: _version(repo, v, file="../1/model.onnx"),
    "dot-dot-outside": lambda repo, tmp, v: _version(repo, v, file="../../../../../../../../etc/hostname"),
    "file-not-a-string": lambda repo, tmp, v: _version(repo, v, file={"path": "model.onnx"}),
    "no-sha256": lambda repo, tmp, v: _version(repo, v, sha256=None),
    "malformed-reference": lambda repo, tmp, v: _version(repo, v, reference={"class_fractions": "many"}),
    "reference-not-an-object": lambda repo, tmp, v: _version(repo, v, reference=[1, 2]),
    "version-folder-symlinked-outside": _symlinked_version,
    "model-file-symlinked-outside": _symlinked_file,
}


def test_hostile_model_metadata_is_refused_with_422_and_no_memory(tmp_path: Path) -> None:
    """Through the admin endpoint (token needed): every bad version is a 422 naming the problem, memory does
    not move (``/dev/zero`` is never read), and version 1 keeps serving."""
    own = tmp_path / "models"
    shutil.copytree(ROOT / "models" / MODEL / "1", own / MODEL / "1")
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    results = {}
    with fresh(own, tmp_path, env={"MNIST_ADMIN_TOKEN": ADMIN_TOKEN}) as server:
        for i, (case, make) in enumerate(METADATA_CASES.items()):
            version = str(100 + i)
            make(own, tmp_path, version)
            before = hwm(server)
            r = httpx.post(f"{server.url}/admin/models/{MODEL}/versions/{version}/load", headers=auth, timeout=60)
            grew = hwm(server) - before
            results[case] = (r.status_code, r.text[:160], grew)
            assert r.status_code == 422, (case, r.status_code, r.text[:400])
            assert set(r.json()["error"]) == {"code", "message", "request_id"}, (case, r.text[:400])
            assert grew < 32, (case, before, grew)
            served = httpx.post(f"{server.url}/v1/predict", json={"image": [0.0] * 784}, timeout=30)
            assert served.status_code == 200
            assert served.headers["x-model-version"] == "1", case
    print("\n" + "\n".join(f"{case}: {status} {text}, VmHWM +{grew:.1f} MiB"
                           for case, (status, text, grew) in results.items()))  # fmt: skip


# ---------------------------------------------------------------------------------------------- feedback
def _predict(c: httpx.Client, request_id: str | None = None) -> httpx.Response:
    headers = {"x-request-id": request_id} if request_id else {}
    r = c.post("/v1/predict", json={"image": (IMAGES[0] / 255).tolist()}, headers=headers)
    assert r.status_code == 200, r.text[:300]
    return r


def test_feedback_refers_to_a_server_issued_unguessable_id(server: Server) -> None:
    with server.client() as c:
        responses = [_predict(c, f"client-chosen-{i}") for i in range(20)]
        ids = [r.json()["prediction_id"] for r in responses]
        for i, r in enumerate(responses):
            assert r.headers["x-prediction-id"] == ids[i]
            assert r.headers["x-request-id"] == f"client-chosen-{i}"  # the correlation id is only echoed
            assert ids[i] != f"client-chosen-{i}"
        assert len(set(ids)) == len(ids)
        assert all(len(pid) >= 16 for pid in ids)
        # unguessable: no shared prefix, no counter (random ids of >= 16 characters share < 8 by chance)
        assert max(len(_common_prefix(a, b)) for a in ids for b in ids if a != b) < 8
        label = responses[0].json()["label"]
        forged = c.post("/v1/feedback", json={"prediction_id": "client-chosen-0", "label": label, "index": 0})
        assert forged.status_code == 404, forged.text
        old_form = c.post("/v1/feedback", json={"request_id": "client-chosen-1", "label": label})
        assert 400 <= old_form.status_code < 500
        ok = c.post("/v1/feedback", json={"prediction_id": ids[0], "label": label, "index": 0})
        assert ok.status_code == 200, ok.text
        assert ok.json()["correct"] is True
        batch = c.post("/v1/predict/batch", content=npy(IMAGES[:3]), headers={"content-type": "application/x-npy"})
        assert batch.headers["x-prediction-id"] == batch.json()["prediction_id"]
        assert c.post("/v1/feedback", json={"prediction_id": batch.json()["prediction_id"],
                                            "label": batch.json()["labels"][2], "index": 2}).status_code == 200  # fmt: skip


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def test_feedback_can_require_a_token_and_is_rate_limited(repo: Path, tmp_path: Path) -> None:
    env = {"MNIST_FEEDBACK_TOKEN": "fb-secret", "MNIST_FEEDBACK_RATE_PER_S": "0.5"}
    with fresh(repo, tmp_path, env=env) as srv, srv.client() as c:
        r = _predict(c)
        doc = {"prediction_id": r.json()["prediction_id"], "label": r.json()["label"], "index": 0}
        missing = c.post("/v1/feedback", json=doc)
        wrong = c.post("/v1/feedback", json=doc, headers={"authorization": "Bearer fb-secreX"})
        assert missing.status_code == 401, missing.text
        assert wrong.status_code == 401, wrong.text
        assert "fb-secret" not in missing.text + wrong.text
        auth = {"authorization": "Bearer fb-secret"}
        statuses = [c.post("/v1/feedback", json=doc, headers=auth).status_code for _ in range(10)]
        assert statuses[0] == 200, statuses
        assert 429 in statuses, statuses  # 10 at once against 0.5/s
        limited = c.post("/v1/feedback", json=doc, headers=auth)
        assert limited.status_code == 429
        assert set(limited.json()["error"]) == {"code", "message", "request_id"}
    assert "fb-secret" not in srv.logs()


# ---------------------------------------------------------------------------------------------- memory
def _remembered_bytes(srv: Server) -> float:
    found = re.search(r"^mnist_feedback_remembered_bytes (\S+)$", httpx.get(f"{srv.url}/metrics", timeout=30).text,
                      re.MULTILINE)  # fmt: skip
    assert found, "mnist_feedback_remembered_bytes is not exported"
    return float(found.group(1))


def test_remembered_predictions_are_bounded_by_bytes(repo: Path, tmp_path: Path) -> None:
    """200 Open Inference Protocol requests of 4096 gzipped uint8 images, each with its own X-Request-ID.
    With the default bound, every label is remembered in one byte (int64 labels would be 6.25 MiB here) and
    the process grows by little more than that; with a 64 KiB bound, the store stays under it, the oldest
    predictions are forgotten first (feedback on them is a 404) and the newest are still scored."""
    body, header_len = v2_binary_body(IMAGES)
    gz = gzip.compress(body, 1)
    headers = {"content-type": "application/octet-stream", "content-encoding": "gzip",
               "inference-header-content-length": str(header_len)}  # fmt: skip
    labels_bytes = 200 * 4096
    with fresh(repo, tmp_path) as srv, srv.client() as c:
        for i in range(20):  # warm: arenas, pools, the first remembered entries
            r = c.post(f"/v2/models/{MODEL}/infer", content=gz, headers={**headers, "x-request-id": f"w{i}"})
            assert r.status_code == 200, r.text[:300]
        time.sleep(7)  # the in-flight limit trims the heap once the load has fallen (0.5 s and 5 s after)
        base, stored0 = rss(srv), _remembered_bytes(srv)
        for i in range(200):
            r = c.post(f"/v2/models/{MODEL}/infer", content=gz, headers={**headers, "x-request-id": f"r{i}"})
            assert r.status_code == 200, r.text[:300]
        time.sleep(7)
        grown, peak, stored = rss(srv) - base, hwm(srv), _remembered_bytes(srv) - stored0
    print(f"\n200 x 4096 gzipped uint8 images over /v2: store +{stored / MiB:.2f} MiB, RSS +{grown:.1f} MiB after "
          f"the load, VmHWM {peak:.0f} MiB")  # fmt: skip
    assert labels_bytes <= stored < 1.1 * labels_bytes, stored  # one byte a label, bookkeeping under 10%
    assert grown < 16, grown  # the process as a whole: RSS moves by a few MiB on its own
    assert peak < BUDGET_MIB, peak
    env = {"MNIST_FEEDBACK_MEMORY_BYTES": str(64 * 1024)}  # room for about 15 predictions of 4096 images
    npy_body = npy(IMAGES)
    with fresh(repo, tmp_path, env=env) as srv, srv.client() as c:
        ids = []
        for _ in range(40):
            r = c.post("/v1/predict/batch", content=npy_body, headers={"content-type": "application/x-npy"})
            assert r.status_code == 200, r.text[:300]
            ids.append((r.json()["prediction_id"], r.json()["labels"][5]))
        stored = _remembered_bytes(srv)
        first = c.post("/v1/feedback", json={"prediction_id": ids[0][0], "label": ids[0][1], "index": 5})
        last = c.post("/v1/feedback", json={"prediction_id": ids[-1][0], "label": ids[-1][1], "index": 5})
    assert stored <= 64 * 1024, stored
    assert first.status_code == 404, first.text
    assert last.status_code == 200, last.text


def test_the_body_budget_weighs_json_by_what_it_costs(repo: Path, tmp_path: Path) -> None:
    """The in-flight body budget counts a JSON body ``JSON_WEIGHT`` times its size: one JSON batch just under
    the JSON limit must cost, per body byte, no more than that many times what a ``.npy`` batch costs (each
    measured alone on a fresh server), or the budget would let JSON past the memory it is meant to bound."""
    from service.inflight import JSON_WEIGHT

    json_body = json_batch_under_the_limit()
    cost = {}
    for name, body, content_type in (
        ("json", json_body, "application/json"),
        ("npy", npy(IMAGES), "application/x-npy"),
    ):
        with fresh(repo, tmp_path) as srv:
            before = hwm(srv)
            r = httpx.post(f"{srv.url}/v1/predict/batch", content=body, headers={"content-type": content_type},
                           timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text[:300]
            cost[name] = (hwm(srv) - before) * MiB / len(body)
            print(f"\n{name} batch of {len(body) / MiB:.1f} MiB: VmHWM {before:.0f} -> {hwm(srv):.0f} MiB, "
                  f"{cost[name]:.1f} bytes per body byte")  # fmt: skip
    assert cost["json"] <= JSON_WEIGHT * max(cost["npy"], 1.0), cost


def _settle(srv: Server, target_mib: float, timeout_s: float = 45) -> float:
    """Wait until the server's RSS is at most ``target_mib`` (or the timeout, generous for a slow machine still
    answering the last of the load); returns the last reading."""
    deadline = time.monotonic() + timeout_s
    while (now := rss(srv)) > target_mib and time.monotonic() < deadline:
        time.sleep(0.25)
    return now


@pytest.mark.slow
def test_a_bulk_flood_stays_under_budget_and_memory_comes_back(repo: Path, tmp_path: Path) -> None:
    """64 connections posting 4096-image ``.npy`` bodies back to back, for 8 s, twice: 200 or 503 only,
    probes answered, peak under 60% of the pod limit, and resident memory back near its baseline after each
    round (the heap is trimmed once the load falls)."""
    body = npy(IMAGES)
    statuses: Counter[int] = Counter()
    ODD_ANSWERS.clear()
    with fresh(repo, tmp_path) as srv:
        assert httpx.post(f"{srv.url}/v1/predict/batch", content=body, timeout=60,
                          headers={"content-type": "application/x-npy"}).status_code == 200  # fmt: skip
        base = rss(srv)
        after = []
        with Prober(srv.port) as probes:
            for _ in range(2):
                run_for(8, [poster(srv.port, "/v1/predict/batch", {"content-type": "application/x-npy"}, body,
                                   statuses) for _ in range(64)])  # fmt: skip
                after.append(_settle(srv, base + 32))
        peak = hwm(srv)
    print(
        f"\nbulk flood 64 x 3.1 MiB npy, 2 x 8 s: statuses {dict(statuses)}; RSS base {base:.0f} MiB, "
        f"after each round {[round(a) for a in after]} MiB; VmHWM {peak:.0f} MiB; {probes.summary()}"
    )
    assert set(statuses) <= {200, 503}, (statuses, ODD_ANSWERS)
    assert statuses[200] > 0
    assert not probes.failures, probes.failures[:5]
    assert peak < BUDGET_MIB, peak
    assert all(a <= base + 32 for a in after), (base, after)


@pytest.mark.slow
def test_the_worst_request_mix_stays_under_60_percent_of_the_pod_limit(repo: Path, tmp_path: Path) -> None:
    """Everything above at once for 15 s: bulk ``.npy`` floods, gzipped v2 batches, the largest valid JSON
    batches, JSON element bombs, oversized chunked bodies, endless headers and trickling bodies. Peak RSS < 60% of 512 MiB, and every
    ``/healthz`` probe answered throughout."""
    statuses: Counter[int] = Counter()
    npy_body = npy(IMAGES)
    v2_body, header_len = v2_binary_body(IMAGES)
    gz = gzip.compress(v2_body, 1)
    json_batch = json_batch_under_the_limit()

    def endless_header(stop: threading.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", srv.port)) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ")
                while not stop.is_set():
                    s.sendall(b"a" * 65536)

    def oversized_chunked(stop: threading.Event) -> None:
        head = (b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        while not stop.is_set():
            with contextlib.suppress(OSError):
                send_then_read(srv.port, head, chunked(b" ", 64 * MiB))

    def trickle(stop: threading.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", srv.port)) as s:
                s.sendall(b"POST /v1/predict/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(npy_body) + npy_body[: len(npy_body) // 2])  # fmt: skip
                stop.wait(5)

    with fresh(repo, tmp_path, "--body-timeout-s", "3") as srv:
        base = hwm(srv)
        workers = [poster(srv.port, "/v1/predict/batch", {"content-type": "application/x-npy"}, npy_body, statuses)
                   for _ in range(48)]  # fmt: skip
        workers += [poster(srv.port, f"/v2/models/{MODEL}/infer",
                           {"content-type": "application/octet-stream", "content-encoding": "gzip",
                            "inference-header-content-length": str(header_len)}, gz, statuses) for _ in range(8)]  # fmt: skip
        workers += [poster(srv.port, path, {"content-type": "application/json"}, body, statuses)
                    for path, body in JSON_BOMBS.values()]  # fmt: skip
        workers += [poster(srv.port, "/v1/predict/batch", {"content-type": "application/json"}, json_batch, statuses)
                    for _ in range(4)]  # fmt: skip
        workers += [endless_header] * 8 + [oversized_chunked] * 4 + [trickle] * 16
        with Prober(srv.port) as probes:
            run_for(15, workers)
        peak = hwm(srv)
        settled = _settle(srv, base + 48)
    print(
        f"\nworst mix, 15 s: statuses {dict(statuses)}; VmHWM {base:.0f} -> {peak:.0f} MiB "
        f"(budget {BUDGET_MIB:.0f}); RSS after {settled:.0f} MiB; {probes.summary()}"
    )
    assert not probes.failures, probes.failures[:5]
    assert peak < BUDGET_MIB, peak
    assert statuses[200] > 0
    assert not [s for s in statuses if s >= 500 and s not in (503, 504)], statuses  # 504: queued past its deadline
