"""The gRPC front-end (Open Inference Protocol, ``inference.GRPCInferenceService``) of a real server process.

The client is Triton's own, ``tritonclient.grpc``, and where a test needs a request no client would send
(typed contents, malformed tensors, fuzzed messages) it builds it with the message classes that client
ships (Triton's ``grpc_service.proto``, a superset of the protocol) and sends the bytes on a plain gRPC
channel. Tests that need calls to wait (cancellation, deadlines, drain, shared batches) run the server on
the stand-in engine of tests/standin.py: the real model behind a gate the test holds, so who waits where
follows from events the test causes, never from timing.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.utils import InferenceServerException

from bench import grpc_load
from reliability.serverproc import wait_ready
from tests.helpers import (
    DEFAULT_MODEL,
    Server,
    assert_clean_shutdown,
    mnist_test_digits,
    offline_probabilities,
    start_server,
)
from tests.standin import Engine

MODEL = "mnist-mlp"
INFER = "/inference.GRPCInferenceService/ModelInfer"
SERVICE = "inference.GRPCInferenceService"
REPO = DEFAULT_MODEL.parent.parent
#: What a request may get back. Never INTERNAL or UNKNOWN, whatever it holds.
CLIENT_ERRORS = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}


# ---------------------------------------------------------------------------------------------- helpers
def grpc_server(tmp: Path, *args: str, engine: Engine | None = None) -> tuple[Server, str]:
    """A server with gRPC on; ready when returned. The gRPC port stays reserved (bound here) until the process
    is launched, so the launcher cannot pick the same free port for HTTP."""
    launcher = engine.launcher() if engine is not None else ("-m", "service.server")
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        srv = start_server(REPO, tmp, "--no-access-log", "--grpc-port", str(port), *args, launcher=launcher,
                           wait_ready=False)  # fmt: skip
    wait_ready(srv)
    return srv, f"127.0.0.1:{port}"


def metric(server: Server, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(\{\})?") + r" ([0-9.e+-]+)"
    found = re.search("^" + pattern + "$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def request(images: np.ndarray | None = None, *, datatype: str = "UINT8", **fields: Any) -> tpb.ModelInferRequest:
    """A ModelInferRequest (Triton's message class) with ``images`` as one raw input named ``pixels``."""
    req = tpb.ModelInferRequest(model_name=fields.pop("model_name", MODEL), **fields)
    if images is not None:
        req.inputs.add(name="pixels", datatype=datatype, shape=list(images.shape))
        req.raw_input_contents.append(np.ascontiguousarray(images).tobytes())
    return req


def call(target: str, body: bytes, timeout: float = 30) -> tuple[str, str, bytes]:
    """(status code name, details, response bytes) of one ModelInfer call with these request bytes."""
    with grpc.insecure_channel(target) as channel:
        try:
            return "OK", "", channel.unary_unary(INFER)(body, timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or "", b""


def health_status(target: str, service: str = "") -> str:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def digits_image(seed: int = 0, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 784), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    srv, target = grpc_server(tmp_path_factory.mktemp("grpc"), "--max-images-per-request", "2048")
    yield srv, target
    assert_clean_shutdown(srv)


@pytest.fixture(scope="module")
def target(served: tuple[Server, str]) -> str:
    return served[1]


@pytest.fixture
def tc(target: str) -> Iterator[tg.InferenceServerClient]:
    client = tg.InferenceServerClient(target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return mnist_test_digits()


@pytest.fixture(scope="module")
def offline(digits: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The model's probabilities for the test digits, from ONNX Runtime in this process."""
    return offline_probabilities(digits[0])


# ---------------------------------------------------------------------------------------------- protocol
def test_health_and_metadata_with_tritonclient(tc: tg.InferenceServerClient, target: str) -> None:
    assert tc.is_server_live()
    assert tc.is_server_ready()
    assert tc.is_model_ready(MODEL)
    assert tc.is_model_ready(MODEL, "1")
    meta = tc.get_server_metadata()
    assert meta.name == "mnist-serving"
    assert "classification" in meta.extensions
    model = tc.get_model_metadata(MODEL)
    assert model.name == MODEL
    assert list(model.versions) == ["1"]
    assert model.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("pixels", "FP32", [-1, 784])]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
        ("probabilities", "FP32", [-1, 10]),
        ("label", "INT64", [-1]),
    ]
    for bad in (lambda: tc.get_model_metadata("nope"), lambda: tc.is_model_ready(MODEL, "7")):
        with pytest.raises(InferenceServerException) as err:
            bad()
        assert err.value.status() == "StatusCode.NOT_FOUND"
    # the standard health service, as Kubernetes' gRPC probes ask it: "" = liveness, "readiness"
    assert health_status(target) == "SERVING"
    assert health_status(target, "readiness") == "SERVING"
    assert health_status(target, SERVICE) == "SERVING"
    with pytest.raises(grpc.RpcError) as rpc:
        health_status(target, "no.such.Service")
    assert rpc.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_reflection_describes_the_service(target: str) -> None:
    """What grpcurl does without the .proto: list the services, then resolve the inference service's methods."""
    with grpc.insecure_channel(target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert {SERVICE, "grpc.health.v1.Health"} <= set(db.get_services())
        service = DescriptorPool(db).FindServiceByName(SERVICE)
        assert [m.name for m in service.methods] == [
            "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"
        ]  # fmt: skip
        assert service.methods_by_name["ModelInfer"].input_type.fields_by_name["raw_input_contents"].number == 7


@pytest.mark.slow
def test_every_test_digit_gets_the_offline_label(
    tc: tg.InferenceServerClient, digits: tuple[np.ndarray, np.ndarray], offline: np.ndarray
) -> None:
    """All the MNIST test digits (10,000 with ../shared), UINT8 raw in 1,000-image calls, then single images."""
    x = digits[0].reshape(-1, 784).astype(np.uint8)
    labels, probs = [], []
    for i in range(0, len(x), 1000):
        inp = tg.InferInput("pixels", [len(x[i : i + 1000]), 784], "UINT8")
        inp.set_data_from_numpy(x[i : i + 1000])
        result = tc.infer(MODEL, [inp], request_id=f"chunk-{i}")
        assert result.get_response().id == f"chunk-{i}"
        assert result.get_response().model_version == "1"
        assert result.get_response().parameters["prediction_id"].string_param
        labels.append(result.as_numpy("label"))
        probs.append(result.as_numpy("probabilities"))
    got = np.concatenate(labels)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, offline.argmax(axis=1))
    np.testing.assert_allclose(np.concatenate(probs), offline, rtol=1e-5, atol=1e-6)
    accuracy = float((got == digits[1]).mean())
    print(f"gRPC: {len(got)} digits, accuracy {accuracy:.4f}")
    for i in range(0, len(x), max(1, len(x) // 50)):  # interactive path: one image per call, [1, 28, 28]
        inp = tg.InferInput("pixels", [1, 28, 28], "UINT8")
        inp.set_data_from_numpy(x[i].reshape(1, 28, 28))
        out = tc.infer(MODEL, [inp], outputs=[tg.InferRequestedOutput("label")])
        assert out.as_numpy("label").tolist() == [offline[i].argmax()]
        assert out.as_numpy("probabilities") is None  # only what was asked for


def test_typed_contents_and_fp32(target: str, digits: tuple[np.ndarray, np.ndarray], offline: np.ndarray) -> None:
    x = digits[0][:64].reshape(-1, 784)
    typed = tpb.ModelInferRequest(model_name=MODEL)
    typed.inputs.add(name="pixels", datatype="UINT8", shape=[64, 784]).contents.uint_contents.extend(x.ravel().tolist())
    f32 = (x.astype(np.float32) / 255).astype(np.float32)
    typed_f = tpb.ModelInferRequest(model_name=MODEL)
    typed_f.inputs.add(name="pixels", datatype="FP32", shape=[64, 28, 28]).contents.fp32_contents.extend(f32.ravel())
    raw_f = request(f32, datatype="FP32")
    for req in (typed, typed_f, raw_f):
        code, details, body = call(target, req.SerializeToString())
        assert code == "OK", details
        resp = tpb.ModelInferResponse.FromString(body)
        assert [o.name for o in resp.outputs] == ["probabilities", "label"]
        assert not resp.outputs[0].HasField("contents")  # outputs always in raw_output_contents
        probs = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(64, 10)
        np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[1], "<i8"), offline[:64].argmax(axis=1))
        np.testing.assert_allclose(probs, offline[:64], rtol=1e-5, atol=1e-6)


def test_classification_output(tc: tg.InferenceServerClient, digits: tuple[np.ndarray, np.ndarray],
                               offline: np.ndarray) -> None:  # fmt: skip
    inp = tg.InferInput("pixels", [4, 784], "UINT8")
    inp.set_data_from_numpy(digits[0][:4].reshape(4, 784).astype(np.uint8))
    result = tc.infer(MODEL, [inp], outputs=[tg.InferRequestedOutput("probabilities", class_count=3)])
    top = result.as_numpy("probabilities")
    assert top.shape == (4, 3)
    for row, expected in zip(top, offline[:4], strict=True):
        scores = [(float(s.split(b":")[0]), int(s.split(b":")[1])) for s in row]
        assert scores[0][1] == expected.argmax()
        assert [i for _, i in scores] == list(np.argsort(-expected, kind="stable")[:3])
        assert scores[0][0] == pytest.approx(float(expected.max()), abs=1e-6)


# ---------------------------------------------------------------------------------------------- bad input
def _typed(datatype: str, field: str, values: list[Any], shape: list[int]) -> bytes:
    req = tpb.ModelInferRequest(model_name=MODEL)
    getattr(req.inputs.add(name="pixels", datatype=datatype, shape=shape).contents, field).extend(values)
    return bytes(req.SerializeToString())


def _edited(edit: Callable[[tpb.ModelInferRequest], object]) -> bytes:
    """One valid single-image request, edited."""
    req = request(ONE)
    edit(req)
    return bytes(req.SerializeToString())


ONE = digits_image()
NAN = np.full((1, 784), np.nan, np.float32)
INVALID = "INVALID_ARGUMENT"
MALFORMED: dict[str, tuple[bytes, str, str]] = {
    "not protobuf": (b"\xff\xff\xff\xff garbage", INVALID, "does not parse"),
    "no input": (request().SerializeToString(), INVALID, "0 inputs"),
    "two inputs": (_edited(lambda r: r.inputs.add(name="x")), INVALID, ""),
    "wrong input name": (_edited(lambda r: setattr(r.inputs[0], "name", "x")), INVALID, "'x'"),
    "INT64 datatype": (request(ONE.astype(np.int64), datatype="INT64").SerializeToString(), INVALID, "INT64"),
    "shape [1, 783]": (request(ONE[:, :783]).SerializeToString(), INVALID, "shape"),
    "raw size differs from shape": (_edited(lambda r: r.inputs[0].shape.__setitem__(0, 2)), INVALID, ""),
    "negative batch": (_edited(lambda r: r.inputs[0].shape.__setitem__(0, -1)), INVALID, ""),
    "zero images": (request(ONE[:0]).SerializeToString(), INVALID, ""),
    "NaN": (request(NAN, datatype="FP32").SerializeToString(), INVALID, ""),
    "FP32 above 1": (request(np.full((1, 784), 2.0, np.float32), datatype="FP32").SerializeToString(), INVALID, ""),
    "UINT8 contents above 255": (_typed("UINT8", "uint_contents", [256] * 784, [1, 784]), INVALID, ""),
    "FP32 in int_contents": (_typed("FP32", "int_contents", [0] * 784, [1, 784]), INVALID, "contents"),
    "too few typed values": (_typed("FP32", "fp32_contents", [0.0] * 700, [1, 784]), INVALID, ""),
    "no data": (_edited(lambda r: r.ClearField("raw_input_contents")), INVALID, "no data"),
    "raw and contents": (_edited(lambda r: r.inputs[0].contents.uint_contents.append(1)), INVALID, "both"),
    "two raw entries": (_edited(lambda r: r.raw_input_contents.append(b"x")), INVALID, "raw_input_contents"),
    "unknown output": (_edited(lambda r: r.outputs.add(name="logits")), INVALID, "logits"),
    "output twice": (_edited(lambda r: [r.outputs.add(name="label") for _ in range(2)]), INVALID, "twice"),
    "string timeout": (_edited(lambda r: setattr(r.parameters["timeout"], "string_param", "1")), INVALID, "timeout"),
    "unknown model": (request(ONE, model_name="resnet").SerializeToString(), "NOT_FOUND", "resnet"),
    "unknown version": (request(ONE, model_version="9").SerializeToString(), "NOT_FOUND", "9"),
    "too many images": (request(digits_image(n=2049)).SerializeToString(), "RESOURCE_EXHAUSTED", "2048"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_get_the_right_status(target: str, case: str) -> None:
    body, expected, fragment = MALFORMED[case]
    code, details, _ = call(target, body)
    assert code == expected, (case, code, details)
    assert fragment in details, details
    assert "Traceback" not in details
    assert ".py" not in details


@pytest.mark.parametrize(
    ("model", "tensor"),
    [
        (MODEL, {"name": "pixels", "shape": [1, 783], "datatype": "UINT8", "data": [0] * 783}),
        (MODEL, {"name": "x", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}),
        (MODEL, {"name": "pixels", "shape": [1, 784], "datatype": "UINT8", "data": [300] * 784}),
        (MODEL, {"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [2.0] * 784}),
        ("resnet", {"name": "pixels", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}),
    ],
)
def test_errors_carry_the_rest_message(served: tuple[Server, str], model: str, tensor: dict[str, Any]) -> None:
    """The same bad tensor sent to REST /v2 (JSON data) and to gRPC (typed contents): the same message."""
    srv, target = served
    rest = httpx.post(f"{srv.url}/v2/models/{model}/infer", json={"inputs": [tensor]}, timeout=10)
    assert rest.status_code in (404, 422), rest.text
    req = tpb.ModelInferRequest(model_name=model)
    spec = req.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
    if tensor["datatype"] == "FP32":
        spec.contents.fp32_contents.extend(tensor["data"])
    else:
        spec.contents.uint_contents.extend(tensor["data"])
    code, details, _ = call(target, req.SerializeToString())
    assert code == ("NOT_FOUND" if rest.status_code == 404 else "INVALID_ARGUMENT")
    assert details == rest.json()["error"]


def test_classification_of_the_label_output_is_refused(target: str) -> None:
    req = request(ONE)
    req.outputs.add(name="label").parameters["classification"].int64_param = 3
    code, details, _ = call(target, req.SerializeToString())
    assert code == "INVALID_ARGUMENT"
    assert "classification" in details


def test_a_message_over_the_size_limit_is_resource_exhausted(tmp_path: Path) -> None:
    srv, target = grpc_server(tmp_path, "--grpc-max-message-bytes", "100000")
    try:
        code, _, _ = call(target, request(digits_image(n=200)).SerializeToString())  # 156,800 bytes of pixels
        assert code == "RESOURCE_EXHAUSTED"
        code, _, _ = call(target, request(digits_image(n=100)).SerializeToString())
        assert code == "OK"
    finally:
        assert_clean_shutdown(srv)


_NAMES = st.sampled_from(["pixels"] * 4 + ["probabilities", "label", "", "x", "pixels\x00", "p" * 300])
_DTYPES = st.sampled_from(["UINT8"] * 3 + ["FP32"] * 3 + ["INT64", "BYTES", "FP16", "", "uint8"])
_SHAPES = st.sampled_from([[1, 784], [2, 28, 28], [1, 28, 28], [2, 784]]) | st.lists(st.integers(-3, 3000), max_size=4)


@st.composite
def infer_requests(draw: st.DrawFn) -> bytes:
    req = tpb.ModelInferRequest(model_name=draw(st.sampled_from([MODEL] * 8 + ["", "other"])),
                                model_version=draw(st.sampled_from([""] * 6 + ["1", "0", "-1", "a"])),
                                id=draw(st.text(max_size=8)))  # fmt: skip
    for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2]))):
        spec = req.inputs.add(name=draw(_NAMES), datatype=draw(_DTYPES), shape=draw(_SHAPES))
        kind = draw(st.sampled_from(["none"] * 4 + ["fp32", "uint", "int64", "bytes"]))
        n = draw(st.sampled_from([0, 1, 783, 784, 1568]))
        if kind == "fp32":
            spec.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), min_size=n, max_size=n)))
        elif kind == "uint":
            spec.contents.uint_contents.extend(draw(st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n)))
        elif kind == "int64":
            spec.contents.int64_contents.extend([draw(st.integers(-(2**63), 2**63 - 1))] * n)
        elif kind == "bytes":
            spec.contents.bytes_contents.append(draw(st.binary(max_size=16)))
        if draw(st.booleans()):
            p = spec.parameters[draw(st.sampled_from(["binary_data_size", "x"]))]
            p.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2]))):
        size = draw(st.sampled_from([784, 784, 1568, 3136, 6272, 0, 1]))
        req.raw_input_contents.append(draw(st.binary(min_size=size, max_size=size)))
    for _ in range(draw(st.integers(0, 3))):
        out = req.outputs.add(name=draw(_NAMES))
        if draw(st.booleans()):
            param = out.parameters["classification"]
            kind = draw(st.sampled_from(["int64_param", "uint64_param", "bool_param", "string_param", "double_param"]))
            value = {"int64_param": st.integers(-(2**63), 2**63 - 1), "uint64_param": st.integers(0, 2**64 - 1),
                     "bool_param": st.booleans(), "string_param": st.text(max_size=4),
                     "double_param": st.floats()}[kind]  # fmt: skip
            setattr(param, kind, draw(value))
    if draw(st.booleans()):
        req.parameters["timeout"].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    body = req.SerializeToString()
    if draw(st.integers(0, 3)) == 0:  # then damage the bytes: flip, cut or splice
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.binary(max_size=8)) + body[cut + draw(st.integers(0, 8)) :]
    return bytes(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=infer_requests())
