"""Integration tests: a real ``python -m service.server`` process on 127.0.0.1 with the tiny ONNX model."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, Server, assert_clean_shutdown, run_onnx, start_server, tiny_onnx, write_model

BLOB = tiny_onnx(0)


@pytest.fixture(scope="module")
def server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tiny_repo, tmp_path_factory.mktemp("srv"), "--max-images-per-request", "300", "--max-body-bytes", "6000000"
    )
    yield srv
    assert_clean_shutdown(srv)


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def digits(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 784), dtype=np.uint8)


def expected_labels(x_uint8: np.ndarray) -> np.ndarray:
    return run_onnx(BLOB, x_uint8.astype(np.float32) / np.float32(255)).argmax(axis=1)


def png_bytes(img: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.reshape(28, 28)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, str]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"code", "message", "request_id"}
    assert err["message"]
    assert err["request_id"] == resp.headers["x-request-id"]
    if code is not None:
        assert err["code"] == code, err
    return dict(err)


# ---------------------------------------------------------------------------------------------- endpoints
def test_health_ready_models_metrics_docs(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    meta = client.get("/v1/models").json()
    default = meta["default"]
    assert default["name"] == "tiny"
    assert default["version"] == "1"
    assert default["provider"] == "CPUExecutionProvider"
    assert default["input"]["name"] == "pixels"
    assert default["output"]["name"] == "probabilities"
    assert len(default["sha256"]) == 64
    assert meta["available_versions"] == ["1"]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert "mnist_batch_size_images_bucket" in metrics.text
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/feedback"} <= set(spec["paths"])
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "image/png", "multipart/form-data"} <= set(body)


def test_single_image_json_flat_and_nested(client: httpx.Client) -> None:
    x = digits(2)
    want = expected_labels(x)
    for img, label in zip(x, want, strict=True):
        flat = (img / 255).tolist()
        nested = (img.reshape(28, 28) / 255).tolist()
        for image in (flat, nested):
            r = client.post("/v1/predict", json={"image": image}, headers={"X-Request-ID": "abc-123"})
            assert r.status_code == 200, r.text
            doc = r.json()
            assert doc["label"] == label
            assert len(doc["probabilities"]) == 10
            assert abs(sum(doc["probabilities"]) - 1) < 1e-4
            assert (doc["model"], doc["version"], doc["request_id"]) == ("tiny", "1", "abc-123")
            assert r.headers["x-request-id"] == "abc-123"
            timing = r.headers["server-timing"]
            assert "queue;dur=" in timing
            assert "inference;dur=" in timing
            assert r.headers["x-model-version"] == "1"


def test_generated_request_id(client: httpx.Client) -> None:
    r = client.post("/v1/predict", json={"image": [0.0] * 784}, headers={"X-Request-ID": "bad id with spaces"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] != "bad id with spaces"
    assert len(r.headers["x-request-id"]) == 32
    assert r.json()["request_id"] == r.headers["x-request-id"]


def test_single_image_png_raw_and_multipart(client: httpx.Client) -> None:
    x = digits(3, seed=2)
    want = expected_labels(x)
    for img, label in zip(x, want, strict=True):
        raw = client.post("/v1/predict", content=png_bytes(img), headers={"content-type": "image/png"})
        assert raw.status_code == 200, raw.text
        assert raw.json()["label"] == label
        form = client.post("/v1/predict", files={"file": ("digit.png", png_bytes(img, "RGB"), "image/png")})
        assert form.status_code == 200, form.text
        assert form.json()["label"] == label


def test_batch_in_every_format_matches_the_model(client: httpx.Client) -> None:
    x = digits(100, seed=3)  # random pixels: ~15 KB of JSON each, under the 2 MiB JSON limit
    want = expected_labels(x).tolist()
    as_json = client.post("/v1/predict/batch", json={"images": (x / 255).tolist()})
    nested = client.post("/v1/predict/batch", json={"images": (x.reshape(-1, 28, 28) / 255).tolist()})
    npy_u8 = client.post(
        "/v1/predict/batch", content=npy_bytes(x.reshape(-1, 28, 28)), headers={"content-type": "application/x-npy"}
    )
    npy_f32 = client.post(
        "/v1/predict/batch",
        content=npy_bytes((x / np.float32(255)).astype(np.float32)),
        headers={"content-type": "application/x-npy"},
    )
    raw = client.post("/v1/predict/batch", content=x.tobytes(), headers={"content-type": "application/octet-stream"})
    for r in (as_json, nested, npy_u8, npy_f32, raw):
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["labels"] == want
        assert doc["count"] == 100
        assert np.asarray(doc["probabilities"]).shape == (100, 10)
        assert doc["request_id"] == r.headers["x-request-id"]


def test_batch_binary_outputs(client: httpx.Client) -> None:
    x = digits(40, seed=4)
    ref = run_onnx(BLOB, x.astype(np.float32) / np.float32(255))
    headers = {"content-type": "application/octet-stream"}
    raw = client.post(
        "/v1/predict/batch", content=x.tobytes(), headers={**headers, "accept": "application/octet-stream"}
    )
    assert raw.status_code == 200
    assert raw.headers["x-shape"] == "40,10"
    np.testing.assert_allclose(np.frombuffer(raw.content, "<f4").reshape(40, 10), ref, atol=1e-6)
    npy = client.post("/v1/predict/batch", content=x.tobytes(), headers={**headers, "accept": "application/x-npy"})
    assert npy.status_code == 200
    np.testing.assert_allclose(np.load(io.BytesIO(npy.content)), ref, atol=1e-6)


def test_bulk_larger_than_one_engine_batch_keeps_order(tiny_repo: Path, tmp_path: Path) -> None:
    with_small_batches = start_server(tiny_repo, tmp_path, "--max-batch-size", "16", "--bulk-chunk-images", "16")
    try:
        x = digits(100, seed=5)
        with with_small_batches.client() as c:
            r = c.post("/v1/predict/batch", content=x.tobytes(), headers={"content-type": "application/octet-stream"})
            assert r.status_code == 200
            assert r.json()["labels"] == expected_labels(x).tolist()
            metrics = c.get("/metrics").text
        sizes = _metric(metrics, "mnist_batch_size_images_bucket", 'le="16.0"')
        total = _metric(metrics, "mnist_batch_size_images_count")
        assert total >= 7
        assert sizes == total
    finally:
        assert with_small_batches.terminate() == 0


def _metric(text: str, name: str, label: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {label} not found")


def test_concurrent_requests_share_batches(server: Server) -> None:
    with server.client() as c:
        before = _metric(c.get("/metrics").text, "mnist_batches_total")
    n = 200
    barrier = threading.Barrier(32)

    def worker(i: int) -> list[int]:
        sizes = []
        with server.client() as c:
            barrier.wait()
            for _ in range(n // 32 + 1):
                r = c.post("/v1/predict", json={"image": [0.5] * 784})
                assert r.status_code == 200
                sizes.append(int(r.headers["x-batch-size"]))
        return sizes

    with ThreadPoolExecutor(32) as pool:
        sizes = [s for chunk in pool.map(worker, range(32)) for s in chunk]
    with server.client() as c:
        after = _metric(c.get("/metrics").text, "mnist_batches_total")
    assert max(sizes) > 1, "no two concurrent requests ever shared an engine call"
    assert after - before < len(sizes)


# ---------------------------------------------------------------------------------------------- bad input
BAD_JSON_CASES = [
    ({"image": [0.5] * 783}, 422, "invalid_shape"),
    ({"image": [[0.5] * 28] * 27}, 422, "invalid_shape"),
    ({"image": [0.5] * 783 + [2.0]}, 422, "out_of_range"),
    ({"image": [0.5] * 783 + [-0.1]}, 422, "out_of_range"),
    ({"image": ["a"] * 784}, 422, "invalid_type"),
    ({"image": [None] * 784}, 422, "invalid_type"),
    ({"image": [[0.5] * 28] * 27 + [[0.5] * 27]}, 422, "invalid_shape"),
    ({"img": [0.5] * 784}, 422, "missing_field"),
    ([0.5] * 784, 422, "missing_field"),
]


@pytest.mark.parametrize(("doc", "status", "code"), BAD_JSON_CASES)
def test_bad_json_image(client: httpx.Client, doc: object, status: int, code: str) -> None:
    assert_error(client.post("/v1/predict", json=doc), status, code)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "malformed_json"),
        (b"", "malformed_body"),
        (b'{"image": [' + b"0.5," * 783 + b"NaN]}", "malformed_json"),
        (b'{"image": [' + b"0.5," * 783 + b"1e309]}", None),
    ],
)
def test_malformed_or_non_finite_json(client: httpx.Client, body: bytes, code: str | None) -> None:
    r = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422)
    assert_error(r, r.status_code, code)


def test_bad_batches(client: httpx.Client) -> None:
    assert_error(client.post("/v1/predict/batch", json={"images": []}), 422, "empty_batch")
    assert_error(client.post("/v1/predict/batch", json={"images": [[0.1] * 784] * 301}), 413, "payload_too_large")
    assert_error(client.post("/v1/predict/batch", json={"images": [0.1] * 10}), 422, "invalid_shape")
    raw = {"content-type": "application/octet-stream"}
    assert_error(client.post("/v1/predict/batch", content=b"\x00" * 785, headers=raw), 422, "invalid_shape")
    assert_error(client.post("/v1/predict/batch", content=b"", headers=raw), 422, "empty_batch")
    npy = {"content-type": "application/x-npy"}
    assert_error(client.post("/v1/predict/batch", content=b"not an npy", headers=npy), 400, "malformed_npy")
    obj = npy_bytes(np.zeros((1, 784), np.uint8)).replace(b"'|u1'", b"'|O' ")
    assert_error(client.post("/v1/predict/batch", content=obj, headers=npy), 422, "invalid_type")
    header = npy_bytes(np.zeros((1, 784), np.uint8))
    truncated = header[:-10]
    assert_error(client.post("/v1/predict/batch", content=truncated, headers=npy), 400, "malformed_npy")
    f64 = npy_bytes(np.zeros((2, 784), np.float64))
    assert_error(client.post("/v1/predict/batch", content=f64, headers=npy), 422, "invalid_type")
    huge = npy_bytes(np.zeros((1, 784), np.uint8)).replace(b"(1, 784)", b"(99999999999, 784)")
    r = client.post("/v1/predict/batch", content=huge, headers=npy)
    assert r.status_code in (400, 413, 422)
    assert_error(r, r.status_code)
    out_of_range = npy_bytes(np.full((1, 784), 3.0, np.float32))
    assert_error(client.post("/v1/predict/batch", content=out_of_range, headers=npy), 422, "out_of_range")


def test_bad_png(client: httpx.Client) -> None:
    png = {"content-type": "image/png"}
    assert_error(client.post("/v1/predict", content=b"GIF89a....", headers=png), 400, "malformed_png")
    assert_error(client.post("/v1/predict", content=png_bytes(digits(1)[0])[:40], headers=png), 400, "malformed_png")
    big = io.BytesIO()
    Image.fromarray(digits(1)[0].reshape(28, 28)).resize((56, 40)).save(big, format="PNG")
    r = client.post("/v1/predict", content=big.getvalue(), headers=png)  # any size: centred and scaled like MNIST
    assert r.status_code == 200, r.text
    assert_error(client.post("/v1/predict", files={"other": ("x.png", b"abc", "image/png")}), 422, "missing_field")


def test_content_type_size_method_route_and_header_errors(client: httpx.Client) -> None:
    assert_error(client.post("/v1/predict", content=b"abc", headers={"content-type": "text/plain"}), 415)
    assert_error(client.post("/v1/predict", content=b"abc"), 415)
    assert_error(
        client.post(
            "/v1/predict/batch", content=b"\x00" * 6_000_800, headers={"content-type": "application/octet-stream"}
        ),
        413,
    )
    assert_error(client.get("/v1/predict"), 405, "method_not_allowed")
    assert_error(client.get("/nope"), 404, "not_found")
    r = client.post("/v1/predict", json={"image": [0.1] * 784}, headers={"x-request-deadline-ms": "soon"})
    assert_error(r, 422, "invalid_header")


def test_a_bad_request_does_not_disturb_others_in_its_batch(server: Server) -> None:
    good = (digits(1, seed=9)[0] / 255).tolist()
    want = int(expected_labels(digits(1, seed=9))[0])

    def call(i: int) -> tuple[int, object]:
        with server.client() as c:
            doc = {"image": good} if i % 2 else {"image": [2.0] * 784}
            r = c.post("/v1/predict", json=doc)
            return r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(64)))
    for i, (status, doc) in enumerate(results):
        if i % 2:
            assert status == 200
            assert doc["label"] == want
        else:
            assert status == 422


def test_feedback_feeds_production_accuracy(client: httpx.Client) -> None:
    r = client.post("/v1/predict", json={"image": [0.2] * 784}, headers={"x-request-id": "my-correlation-id"})
    pid, label = r.json()["prediction_id"], r.json()["label"]
    assert r.headers["x-prediction-id"] == pid
    assert r.json()["request_id"] == "my-correlation-id" != pid  # the caller's id is an echo, never the key
    ok = client.post("/v1/feedback", json={"prediction_id": pid, "label": label})
    assert ok.status_code == 200
    assert ok.json() == {"prediction_id": pid, "correct": True}
    r2 = client.post("/v1/predict", json={"image": [0.3] * 784})
    pid2, label2 = r2.json()["prediction_id"], r2.json()["label"]
    wrong = client.post("/v1/feedback", json={"prediction_id": pid2, "label": (label2 + 1) % 10})
    assert wrong.json()["correct"] is False
    assert_error(client.post("/v1/feedback", json={"prediction_id": "unknown", "label": 1}), 404, "not_found")
    bad = client.post("/v1/feedback", json={"prediction_id": "my-correlation-id", "label": label})
    assert_error(bad, 404, "not_found")
    assert_error(client.post("/v1/feedback", json={"prediction_id": pid, "label": 11}), 422, "validation_error")
    assert_error(client.post("/v1/feedback", json={"request_id": pid, "label": 1}), 422, "validation_error")
    metrics = client.get("/metrics").text
    assert _metric(metrics, "mnist_feedback_total", 'outcome="correct"') >= 1
    assert _metric(metrics, "mnist_feedback_total", 'outcome="incorrect"') >= 1


def test_prediction_ids_are_unguessable_and_distinct(client: httpx.Client) -> None:
    ids = [client.post("/v1/predict", json={"image": [0.2] * 784}).json()["prediction_id"] for _ in range(20)]
    assert len(set(ids)) == 20
    assert all(len(i) >= 22 for i in ids)  # 128 random bits, URL-safe base64
    assert len({i[:8] for i in ids}) == 20  # no shared prefix or counter


# ---------------------------------------------------------------------------------------------- lifecycle
def test_sigterm_drains_in_flight_requests(tiny_repo: Path, tmp_path: Path) -> None:
    srv = start_server(tiny_repo, tmp_path, "--drain-timeout-s", "10")
    stop = threading.Event()
    statuses: list[int] = []
    errors: list[str] = []
    ready_after: list[int] = []

    connected = [threading.Event() for _ in range(8)]

    def worker(i: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/predict/batch", content=bytes(784 * 64),
                               headers={"content-type": "application/octet-stream"})  # fmt: skip
                except httpx.ConnectError:
                    return  # the listener is closed: this request never reached the server
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                    return
                statuses.append(r.status_code)
                connected[i].set()
                if r.headers.get("connection") == "close":
                    return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    # Every client's connection is accepted and answered once before the signal: a connection still in the
    # kernel's listen backlog when the listener closes is reset by the kernel, never seen by the server.
    for event in connected:
        assert event.wait(60), "a client never got an answer"
    while len(statuses) < 50:
        threading.Event().wait(0.01)
    srv.proc.send_signal(15)
    with httpx.Client(base_url=srv.url, timeout=5) as probe:
        try:
            ready_after.append(probe.get("/readyz").status_code)
        except httpx.HTTPError:
            ready_after.append(-1)  # listener already closed: also not ready
    code = srv.proc.wait(timeout=30)
    stop.set()
    for t in threads:
        t.join(10)
    assert code == 0, srv.logs()
    assert not errors, errors
    assert set(statuses) <= {200, 503}
    assert ready_after[0] in (503, -1)
    assert "draining" in srv.logs()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "<version>/ folder"),
        ("not_onnx", "not a loadable ONNX model"),
        ("truncated", "not a loadable ONNX model"),
        ("fixed_batch", "batch dimension is fixed"),
        ("wrong_input", "expected float32 [batch, 784]"),
        ("bad_golden", "golden inputs give the wrong label"),
    ],
)
def test_startup_refuses_a_bad_model(tmp_path: Path, setup: str, message: str) -> None:
    repo = tmp_path / "repo"
    (repo / "m").mkdir(parents=True)
    if setup == "not_onnx":
        write_model(repo, "m", "1", blob=b"this is not onnx")
    elif setup == "truncated":
        write_model(repo, "m", "1", blob=BLOB[: len(BLOB) // 2])
    elif setup == "fixed_batch":
        write_model(repo, "m", "1", blob=tiny_onnx(0, fixed_batch=4))
    elif setup == "wrong_input":
        write_model(repo, "m", "1", blob=tiny_onnx(0, features=100))
    elif setup == "bad_golden":
        write_model(repo, "m", "1", corrupt_golden=True)
    proc = subprocess.run(
        [sys.executable, "-m", "service.server", "--model-repository", str(repo), "--port", "0"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_metadata_json_is_required(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", "1")
    (folder / "metadata.json").write_text(json.dumps({"name": "m"}))
    proc = subprocess.run(
        [sys.executable, "-m", "service.server", "--model-repository", str(tmp_path), "--port", "0"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "lacks required keys" in proc.stderr
