"""Open Inference Protocol (KServe v2) against a real server, checked with PyPI's ``tritonclient[http]``
(a client no one here wrote) and with hand-made requests for the wire format itself."""

from __future__ import annotations

import gzip
import math
import re
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.helpers import Server, assert_clean_shutdown, run_onnx, start_server, tiny_onnx, write_model

BLOBS = {"1": tiny_onnx(11), "2": tiny_onnx(12)}
MAX_BATCH = 8  # small, so that a 20-image request is split into engine-sized chunks (submit_many)
MAX_IMAGES = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("oip-models")
    for version, blob in BLOBS.items():
        write_model(repo, "tiny", version, blob=blob)
    srv = start_server(
        repo, tmp_path_factory.mktemp("oip-srv"), "--load-all-versions", "--max-batch-size", str(MAX_BATCH),
        "--max-images-per-request", str(MAX_IMAGES), "--max-body-bytes", "400000",
    )  # fmt: skip
    yield srv
    assert_clean_shutdown(srv)


@pytest.fixture
def tc(server: Server) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield client
    client.close()


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 784), dtype=np.uint8)


def expected(version: str, x01: np.ndarray) -> np.ndarray:
    return run_onnx(BLOBS[version], x01.reshape(-1, 784))


def oip_error(resp: httpx.Response, status: int, pattern: str) -> str:
    """The protocol's error shape: exactly ``{"error": "<message>"}``."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str)
    assert re.search(pattern, body["error"]), body["error"]
    return str(body["error"])


def infer_doc(x: Any, shape: list[int], datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    data = x.ravel().tolist() if isinstance(x, np.ndarray) else x
    return {"inputs": [{"name": "pixels", "shape": shape, "datatype": datatype, "data": data}], **extra}


# ---------------------------------------------------------------------------------------------- tritonclient
def test_health_and_metadata_with_tritonclient(tc: triton.InferenceServerClient) -> None:
    assert tc.is_server_live()
    assert tc.is_server_ready()
    assert tc.is_model_ready("tiny")
    assert tc.is_model_ready("tiny", "1")
    server_meta = tc.get_server_metadata()
    assert "binary_tensor_data" in server_meta["extensions"]

    meta = tc.get_model_metadata("tiny")
    assert meta["name"] == "tiny"
    assert meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 784]}]
    assert meta["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    assert meta["outputs"][1] == {"name": "label", "datatype": "INT64", "shape": [-1]}
    assert meta["parameters"]["version"] == "2"  # the latest is the default
    assert tc.get_model_metadata("tiny", "1")["parameters"]["version"] == "1"
    assert tc.get_model_config("tiny")["input"][0]["dims"] == [784]
    assert tc.get_model_repository_index() == [
        {"name": "tiny", "version": "1", "state": "READY"},
        {"name": "tiny", "version": "2", "state": "READY"},
    ]

    with pytest.raises(InferenceServerException, match="not served here") as exc:
        tc.get_model_metadata("nope")
    assert exc.value.status() == "404"
    assert not tc.is_model_ready("tiny", "7")


def test_infer_json_in_and_out(tc: triton.InferenceServerClient) -> None:
    x = pixels(3).astype(np.float32) / 255
    inp = triton.InferInput("pixels", [3, 784], "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    outs = [triton.InferRequestedOutput("probabilities", binary_data=False),
            triton.InferRequestedOutput("label", binary_data=False)]  # fmt: skip
    result = tc.infer("tiny", [inp], outputs=outs, request_id="req-7")
    response = result.get_response()
    assert response["model_name"] == "tiny"
    assert response["model_version"] == "2"
    assert response["id"] == "req-7"
    assert all("data" in o and "parameters" not in o for o in response["outputs"])
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs, expected("2", x), rtol=1e-5, atol=1e-6)
    labels = result.as_numpy("label")
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, probs.argmax(axis=1))


def test_infer_binary_in_and_out_on_a_version(tc: triton.InferenceServerClient) -> None:
    """tritonclient's defaults: binary input, binary_data_output for all outputs. 20 images > MAX_BATCH."""
    x = pixels(20, seed=3).astype(np.float32) / 255
    inp = triton.InferInput("pixels", [20, 28, 28], "FP32")
    inp.set_data_from_numpy(x.reshape(20, 28, 28))  # binary by default
    result = tc.infer("tiny", [inp], model_version="1")
    out = result.get_response()
    assert out["model_version"] == "1"
    assert out["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [20, 10], "parameters": {"binary_data_size": 800}}
    ]
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected("1", x), rtol=1e-5, atol=1e-6)