def test_fuzzed_requests_never_get_an_internal_error(target: str, body: bytes) -> None:
    code, details, _ = call(target, body)
    assert code in CLIENT_ERRORS, (code, details)


def test_the_server_is_healthy_after_bad_input(served: tuple[Server, str], tc: tg.InferenceServerClient) -> None:
    srv, target = served
    assert health_status(target) == "SERVING"
    assert tc.is_server_ready()
    assert metric(srv, "mnist_grpc_requests_total", 'code="INTERNAL",method="ModelInfer"') == 0
    assert metric(srv, "mnist_grpc_requests_total", 'code="INVALID_ARGUMENT",method="ModelInfer"') >= 1


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_are_labelled_by_transport(served: tuple[Server, str], tc: tg.InferenceServerClient) -> None:
    srv, _ = served
    before = {t: metric(srv, "mnist_inference_requests_total", f'transport="{t}"') for t in ("grpc", "http")}
    ok = metric(srv, "mnist_grpc_requests_total", 'code="OK",method="ModelInfer"')
    count = metric(srv, "mnist_grpc_request_duration_seconds_count", 'method="ModelInfer"')
    inp = tg.InferInput("pixels", [1, 784], "UINT8")
    inp.set_data_from_numpy(ONE)
    tc.infer(MODEL, [inp])
    httpx.post(f"{srv.url}/v1/predict", json={"image": (ONE[0] / 255).tolist()}, timeout=10).raise_for_status()
    assert metric(srv, "mnist_inference_requests_total", 'transport="grpc"') == before["grpc"] + 1
    assert metric(srv, "mnist_inference_requests_total", 'transport="http"') == before["http"] + 1
    assert metric(srv, "mnist_grpc_requests_total", 'code="OK",method="ModelInfer"') == ok + 1
    assert metric(srv, "mnist_grpc_request_duration_seconds_count", 'method="ModelInfer"') == count + 1


