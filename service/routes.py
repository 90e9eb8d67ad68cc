"""The REST API (v1), health, readiness, model metadata and metrics."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import orjson
from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from service import decode
from service.app import ServiceState, error_json, request_id_of, state_of
from service.batcher import BatchResult, ClientDisconnected
from service.errors import Draining, InvalidInput, MalformedBody, NotFound, NotReady, PayloadTooLarge
from service.model import Model
from service.schemas import (
    BatchPrediction,
    BatchRequest,
    Feedback,
    FeedbackResult,
    Prediction,
    PredictRequest,
    Status,
    binary_body,
    error_responses,
)

router = APIRouter()
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
DEADLINE_HEADER = "x-request-deadline-ms"


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refusing more than ``limit`` bytes and bodies that trickle in past ``timeout_s``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise MalformedBody("invalid Content-Length header", code="invalid_content_length")
        if int(declared) > limit:
            raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {limit}")
    receive = request.receive
    message = await receive()  # usually the whole body is already buffered: no timer needed
    body: bytes = message.get("body", b"")
    if message.get("more_body", False):
        chunks = [body]
        size = len(body)
        try:
            async with asyncio.timeout(timeout_s):
                while message.get("more_body", False):
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientDisconnected("the client disconnected while sending its body")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise MalformedBody(f"the body did not arrive within {timeout_s:g} s", code="body_timeout") from None
        body = b"".join(chunks)
    elif message["type"] == "http.disconnect":
        raise ClientDisconnected("the client disconnected while sending its body")
    if len(body) > limit:
        raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
    request._body = body  # lets request.form() reuse it for multipart
    return body


def admitted(svc: ServiceState, request: Request) -> tuple[Model, float | None]:
    """The model to use, and the client's deadline budget in seconds (None = the service default)."""
    if not svc.ready:
        if svc.draining:
            svc.metrics.dropped["draining"].inc()
            raise Draining()
        svc.metrics.dropped["not_ready"].inc()
        raise NotReady("the model is not loaded and warm yet", headers={"Retry-After": "1"})
    budget = None
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is not None:
        try:
            budget = float(raw) / 1000.0
        except ValueError:
            budget = -1.0
        if not 0 < budget < 3600:
            raise InvalidInput(f"{DEADLINE_HEADER} must be a positive number of milliseconds", code="invalid_header")
    return svc.registry.default, budget


def timing_headers(model: Model, res: BatchResult | None, queue_s: float, inference_s: float) -> dict[str, str]:
    headers = {
        "server-timing": f"queue;dur={queue_s * 1000:.3f}, inference;dur={inference_s * 1000:.3f}",
        "x-model-version": model.version,
    }
    if res is not None:
        headers["x-batch-size"] = str(res.batch_images)
    return headers