def test_infer_uint8_compressed_and_classification(tc: triton.InferenceServerClient) -> None:
    raw = pixels(4, seed=5)
    inp = triton.InferInput("pixels", [4, 784], "UINT8")
    inp.set_data_from_numpy(raw)
    outs = [triton.InferRequestedOutput("probabilities", class_count=3),
            triton.InferRequestedOutput("label")]  # fmt: skip
    result = tc.infer("tiny", [inp], outputs=outs, request_compression_algorithm="gzip")
    want = expected("2", raw.astype(np.float32) * np.float32(1 / 255))
    np.testing.assert_array_equal(result.as_numpy("label"), want.argmax(axis=1))
    top = result.as_numpy("probabilities")
    assert top.shape == (4, 3)
    for row, probs in zip(top, want, strict=True):
        parsed = [s.decode().split(":") for s in row]
        assert [int(p[1]) for p in parsed] == list(np.argsort(-probs)[:3])
        assert [p[2] for p in parsed] == [p[1] for p in parsed]  # class labels "0".."9"
        assert math.isclose(float(parsed[0][0]), float(probs.max()), abs_tol=1e-5)


def test_wrong_shape_is_an_inference_server_exception(tc: triton.InferenceServerClient) -> None:
    inp = triton.InferInput("pixels", [2, 783], "FP32")
    inp.set_data_from_numpy(np.zeros((2, 783), dtype=np.float32))
    with pytest.raises(InferenceServerException) as exc:
        tc.infer("tiny", [inp])
    assert exc.value.status() == "422"
    assert exc.value.message() == "input 'pixels': shape [2, 783]; expected [N, 784] or [N, 28, 28]"


def test_out_of_range_binary_fp32_is_refused(tc: triton.InferenceServerClient) -> None:
    for bad, pattern in ((np.float32("nan"), "NaN or infinity"), (np.float32(1.5), r"outside \[0, 1\]")):
        x = np.zeros((1, 784), dtype=np.float32)
        x[0, 17] = bad
        inp = triton.InferInput("pixels", [1, 784], "FP32")
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException, match=pattern):
            tc.infer("tiny", [inp])


