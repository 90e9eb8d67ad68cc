"""The fast tier: the whole app in-process (httpx's ASGI transport, the real lifespan, the real ONNX model), plus
unit tests of the inference core and the decoders. No subprocess, no socket."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from service import decode
from service.app import create_app
from service.errors import (
    InvalidInput,
    MalformedBody,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)
from service.inference import Core
from service.settings import Settings

App = tuple[httpx.AsyncClient, Core]


async def started(tiny_repo: Path, **settings: Any) -> AsyncIterator[App]:
    app = create_app(Settings(model_repository=tiny_repo, access_log=False, gc_tuning=False, **settings))
    async with app.router.lifespan_context(app):
        core: Core = app.state.core
        for _ in range(1000):
            if core.ready:
                break
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app, client=("10.0.0.1", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, core


@pytest.fixture
async def app(tiny_repo: Path) -> AsyncIterator[App]:
    async for pair in started(tiny_repo):
        yield pair


def image(value: float = 0.2) -> list[float]:
    return [value] * 784


# ---------------------------------------------------------------------------------------------- the app
async def test_predict_feedback_and_headers(app: App) -> None:
    client, _ = app
    r = await client.post("/v1/predict", json={"image": image()}, headers={"x-request-id": "abc"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["request_id"] == "abc" == r.headers["x-request-id"]
    assert doc["prediction_id"] == r.headers["x-prediction-id"] != "abc"
    assert "queue;dur=" in r.headers["server-timing"]
    fb = await client.post("/v1/feedback", json={"prediction_id": doc["prediction_id"], "label": doc["label"]})
    assert fb.json() == {"prediction_id": doc["prediction_id"], "correct": True}


class _Server:
    """A server's ``send`` whose owner also offers ``respond`` (the guarded protocol's request cycle)."""

    def __init__(self, takes: bool) -> None:
        self.takes, self.responses, self.messages = takes, [], []  # type: ignore[var-annotated]

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        self.responses.append((status, dict(headers), body))
        return self.takes

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)


@pytest.mark.parametrize("takes", [True, False])
async def test_a_hot_route_answers_through_the_servers_respond_when_it_takes_it(tiny_repo: Path, takes: bool) -> None:
    """One call with the whole response where the server offers ``respond``; the ASGI messages where it declines
    (a full write buffer, say)."""
    app = create_app(Settings(model_repository=tiny_repo, access_log=False, gc_tuning=False))
    body = orjson.dumps({"image": image()})
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {}}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    server = _Server(takes)
    async with app.router.lifespan_context(app):
        for _ in range(1000):
            if app.state.core.ready:
                break
            await asyncio.sleep(0.01)
        await app(scope, receive, server.send)
    ((status, headers, content),) = server.responses
    assert status == 200
    assert orjson.loads(content)["prediction_id"] == headers[b"x-prediction-id"].decode()
    assert b"x-request-id" in headers
    if takes:
        assert server.messages == []
    else:
        assert [m["type"] for m in server.messages] == ["http.response.start", "http.response.body"]
        assert server.messages[1]["body"] == content


async def test_every_route_of_the_docs_is_served(app: App) -> None:
    client, _ = app
    spec = (await client.get("/openapi.json")).json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/feedback", "/v2/models/{name}/infer", "/healthz"} <= set(
        spec["paths"]
    )
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "image/png", "multipart/form-data"} <= set(body)
    assert (await client.get("/docs")).status_code == 200


async def test_no_redirect_is_built_from_the_host_header(app: App) -> None:
    client, _ = app
    r = await client.get("/v1/models/", headers={"host": "evil.example"})
    assert r.status_code == 404
    assert "location" not in r.headers


@pytest.mark.parametrize(
    ("doc", "status", "code"),
    [
        ({"image": [True] + [0.0] * 783}, 422, "invalid_type"),
        ({"image": ["0.1"] * 784}, 422, "invalid_type"),
        ({"image": [{}] * 784}, 422, "invalid_type"),
        ({"image": [0.1] * 785}, 422, "invalid_shape"),
        ({"image": [[0.1] * 28] * 27 + [[0.1] * 27]}, 422, "invalid_shape"),
        ({"image": [0.1] * 783 + [[0.1]]}, 422, "invalid_shape"),
        ({"image": [2.0] * 784}, 422, "out_of_range"),
        ([1, 2], 422, "missing_field"),
        ({"images": [image()]}, 422, "missing_field"),
    ],
)
async def test_bad_single_images_are_named(app: App, doc: object, status: int, code: str) -> None:
    client, _ = app
    r = await client.post("/v1/predict", content=orjson.dumps(doc), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


async def test_a_hostile_batch_is_refused_while_it_is_decoded(app: App) -> None:
    client, _ = app
    many_empty = b'{"images": [' + b"[0.5]," * 200_000 + b"[0.5]]}"
    r = await client.post("/v1/predict/batch", content=many_empty, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text  # over 4,096 images: refused at the 4,097th, not after building 200,000
    huge = b'{"image": [' + b" " * (9 << 20) + b"0]}"
    r = await client.post("/v1/predict", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413


async def test_feedback_token_and_rate_limit(tiny_repo: Path) -> None:
    async for client, _ in started(tiny_repo, feedback_token="s3cret", feedback_rate_per_s=1.0):
        pid = (await client.post("/v1/predict", json={"image": image()})).json()["prediction_id"]
        doc = {"prediction_id": pid, "label": 1}
        assert (await client.post("/v1/feedback", json=doc)).status_code == 401
        auth = {"authorization": "Bearer s3cret"}
        statuses = [(await client.post("/v1/feedback", json=doc, headers=auth)).status_code for _ in range(6)]
        assert statuses[0] == 200
        assert 429 in statuses
        limited = await client.post("/v1/feedback", json=doc, headers=auth)
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1


async def test_a_bulk_body_that_cannot_fit_the_queue_is_refused_before_it_is_read(tiny_repo: Path) -> None:
    async for client, core in started(tiny_repo, max_bulk_queue_images=100):
        model = core.registry.default
        with pytest.raises(Overloaded) as refused:  # 200 raw images: more than the queue holds
            core.room_for(decode.RAW, str(200 * 784), model, 1 << 24)
        assert refused.value.code == "queue_full"
        core.room_for(decode.RAW, str(100 * 784), model, 1 << 24)  # fits
        core.room_for(decode.NPY, str(200 * 784 + 128), model, 1 << 24)  # .npy: perhaps 50 float32 images
        core.room_for(decode.JSON, str(10 << 20), model, 1 << 24)  # not for JSON: its size says little
        r = await client.post("/v1/predict/batch", content=bytes(200 * 784),
                              headers={"content-type": "application/octet-stream"})  # fmt: skip
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "queue_full"
        ok = await client.post("/v1/predict/batch", content=bytes(100 * 784),
                               headers={"content-type": "application/octet-stream"})  # fmt: skip
        assert ok.status_code == 200, ok.text
        limit = core.settings.max_body_bytes  # over the body limit: 413, whatever the queue holds
        huge = await client.post("/v1/predict/batch", content=bytes(limit + 784),
                                 headers={"content-type": "application/octet-stream"})  # fmt: skip
        assert huge.status_code == 413, huge.text


async def test_feedback_bodies_are_bounded_before_reading(app: App) -> None:
    client, _ = app
    r = await client.post("/v1/feedback", content=b" " * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 413


async def test_oip_infer_in_process(app: App) -> None:
    client, _ = app
    doc = {"inputs": [{"name": "pixels", "shape": [2, 784], "datatype": "UINT8", "data": [0] * 1568}]}
    r = await client.post("/v2/models/tiny/infer", json=doc)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"] == [2, 10]
    r = await client.post("/v2/models/tiny/infer", json=doc, headers={"inference-header-content-length": "²".encode()})
    assert r.status_code == 400
    assert set(r.json()) == {"error"}
    bools = {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [True] * 784}]}
    assert (await client.post("/v2/models/tiny/infer", json=bools)).status_code == 422


# ---------------------------------------------------------------------------------------------- the core
async def test_a_callers_deadline_replaces_the_request_timeout_up_to_the_maximum(app: App) -> None:
    _, core = app
    assert core.admit(None).budget_s == core.settings.request_timeout_s
    long = core.admit(60.0)
    assert long.budget_s == 60.0 > core.settings.request_timeout_s
    assert "60000 ms" in long.why
    assert core.admit(3600.0).budget_s == core.settings.max_deadline_s
    with pytest.raises(InvalidInput):
        core.admit(-1.0)
    with pytest.raises(InvalidInput):
        core.deadline_ms("soon")
    with pytest.raises(InvalidInput):
        core.deadline_ms("nan")


async def test_a_504_names_the_deadline_that_passed(app: App) -> None:
    _, core = app
    state = core.state
    gate = asyncio.Event()
    real: Callable[..., Any] = state.registry.default.run

    def held(x: np.ndarray) -> np.ndarray:
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(10)
        out: np.ndarray = real(x)
        return out

    loop = asyncio.get_running_loop()
    state.registry.default.run = held  # type: ignore[method-assign,assignment]
    state.batcher.inline_budget_s = 0.0
    try:
        first = asyncio.ensure_future(core.infer(core.admit(None), np.zeros((1, 784), np.float32)))
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceError) as err:
            await core.infer(core.admit(0.05, source="X-Request-Deadline-Ms"), np.zeros((1, 784), np.float32))
        assert err.value.status_code == 504
        assert "50 ms, from X-Request-Deadline-Ms" in err.value.message
        gate.set()
        await first
    finally:
        gate.set()
        state.registry.default.run = real  # type: ignore[method-assign]


async def test_big_bodies_are_decoded_off_the_loop_one_at_a_time(app: App) -> None:
    """A big body is decoded in the core's one decoding thread, never on the event loop, and never two at once
    (a big JSON takes several times its size while it is decoded); a small one is decoded where it arrived."""
    _, core = app
    loop_thread = threading.get_ident()
    lock = threading.Lock()
    running, most, threads = 0, 0, set()

    def work(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            threads.add(threading.get_ident())
        time.sleep(0.02)  # long enough for the other calls to start, were they allowed to
        with lock:
            running -= 1
        return i

    big = core.OFF_LOOP_BYTES + 1
    assert await asyncio.gather(*(core.offload(big, work, i) for i in range(4))) == [0, 1, 2, 3]
    assert most == 1
    assert len(threads) == 1
    assert loop_thread not in threads
    threads.clear()
    assert await core.offload(core.OFF_LOOP_BYTES, work, 7) == 7
    assert threads == {loop_thread}


# ---------------------------------------------------------------------------------------------- decoders
SHAPE = decode.Shape(784, 28, 28, 4, 4096 * 4096)


def test_decoder_table_by_media_type() -> None:
    body = orjson.dumps({"image": image(0.5)})
    x = decode.decode(decode.SINGLE, "application/json; charset=utf-8", body, SHAPE)
    assert x.shape == (1, 784)
    assert x.dtype == np.float32
    raw = decode.decode(decode.MANY, "application/octet-stream", bytes(784 * 2), SHAPE)
    assert raw.dtype == np.uint8
    assert raw.shape == (2, 784)
    with pytest.raises(UnsupportedMediaType):
        decode.decode(decode.SINGLE, "text/plain", body, SHAPE)
    with pytest.raises(PayloadTooLarge):
        decode.decode(decode.MANY, "application/octet-stream", bytes(784 * 5), SHAPE)
    with pytest.raises(MalformedBody):
        decode.decode(decode.SINGLE, "application/json", b"{", SHAPE)
    with pytest.raises(InvalidInput):
        decode.decode(decode.MANY, "application/json", orjson.dumps({"images": []}), SHAPE)


def test_the_kept_json_parser_survives_refused_bodies_and_keeps_no_bulk_buffers() -> None:
    """Small bodies share one simdjson parser per thread: every refusal leaves it usable, and a body over
    ``REUSED_PARSER_BYTES`` is parsed by a parser of its own (the kept one never grows to bulk size)."""
    good = orjson.dumps({"image": image(0.25)})
    refused = [b"{", b'{"image": [1, "x"]}', b'{"image": [[0.1, 0.2], [0.3]]}', b'{"image": true}', b"[1, 2]",
               b'{"image": [1e999]}', orjson.dumps({"image": image(0.5)[:-1]})]  # fmt: skip
    for body in refused:
        with pytest.raises((MalformedBody, InvalidInput)):
            decode.decode(decode.SINGLE, "application/json", body, SHAPE)
        x = decode.decode(decode.SINGLE, "application/json", good, SHAPE)
        np.testing.assert_array_equal(x, np.full((1, 784), 0.25, np.float32))
    kept = decode._parser(len(good))
    assert decode._parser(10) is kept
    assert decode._parser(decode.REUSED_PARSER_BYTES + 1) is not kept
    big = orjson.dumps({"images": [image(0.75)] * 4})  # ~20 KB: still the kept parser's
    assert len(big) <= decode.REUSED_PARSER_BYTES
    assert decode.decode(decode.MANY, "application/json", big, SHAPE).shape == (4, 784)
    assert decode._parser(10) is kept