def test_the_bench_load_generator(target: str, digits: tuple[np.ndarray, np.ndarray]) -> None:
    """bench/grpc_load.py against the server: every call answered OK, latencies and its own CPU reported."""
    bodies = grpc_load.digit_bodies(digits[0], 1, pool=8)
    result = grpc_load.run(target, bodies, concurrency=4, duration_s=2.0, warmup_s=0.2, processes=2)
    assert result.requests > 0
    assert result.statuses == {"OK": result.requests}
    assert 0 < result.p50_ms <= result.p99_ms <= result.latency_max_ms
    assert result.loadgen_cpu_s > 0
    assert result.to_dict()["images_per_s"] == result.good_rps
    bulk = grpc_load.run(target, grpc_load.digit_bodies(digits[0], 64, pool=2), concurrency=1, duration_s=0.5,
                         warmup_s=0.1, images_per_request=64)  # fmt: skip
    assert bulk.errors == 0
    assert bulk.images_per_s == bulk.good_rps * 64


# ---------------------------------------------------------------------------------------------- waiting calls
@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine(tmp_path / "engine", delay_s=0.02) as e:
        yield e


def _submit(target: str, body: bytes, timeout: float | None = None) -> grpc.Future:
    channel = grpc.insecure_channel(target)
    future = channel.unary_unary(INFER).future(body, timeout=timeout)
    future.add_done_callback(lambda _: channel.close())
    return future