# ---------------------------------------------------------------------------------------------- wire format
def test_binary_output_wire_format_by_hand(http: httpx.Client) -> None:
    """JSON input (nested [N, 28, 28] data), binary outputs decoded here without tritonclient."""
    x = pixels(2, seed=9).astype(np.float32) / 255
    doc = infer_doc(x.reshape(2, 28, 28).tolist(), [2, 28, 28], parameters={"binary_data_output": True},
                    outputs=[{"name": "label"}, {"name": "probabilities"}])  # fmt: skip
    resp = http.post("/v2/models/tiny/infer", json=doc)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-model-version"] == "2"
    n = int(resp.headers["inference-header-content-length"])
    head = orjson.loads(resp.content[:n])
    assert [o["name"] for o in head["outputs"]] == ["label", "probabilities"]
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert sizes == [2 * 8, 2 * 10 * 4]
    assert len(resp.content) == n + sum(sizes)
    labels = np.frombuffer(resp.content[n : n + 16], dtype="<i8")
    probs = np.frombuffer(resp.content[n + 16 :], dtype="<f4").reshape(2, 10)
    np.testing.assert_allclose(probs, expected("2", x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, probs.argmax(axis=1))


def test_binary_input_wire_format_by_hand(http: httpx.Client) -> None:
    raw = pixels(3, seed=4)
    header = orjson.dumps({"inputs": [{"name": "pixels", "shape": [3, 784], "datatype": "UINT8",
                                       "parameters": {"binary_data_size": raw.nbytes}}]})  # fmt: skip
    resp = http.post("/v2/models/tiny/versions/1/infer", content=header + raw.tobytes(),
                     headers={"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    out = resp.json()["outputs"][0]
    assert out["shape"] == [3, 10]
    want = expected("1", raw.astype(np.float32) * np.float32(1 / 255))
    np.testing.assert_allclose(np.array(out["data"]).reshape(3, 10), want, rtol=1e-5, atol=1e-6)


def test_gzip_body(http: httpx.Client) -> None:
    body = gzip.compress(orjson.dumps(infer_doc(np.zeros(784), [1, 784])))
    resp = http.post("/v2/models/tiny/infer", content=body, headers={"Content-Encoding": "gzip"})
    assert resp.status_code == 200, resp.text
    bomb = gzip.compress(b" " * 500_000)  # inflates past max_body_bytes
    oip_error(http.post("/v2/models/tiny/infer", content=bomb, headers={"Content-Encoding": "gzip"}),
              413, "decompressed body exceeds")  # fmt: skip
    oip_error(http.post("/v2/models/tiny/infer", content=body, headers={"Content-Encoding": "br"}),
              415, "not supported")  # fmt: skip


ZEROS = [0.0] * 784


@pytest.mark.parametrize(
    ("doc", "status", "pattern"),
    [
        ({"inputs": []}, 422, "one input"),
        ({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": ZEROS}]}, 422, "unexpected input"),
        (infer_doc(ZEROS, [1, 784], "FP16"), 422, "datatype 'FP16' is not supported"),
        (infer_doc(ZEROS, [784]), 422, r"shape \[784\]"),
        (infer_doc(ZEROS, [1, 784.0]), 422, "shape"),
        (infer_doc(ZEROS[:-1], [1, 784]), 422, "data has 783 values; shape"),
        (infer_doc([], [0, 784]), 422, "empty"),
        (infer_doc(ZEROS, [-1, 784]), 422, "must not be negative"),
        (infer_doc(ZEROS * (MAX_IMAGES + 1), [MAX_IMAGES + 1, 784]), 413, "limit is 64"),
        (infer_doc([*ZEROS[:-1], 1.5], [1, 784]), 422, r"outside \[0, 1\]"),
        (infer_doc([*ZEROS[:-1], "a"], [1, 784]), 422, "only numbers"),
        (infer_doc([0] * 783 + [256], [1, 784], "UINT8"), 422, "0-255"),
        (infer_doc([0.5] * 784, [1, 784], "UINT8"), 422, "0-255"),
        ({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32"}]}, 422, "no \"data\""),
        (infer_doc(ZEROS, [1, 784], outputs=[{"name": "logits"}]), 422, "unknown output 'logits'"),
        (infer_doc(ZEROS, [1, 784], outputs=[{"name": "label", "parameters": {"binary_data": "yes"}}]), 422,
         "true or false"),
        (infer_doc(ZEROS, [1, 784], parameters=[]), 422, "must be a JSON object"),
        (infer_doc(ZEROS, [1, 784], id=5), 422, '"id" must be a string'),
        (infer_doc(ZEROS, [1, 784], parameters={"timeout": -5}), 422, "microseconds"),
    ],
)  # fmt: skip
def test_invalid_requests(http: httpx.Client, doc: dict[str, Any], status: int, pattern: str) -> None:
    oip_error(http.post("/v2/models/tiny/infer", json=doc), status, pattern)


def test_invalid_binary_framing(http: httpx.Client) -> None:
    header = orjson.dumps({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8",
                                       "parameters": {"binary_data_size": 784}}]})  # fmt: skip
    url = "/v2/models/tiny/infer"
    post = http.post
    hl = {"Inference-Header-Content-Length": str(len(header))}
    oip_error(post(url, content=header + bytes(700), headers=hl), 400, "784 binary bytes declared, 700 sent")
    oip_error(post(url, content=header + bytes(790), headers=hl), 400, "6 bytes of binary data are not claimed")
    oip_error(post(url, content=header, headers={"Inference-Header-Content-Length": "9999"}), 400, "at most")
    oip_error(post(url, content=header, headers={"Inference-Header-Content-Length": "-1"}), 400, "integer")
    wrong_size = header.replace(b"784}", b"783}")
    oip_error(post(url, content=wrong_size + bytes(783), headers={"Inference-Header-Content-Length":
                                                                  str(len(wrong_size))}),
              422, "does not match shape")  # fmt: skip
    nan = np.zeros(784, dtype="<f4")
    nan[3] = np.inf
    fp = header.replace(b"UINT8", b"FP32").replace(b"784}", b"3136}")
    oip_error(post(url, content=fp + nan.tobytes(), headers={"Inference-Header-Content-Length": str(len(fp))}),
              422, "NaN or infinity")  # fmt: skip
    oip_error(post(url, content=b"{not json"), 400, "malformed JSON")
    oip_error(post(url, content=b"[1, 2]"), 422, "JSON object")
    oip_error(post(url, content=bytes(500_000)), 413, "limit")


def test_not_found_and_deadline_errors(http: httpx.Client) -> None:
    oip_error(http.post("/v2/models/other/infer", json=infer_doc(ZEROS, [1, 784])), 404, "not served here")
    oip_error(http.post("/v2/models/tiny/versions/3/infer", json=infer_doc(ZEROS, [1, 784])), 404, "not loaded")
    oip_error(http.get("/v2/models/tiny/versions/3"), 404, "not loaded")
    oip_error(http.get("/v2/nothing/here"), 404, "no such endpoint")
    resp = http.post("/v2/models/tiny/infer", json=infer_doc(ZEROS, [1, 784]),
                     headers={"X-Request-Deadline-Ms": "soon"})  # fmt: skip
    oip_error(resp, 422, "positive number of milliseconds")


def test_health_endpoints_by_hand(http: httpx.Client) -> None:
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.get("/v2/models/tiny/ready").json() == {"name": "tiny", "version": "2", "ready": True}
    assert http.get("/v2").json()["name"] == "mnist-serving"


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_shares_the_batcher_metrics_and_openapi(http: httpx.Client) -> None:
    before = http.get("/metrics").text
    x = pixels(5, seed=2).astype(np.float32) / 255
    assert http.post("/v2/models/tiny/versions/1/infer", json=infer_doc(x, [5, 784])).status_code == 200
    assert http.post("/v2/models/tiny/infer", json=infer_doc(x[:1], [1, 784])).status_code == 200
    http.get("/v2/models/tiny")
    after = http.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("mnist_images_processed_total", model="tiny", version="1") == 5
    assert delta("mnist_images_processed_total", model="tiny", version="2") == 1
    assert delta("http_requests_total", route="/v2/infer", method="POST", status="200") == 2
    assert delta("http_requests_total", route="/v2/metadata", method="GET", status="200") == 1
    paths = http.get("/openapi.json").json()["paths"]
    assert "/v2/models/{name}/infer" in paths
    assert "/v2/models/{name}/versions/{version}/infer" in paths


def test_feedback_works_on_v2_answers(http: httpx.Client) -> None:
    resp = http.post("/v2/models/tiny/infer", json=infer_doc(np.zeros(784), [1, 784], outputs=[{"name": "label"}]))
    label = resp.json()["outputs"][0]["data"][0]
    pid = resp.headers["x-prediction-id"]
    fb = http.post("/v1/feedback", json={"prediction_id": pid, "label": label})
    assert fb.status_code == 200, fb.text
    assert fb.json() == {"prediction_id": pid, "correct": True}


def test_version_path_tricks_are_not_found(http: httpx.Client) -> None:
    oip_error(http.get("/v2/models/tiny/versions/..%2F..%2Fetc"), 404, "")
    oip_error(http.post("/v2/models/tiny/versions/%2E%2E/infer", json=infer_doc(ZEROS, [1, 784])), 404, "")


def test_wrong_method_on_a_known_path_is_405(http: httpx.Client) -> None:
    resp = http.put("/v2/health/live")
    oip_error(resp, 405, "method PUT is not allowed")
    assert resp.headers["allow"] == "GET"
    assert http.get("/v2/models/tiny/infer").headers["allow"] == "POST"


def test_timeout_parameter_is_a_deadline(tc: triton.InferenceServerClient) -> None:
    """tritonclient's ``timeout`` (microseconds) becomes the request's deadline, like X-Request-Deadline-Ms."""
    inp = triton.InferInput("pixels", [64, 784], "FP32")
    inp.set_data_from_numpy(np.zeros((64, 784), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="deadline") as exc:
        tc.infer("tiny", [inp], timeout=1)
    assert exc.value.status() in ("503", "504")
    assert tc.infer("tiny", [inp], timeout=5_000_000).as_numpy("probabilities").shape == (64, 10)