_PREDICT_BODY = {
    "required": True,
    "content": {
        decode.JSON: {"schema": PredictRequest.model_json_schema()},
        decode.PNG: binary_body("A 28x28 grayscale PNG, white digit on black (0 = background)."),
        decode.MULTIPART: {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
    },
}


@router.post(
    "/v1/predict",
    summary="Classify one digit",
    description='JSON `{"image": [...]}` with pixels in [0, 1], or a 28x28 PNG (raw body or multipart `file`).',
    openapi_extra={"requestBody": _PREDICT_BODY},
    responses={200: {"model": Prediction}, **error_responses(400, 413, 415, 422, 500, 503, 504)},
)
async def predict(request: Request) -> Response:
    svc = state_of(request)
    settings = svc.settings
    ct = decode.media_type(request.headers.get("content-type"))
    if ct not in (decode.JSON, decode.PNG, decode.MULTIPART):
        raise decode.unsupported(ct, (decode.JSON, decode.PNG, decode.MULTIPART))
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    model, budget = admitted(svc, request)
    scale = float(model.metadata["preprocessing"].get("scale", 1 / 255))
    if ct == decode.JSON:
        x = decode.json_image(decode.parse_json(body), model.n_features, model.image_shape)
    else:
        if ct == decode.MULTIPART:
            body = await _multipart_file(request)
        x = decode.png_image(body, model.n_features, model.image_shape, settings.max_png_pixels, scale)
    res = await svc.batcher.submit(model, x, budget_s=budget, receive=request.receive)
    probs = res.probabilities[0]
    label = int(probs.argmax())
    rid = request_id_of(request.scope) or ""
    svc.quality.remember(rid, np.array([label]))
    content = orjson.dumps(
        {"label": label, "probabilities": probs, "model": model.name, "version": model.version, "request_id": rid},
        option=_NUMPY,
    )
    return Response(content, media_type=decode.JSON, headers=timing_headers(model, res, res.queue_s, res.inference_s))


async def _multipart_file(request: Request) -> bytes:
    try:
        form = await request.form(max_files=1, max_fields=4)
    except Exception as exc:  # python-multipart raises its own types for malformed bodies
        raise MalformedBody(f"malformed multipart body: {exc}", code="malformed_multipart") from exc
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise InvalidInput('the multipart body needs a "file" part holding a PNG', code="missing_field")
    return await upload.read()


_BATCH_TYPES = (decode.JSON, decode.NPY, decode.RAW)
_BATCH_BODY = {
    "required": True,
    "content": {
        decode.JSON: {"schema": BatchRequest.model_json_schema()},
        decode.NPY: binary_body("A .npy array (N, 28, 28) or (N, 784): uint8 0-255 or float32 in [0, 1]."),
        decode.RAW: binary_body("Raw uint8 pixels, N x 784 bytes, row-major."),
    },
}


@router.post(
    "/v1/predict/batch",
    summary="Classify many digits",
    description=(
        "JSON, .npy or raw uint8 bytes. One result per image, in order. `Accept: application/x-npy` or "
        "`application/octet-stream` returns the (N, 10) float32 probabilities in binary instead of JSON."
    ),
    openapi_extra={"requestBody": _BATCH_BODY},
    responses={200: {"model": BatchPrediction}, **error_responses(400, 413, 415, 422, 500, 503, 504)},
)
async def predict_batch(request: Request) -> Response:
    svc = state_of(request)
    settings = svc.settings
    ct = decode.media_type(request.headers.get("content-type"))
    if ct not in _BATCH_TYPES:
        raise decode.unsupported(ct, _BATCH_TYPES)
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    model, budget = admitted(svc, request)
    scale = float(model.metadata["preprocessing"].get("scale", 1 / 255))
    limit = settings.max_images_per_request
    if ct == decode.JSON:
        x = decode.json_images(decode.parse_json(body), model.n_features, model.image_shape, limit)
    elif ct == decode.NPY:
        x = decode.npy_images(body, model.n_features, model.image_shape, limit, scale)
    else:
        x = decode.raw_images(body, model.n_features, limit, scale)
    del body
    res: BatchResult | None = None
    if x.shape[0] <= svc.batcher.bulk_chunk_images:
        res = await svc.batcher.submit(model, x, bulk=True, budget_s=budget, receive=request.receive)
        probs, queue_s, inference_s = res.probabilities, res.queue_s, res.inference_s
    else:
        probs, queue_s, inference_s = await svc.batcher.submit_many(model, x, budget_s=budget, receive=request.receive)
    labels = probs.argmax(axis=1)
    rid = request_id_of(request.scope) or ""
    svc.quality.remember(rid, labels)
    headers = timing_headers(model, res, queue_s, inference_s)
    accept = decode.media_type(request.headers.get("accept"))
    if accept == decode.NPY:
        buf = io.BytesIO()
        np.save(buf, probs, allow_pickle=False)
        return Response(buf.getvalue(), media_type=decode.NPY, headers=headers)
    if accept == decode.RAW:
        headers["x-shape"] = f"{probs.shape[0]},{probs.shape[1]}"
        return Response(probs.astype("<f4").tobytes(), media_type=decode.RAW, headers=headers)
    content = orjson.dumps(
        {"labels": labels, "probabilities": probs, "count": int(probs.shape[0]), "model": model.name,
         "version": model.version, "request_id": rid},
        option=_NUMPY,
    )  # fmt: skip
    return Response(content, media_type=decode.JSON, headers=headers)


@router.post(
    "/v1/feedback",
    summary="Report the true label of an earlier prediction",
    response_model=FeedbackResult,
    responses=error_responses(400, 404, 422),
)
async def feedback(body: Feedback, request: Request) -> FeedbackResult:
    svc = state_of(request)
    correct = svc.quality.feedback(body.request_id, body.label, body.index)
    if correct is None:
        raise NotFound(
            f"no remembered prediction for request id {body.request_id!r} (index {body.index}); "
            "only recent predictions are kept"
        )
    return FeedbackResult(request_id=body.request_id, correct=correct)


@router.get("/healthz", summary="Liveness: the process is up", response_model=Status)
async def healthz() -> Status:
    return Status(status="alive")


@router.get(
    "/readyz",
    summary="Readiness: model loaded and warm, not draining",
    response_model=Status,
    responses=error_responses(503),
)
async def readyz(request: Request) -> Response:
    svc = state_of(request)
    if svc.ready:
        m = svc.registry.default
        return Response(orjson.dumps({"status": "ready", "model": m.name, "version": m.version}),
                        media_type=decode.JSON)  # fmt: skip
    code, message = ("draining", "shutting down") if svc.draining else ("not_ready", "warming up")
    return error_json(503, code, message, request_id_of(request.scope))


@router.get("/v1/models", summary="Metadata of the served model and every loaded version")
async def models(request: Request) -> dict[str, object]:
    reg = state_of(request).registry
    return {
        "default": reg.default.describe(),
        "loaded": [m.describe() for m in reg.models],
        "available_versions": reg.available_versions(),
    }


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    # Rendering takes a few ms: off the event loop, so a scrape never stalls predictions.
    body = await asyncio.to_thread(generate_latest, state_of(request).metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