def _outcome(future: grpc.Future) -> str:
    try:
        future.result(timeout=60)
        return "OK"
    except grpc.FutureCancelledError:
        return "CANCELLED"
    except grpc.RpcError as exc:
        return str(exc.code().name)


def _hold_one_call(srv: Server, target: str, engine: Engine) -> grpc.Future:
    """Hold the engine with one single-image call; further single-image calls queue behind it."""
    entered = engine.calls()[0]
    engine.hold()
    first = _submit(target, request(digits_image(1)).SerializeToString())
    wait_until(lambda: engine.calls()[0] == entered + 1 and engine.in_progress() == 1, "a call held at the gate")
    return first


def test_rest_and_grpc_requests_join_the_same_batch(tmp_path: Path, engine: Engine) -> None:
    srv, target = grpc_server(tmp_path, "--max-batch-size", "8", engine=engine)
    try:
        first = _hold_one_call(srv, target, engine)
        rest: list[httpx.Response] = []
        poster = threading.Thread(target=lambda: rest.append(
            httpx.post(f"{srv.url}/v1/predict", json={"image": (ONE[0] / 255).tolist()}, timeout=60)))  # fmt: skip
        poster.start()
        wait_until(lambda: metric(srv, "mnist_queue_depth_images", 'queue="interactive"') == 1, "REST queued")
        second = _submit(target, request(digits_image(2)).SerializeToString())
        wait_until(lambda: metric(srv, "mnist_queue_depth_images", 'queue="interactive"') == 2, "gRPC queued")
        engine.release()
        poster.join(60)
        assert _outcome(first) == "OK"
        assert _outcome(second) == "OK"
        assert rest[0].status_code == 200
        # the engine saw: the held call (1 image), then one batch of the REST and the gRPC image together
        entries = [ln for ln in engine.journal.read_text().splitlines() if ln.startswith("enter ")]
        assert entries[-2:] == ["enter 1", "enter 2"], entries[-5:]
    finally:
        engine.release()
        assert_clean_shutdown(srv)


