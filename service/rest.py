"""The REST API (v1): predict one or many, feedback, health, readiness, model metadata and metrics.

A thin transport over the inference core: each hot route reads the body, asks the core to admit, decode and
infer, and shapes the reply. The FastAPI declarations below only describe the routes in /docs.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from typing import Annotated

import msgspec
import numpy as np
import orjson
from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope

from service import decode
from service.asgi import (
    Reply,
    documented,
    endpoint,
    gone_probe,
    header,
    header_values,
    json_reply,
    read_body,
    request_id,
)
from service.asgi import client as client_of
from service.errors import InvalidInput, MalformedBody, NotFound, error_json
from service.inference import Core, Outcome
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

_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_INFER_HEADERS = (b"content-type", b"content-length", b"x-request-deadline-ms")
#: Feedback bodies are tiny; anything bigger is refused before it is read.
FEEDBACK_BODY_BYTES = 4096


class _FeedbackBody(msgspec.Struct, forbid_unknown_fields=True):
    prediction_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    label: Annotated[float, msgspec.Meta(ge=0, le=9)]  # JSON integers; 4.0 is one too (checked below)
    index: Annotated[float, msgspec.Meta(ge=0, le=65535)] = 0


_FEEDBACK = msgspec.json.Decoder(_FeedbackBody)


def timing(out: Outcome) -> list[tuple[bytes, bytes]]:
    return [
        (b"server-timing", b"queue;dur=%.3f, inference;dur=%.3f" % (out.queue_s * 1000, out.inference_s * 1000)),
        (b"x-model-version", out.model.version.encode()),
        (b"x-batch-size", b"%d" % out.batch_images),
        (b"x-prediction-id", out.prediction_id.encode()),
    ]


class Rest:
    def __init__(self, core: Callable[[], Core]) -> None:
        self.core = core

    async def _infer(self, scope: Scope, receive: Receive, table: dict[str, decode.Decoder]) -> Outcome:
        core = self.core()
        ct, length, deadline = header_values(scope, _INFER_HEADERS)
        media = decode.media_type(ct)
        if media not in table:
            raise decode.unsupported(media, tuple(table))
        limit = core.settings.max_json_bytes if media == decode.JSON else core.settings.max_body_bytes
        admission = core.admit(core.deadline_ms(deadline))
        core.room_for(media, length, admission.model, limit)
        body = await read_body(scope, receive, limit, length)
        images = await core.decode(table, ct, body, admission.model)
        del body
        return await core.infer(admission, images, gone=gone_probe(receive))

    async def predict(self, scope: Scope, receive: Receive) -> Reply:
        out = await self._infer(scope, receive, decode.SINGLE)
        probs = out.probabilities[0]
        content = orjson.dumps(
            {"label": int(out.labels[0]), "probabilities": probs, "model": out.model.name,
             "version": out.model.version, "request_id": request_id(scope), "prediction_id": out.prediction_id},
            option=_NUMPY,
        )  # fmt: skip
        return json_reply(content, timing(out))

    async def predict_batch(self, scope: Scope, receive: Receive) -> Reply:
        out = await self._infer(scope, receive, decode.MANY)
        probs = out.probabilities
        headers = timing(out)
        accept = decode.media_type(header(scope, b"accept"))
        if accept == decode.NPY:
            buf = io.BytesIO()
            np.save(buf, probs, allow_pickle=False)
            return 200, buf.getvalue(), [(b"content-type", decode.NPY.encode()), *headers]
        if accept == decode.RAW:
            headers.append((b"x-shape", f"{probs.shape[0]},{probs.shape[1]}".encode()))
            return 200, probs.astype("<f4").tobytes(), [(b"content-type", decode.RAW.encode()), *headers]
        content = orjson.dumps(
            {"labels": out.labels.astype(np.int64), "probabilities": probs, "count": int(probs.shape[0]),
             "model": out.model.name, "version": out.model.version, "request_id": request_id(scope),
             "prediction_id": out.prediction_id},
            option=_NUMPY,
        )  # fmt: skip
        return json_reply(content, headers)

    async def feedback(self, scope: Scope, receive: Receive) -> Reply:
        core = self.core()
        ct = decode.media_type(header(scope, b"content-type"))
        if ct != decode.JSON:
            raise decode.unsupported(ct, (decode.JSON,))
        body = await read_body(scope, receive, FEEDBACK_BODY_BYTES, header(scope, b"content-length"))
        try:
            fb = _FEEDBACK.decode(body)
        except msgspec.ValidationError as exc:
            raise InvalidInput(f"invalid feedback: {exc}", code="validation_error") from None
        except msgspec.DecodeError as exc:
            raise MalformedBody(f"malformed JSON: {exc}", code="malformed_json") from None
        if not (float(fb.label).is_integer() and float(fb.index).is_integer()):
            raise InvalidInput("invalid feedback: label and index must be integers", code="validation_error")
        label, index = int(fb.label), int(fb.index)
        scheme, _, token = (header(scope, b"authorization") or "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
        correct = core.feedback(fb.prediction_id, label, index, source=client_of(scope), token=given)
        if correct is None:
            raise NotFound(f"no remembered prediction {fb.prediction_id!r} (index {index}); only recent "
                           "predictions of this replica are kept")  # fmt: skip
        return json_reply(orjson.dumps({"prediction_id": fb.prediction_id, "correct": correct}))

    async def healthz(self, scope: Scope, receive: Receive) -> Reply:
        return json_reply(b'{"status":"alive"}')

    async def readyz(self, scope: Scope, receive: Receive) -> Reply:
        core = self.core()
        if core.ready:
            m = core.registry.default
            return json_reply(orjson.dumps({"status": "ready", "model": m.name, "version": m.version}))
        code, message = ("draining", "shutting down") if core.draining else ("not_ready", "warming up")
        return json_reply(error_json(code, message, request_id(scope)), status=503)

    async def models(self, scope: Scope, receive: Receive) -> Reply:
        reg = self.core().registry
        return json_reply(orjson.dumps({
            "default": reg.default.describe(),
            "loaded": [m.describe() for m in reg.models],
            "available_versions": reg.available_versions(),
        }))  # fmt: skip

    async def metrics(self, scope: Scope, receive: Receive) -> Reply:
        # Rendering takes a few ms: off the event loop, so a scrape never stalls predictions.
        body = await asyncio.to_thread(generate_latest, self.core().metrics.registry)
        return 200, body, [(b"content-type", CONTENT_TYPE_LATEST.encode())]

    def apps(self) -> dict[tuple[str, str], ASGIApp]:
        """(method, path) -> ASGI app of every route of this transport (the edge dispatches them directly)."""
        return {
            ("POST", "/v1/predict"): endpoint(self.predict),
            ("POST", "/v1/predict/batch"): endpoint(self.predict_batch),
            ("POST", "/v1/feedback"): endpoint(self.feedback),
            ("GET", "/healthz"): endpoint(self.healthz),
            ("GET", "/readyz"): endpoint(self.readyz),
            ("GET", "/v1/models"): endpoint(self.models),
            ("GET", "/metrics"): endpoint(self.metrics),
        }


# ---------------------------------------------------------------------------------------------- /docs
_PREDICT_BODY = {
    "required": True,
    "content": {
        decode.JSON: {"schema": PredictRequest.model_json_schema()},
        decode.PNG: binary_body(
            "A grayscale PNG of a digit: 28x28 white on black is used as is; any other size is centred and "
            "scaled like MNIST (docs/design.md)."
        ),
        decode.MULTIPART: {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
    },
}
_BATCH_BODY = {
    "required": True,
    "content": {
        decode.JSON: {"schema": BatchRequest.model_json_schema()},
        decode.NPY: binary_body("A .npy array (N, 28, 28) or (N, 784): uint8 0-255 or float32 in [0, 1]."),
        decode.RAW: binary_body("Raw uint8 pixels, N x 784 bytes, row-major."),
    },
}


def _doc() -> None:
    """Declaration only: the route is served by its ASGI app."""


def router(rest: Rest) -> APIRouter:
    """The v1 routes for FastAPI's router and /docs, each served by the same app the edge dispatches to."""
    r = APIRouter(tags=["REST API (v1)"])
    apps = rest.apps()
    documented(r, "/v1/predict", apps[("POST", "/v1/predict")], _doc, ["POST"], summary="Classify one digit",
               description='JSON `{"image": [...]}` with pixels in [0, 1], or a PNG (raw body or multipart `file`). '
               "The reply's `prediction_id` is what `/v1/feedback` refers to.",
               openapi_extra={"requestBody": _PREDICT_BODY},
               responses={200: {"model": Prediction}, **error_responses(400, 413, 415, 422, 500, 503, 504)})  # fmt: skip
    documented(r, "/v1/predict/batch", apps[("POST", "/v1/predict/batch")], _doc, ["POST"],
               summary="Classify many digits", description="JSON, .npy or raw uint8 bytes. One result per image, in "
               "order. `Accept: application/x-npy` or `application/octet-stream` returns the (N, 10) float32 "
               "probabilities in binary instead of JSON.", openapi_extra={"requestBody": _BATCH_BODY},
               responses={200: {"model": BatchPrediction}, **error_responses(400, 413, 415, 422, 500, 503, 504)})  # fmt: skip
    documented(r, "/v1/feedback", apps[("POST", "/v1/feedback")], _doc, ["POST"],
               summary="Report the true label of an earlier prediction",
               description="`prediction_id` comes from the prediction's reply. Needs `Authorization: Bearer "
               "<MNIST_FEEDBACK_TOKEN>` when that is set; rate limited per client (429).",
               openapi_extra={"requestBody": {"required": True, "content": {decode.JSON: {
                   "schema": Feedback.model_json_schema()}}}},
               responses={200: {"model": FeedbackResult}, **error_responses(400, 401, 404, 413, 415, 422, 429)})  # fmt: skip
    documented(r, "/healthz", apps[("GET", "/healthz")], _doc, ["GET"], summary="Liveness: the process is up",
               responses={200: {"model": Status}})  # fmt: skip
    documented(r, "/readyz", apps[("GET", "/readyz")], _doc, ["GET"],
               summary="Readiness: model loaded and warm, not draining",
               responses={200: {"model": Status}, **error_responses(503)})  # fmt: skip
    documented(r, "/v1/models", apps[("GET", "/v1/models")], _doc, ["GET"],
               summary="Metadata of the served model and every loaded version")  # fmt: skip
    documented(r, "/metrics", apps[("GET", "/metrics")], _doc, ["GET"], summary="Prometheus metrics",
               include_in_schema=False)  # fmt: skip
    return r