def test_a_cancelled_call_is_dropped_before_compute(tmp_path: Path, engine: Engine) -> None:
    srv, target = grpc_server(tmp_path, "--max-batch-size", "8", engine=engine)
    try:
        first = _hold_one_call(srv, target, engine)
        entered = engine.calls()[0]
        cancelled = metric(srv, "mnist_requests_dropped_total", 'reason="cancelled"')
        doomed = _submit(target, request(digits_image(3)).SerializeToString())
        wait_until(lambda: metric(srv, "mnist_queue_depth_images", 'queue="interactive"') == 1, "the call queued")
        assert doomed.cancel()
        wait_until(lambda: metric(srv, "mnist_requests_dropped_total", 'reason="cancelled"') == cancelled + 1,
                   "the cancelled call to be dropped")  # fmt: skip
        engine.release()
        assert _outcome(first) == "OK"
        assert _outcome(doomed) == "CANCELLED"
        code, _, _ = call(target, request(digits_image(4)).SerializeToString())
        assert code == "OK"
        # the held call, then the call after: the cancelled image never reached the engine
        assert engine.calls()[0] == entered + 1
        assert metric(srv, "mnist_grpc_requests_total", 'code="CANCELLED",method="ModelInfer"') == 1
    finally:
        engine.release()
        assert_clean_shutdown(srv)


def test_deadlines_the_queue_cannot_meet_are_deadline_exceeded(tmp_path: Path, engine: Engine) -> None:
    srv, target = grpc_server(tmp_path, "--max-batch-size", "1", "--bulk-chunk-images", "1", engine=engine)
    try:
        first = _hold_one_call(srv, target, engine)
        entered = engine.calls()[0]
        # the request's own deadline (tritonclient's timeout=, microseconds), no gRPC deadline: only the
        # server can answer DEADLINE_EXCEEDED
        tc = tg.InferenceServerClient(target)
        inp = tg.InferInput("pixels", [1, 784], "UINT8")
        inp.set_data_from_numpy(ONE)
        with pytest.raises(InferenceServerException) as err:
            tc.infer(MODEL, [inp], timeout=200_000)
        assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED", err.value.message()
        tc.close()
        # the gRPC deadline is the caller's budget: the server answers it too (counted on its side)
        late = _submit(target, request(digits_image(5)).SerializeToString(), timeout=0.3)
        assert _outcome(late) == "DEADLINE_EXCEEDED"
        engine.release()
        assert _outcome(first) == "OK"
        wait_until(lambda: metric(srv, "mnist_grpc_requests_total", 'code="DEADLINE_EXCEEDED",method="ModelInfer"')
                   == 2, "both deadlines counted by the server")  # fmt: skip
        assert engine.calls()[0] == entered  # neither late call reached the engine
    finally:
        engine.release()
        assert_clean_shutdown(srv)


def test_calls_over_the_inflight_limit_are_resource_exhausted(tmp_path: Path, engine: Engine) -> None:
    srv, target = grpc_server(tmp_path, "--max-inflight-requests", "2", "--max-batch-size", "1", engine=engine)
    try:
        first = _hold_one_call(srv, target, engine)
        second = _submit(target, request(digits_image(6)).SerializeToString())
        wait_until(lambda: metric(srv, "mnist_queue_depth_images", 'queue="interactive"') == 1, "a second call queued")
        code, _, _ = call(target, request(digits_image(7)).SerializeToString())
        assert code == "RESOURCE_EXHAUSTED"
        engine.release()
        assert [_outcome(first), _outcome(second)] == ["OK", "OK"]
        assert call(target, request(digits_image(8)).SerializeToString())[0] == "OK"
    finally:
        engine.release()
        assert_clean_shutdown(srv)


def test_sigterm_drains_calls_in_flight(tmp_path: Path, engine: Engine) -> None:
    srv, target = grpc_server(tmp_path, "--max-batch-size", "1", "--bulk-chunk-images", "1",
                              "--drain-timeout-s", "30", engine=engine)  # fmt: skip
    try:
        first = _hold_one_call(srv, target, engine)
        queued = [_submit(target, request(digits_image(10 + i)).SerializeToString()) for i in range(3)]
        wait_until(lambda: metric(srv, "mnist_queue_depth_images", 'queue="interactive"') == 3, "3 calls queued")
        srv.proc.send_signal(15)
        wait_until(lambda: health_status(target, "readiness") == "NOT_SERVING", "readiness to say NOT_SERVING")
        assert health_status(target, SERVICE) == "NOT_SERVING"
        assert health_status(target) == "SERVING"  # liveness: the process is fine, only draining
        code, details, _ = call(target, request(ONE).SerializeToString())
        assert code == "UNAVAILABLE", details
        assert "shutting down" in details
        assert srv.proc.poll() is None  # still up: four calls in flight
        engine.release()
        assert [_outcome(f) for f in (first, *queued)] == ["OK"] * 4
        assert srv.proc.wait(timeout=60) == 0, srv.logs()
    finally:
        engine.release()
        if srv.proc.poll() is None:
            srv.terminate()


def test_grpc_is_off_by_default(tmp_path: Path) -> None:
    srv = start_server(REPO, tmp_path, "--no-access-log")
    try:
        assert "gRPC listening" not in srv.logs()
    finally:
        assert_clean_shutdown(srv)


def test_raw_bytes_output_format(target: str) -> None:
    """BYTES classification output in raw_output_contents: 4-byte little-endian length, then the string."""
    req = request(ONE)
    req.outputs.add(name="probabilities").parameters["classification"].int64_param = 2
    code, details, body = call(target, req.SerializeToString())
    assert code == "OK", details
    resp = tpb.ModelInferResponse.FromString(body)
    raw = resp.raw_output_contents[0]
    (n,) = struct.unpack_from("<I", raw)
    first = raw[4 : 4 + n].decode()
    assert re.fullmatch(r"[0-9.]+:[0-9]:[0-9]", first), first
    assert list(resp.outputs[0].shape) == [1, 2]
    assert resp.outputs[0].datatype == "BYTES"
