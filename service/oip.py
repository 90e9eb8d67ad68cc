"""The Open Inference Protocol (KServe v2, spoken by Triton and MLServer) over REST.

Health, server and model metadata, model readiness and inference, with the JSON tensor format and the
binary tensor data extension (a JSON header of ``Inference-Header-Content-Length`` bytes followed by raw
little-endian tensor bytes, in and out). Inference shares the v1 path: the same body limit and timeout
(``read_body``), admission (readiness, draining, ``X-Request-Deadline-Ms``), batcher, metrics and drift.
Errors use the protocol's shape, ``{"error": "message"}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

from service import decode
from service.app import ServiceState, request_id_of, state_of
from service.batcher import BatchResult
from service.decode import _check_count, _check_range, _numeric_array
from service.errors import (
    InvalidInput,
    MalformedBody,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)
from service.model import Model
from service.registry import ModelRegistry
from service.routes import admitted, read_body, timing_headers

HEADER_LENGTH = "inference-header-content-length"
PLATFORM = "onnxruntime_onnx"
LABEL_OUTPUT = "label"
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "model_repository(index)")
_DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype(np.uint8)}
_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def oip_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error": message}), status_code=status, media_type=decode.JSON, headers=headers)


class OIPRoute(APIRoute):
    """Every ServiceError raised under /v2 is answered in the protocol's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def oip_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                return oip_error(exc.status_code, exc.message, exc.headers)

        return oip_handler


router = APIRouter(route_class=OIPRoute, tags=["Open Inference Protocol (v2)"])


# ---------------------------------------------------------------------------------------------- metadata
def _tensor_meta(name: str, datatype: str, shape: list[int]) -> dict[str, object]:
    return {"name": name, "datatype": datatype, "shape": shape}


def model_metadata(reg: ModelRegistry, model: Model) -> dict[str, object]:
    return {
        "name": reg.name,
        "versions": [m.version for m in reg.models],
        "platform": PLATFORM,
        "inputs": [_tensor_meta(model.input_name, "FP32", [-1, model.n_features])],
        "outputs": [
            _tensor_meta(model.output_name, "FP32", [-1, model.n_classes]),
            _tensor_meta(LABEL_OUTPUT, "INT64", [-1]),
        ],
        "parameters": {
            "version": model.version,
            "sha256": model.sha256,
            "class_labels": model.class_labels,
            "image_shape": list(model.image_shape),
            "input_datatypes": list(_DTYPES),
        },
    }


def _json(doc: object, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=decode.JSON)


@router.get("/v2", summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    return _json({"name": "mnist-serving", "version": request.app.version, "extensions": list(EXTENSIONS)})


@router.get("/v2/health/live", summary="Server liveness (200 = live)")
async def server_live() -> Response:
    return _json({"live": True})


@router.get("/v2/health/ready", summary="Server readiness (200 = ready, 400 = not ready, as the protocol says)")
async def server_ready(request: Request) -> Response:
    ready = state_of(request).ready
    return _json({"ready": ready}, 200 if ready else 400)


_MODEL_ERRORS: dict[int | str, dict[str, Any]] = {404: {"description": "Unknown model or version not loaded"}}
_READY_ERRORS: dict[int | str, dict[str, Any]] = {**_MODEL_ERRORS, 400: {"description": "Not ready"}}


def _metadata(request: Request, name: str, version: str | None) -> Response:
    reg = state_of(request).registry
    return _json(model_metadata(reg, reg.get(name, version)))


@router.get("/v2/models/{name}", summary="Model metadata", responses=_MODEL_ERRORS)
async def metadata(request: Request, name: str) -> Response:
    return _metadata(request, name, None)


@router.get("/v2/models/{name}/versions/{version}", summary="Metadata of one loaded version", responses=_MODEL_ERRORS)
async def version_metadata(request: Request, name: str, version: str) -> Response:
    return _metadata(request, name, version)


def _ready(request: Request, name: str, version: str | None) -> Response:
    svc = state_of(request)
    model = svc.registry.get(name, version)
    ready = svc.ready and model.warmed_up
    return _json({"name": svc.registry.name, "version": model.version, "ready": ready}, 200 if ready else 400)


@router.get("/v2/models/{name}/ready", summary="Model readiness", responses=_READY_ERRORS)
async def model_ready(request: Request, name: str) -> Response:
    return _ready(request, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready", summary="Version readiness", responses=_READY_ERRORS)
async def version_ready(request: Request, name: str, version: str) -> Response:
    return _ready(request, name, version)


def _config(request: Request, name: str, version: str | None) -> Response:
    svc = state_of(request)
    model = svc.registry.get(name, version)
    s = svc.settings
    return _json(
        {
            "name": svc.registry.name,
            "platform": PLATFORM,
            "backend": "onnxruntime",
            "max_batch_size": s.max_images_per_request,
            "input": [{"name": model.input_name, "data_type": "TYPE_FP32", "dims": [model.n_features]}],
            "output": [
                {"name": model.output_name, "data_type": "TYPE_FP32", "dims": [model.n_classes]},
                {"name": LABEL_OUTPUT, "data_type": "TYPE_INT64", "dims": []},
            ],
            "dynamic_batching": {
                "preferred_batch_size": [s.max_batch_size],
                "max_queue_delay_microseconds": round(s.max_wait_ms * 1000),
            },
            "version_policy": {"specific": {"versions": [m.version for m in svc.registry.models]}},
        }
    )


@router.get("/v2/models/{name}/config", summary="Model configuration (Triton extension)", responses=_MODEL_ERRORS)
async def model_config(request: Request, name: str) -> Response:
    return _config(request, name, None)


@router.get("/v2/models/{name}/versions/{version}/config", summary="Configuration of one version",
            responses=_MODEL_ERRORS)  # fmt: skip
async def version_config(request: Request, name: str, version: str) -> Response:
    return _config(request, name, version)


@router.post("/v2/repository/index", summary="Loaded model versions (model repository extension, read-only)")
async def repository_index(request: Request) -> Response:
    svc = state_of(request)
    reg = svc.registry
    state = "READY" if svc.ready else "UNAVAILABLE"
    return _json([{"name": reg.name, "version": m.version, "state": state} for m in reg.models])


# ---------------------------------------------------------------------------------------------- decoding
def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip|deflate`` (tritonclient's request compression), at most ``limit`` bytes."""
    enc = (encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    if enc not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"content encoding {enc!r} is not supported; use gzip, deflate or none")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if enc == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise MalformedBody(f"the {enc} body cannot be decompressed: {exc}", code="malformed_body") from exc
    if len(out) > limit:
        raise PayloadTooLarge(f"the decompressed body exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise MalformedBody(f"the {enc} body is truncated", code="malformed_body")
    return out


def _split(body: bytes, declared: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tail) following the binary tensor data extension."""
    if declared is None:
        return body, b""
    if not declared.strip().isdigit() or int(declared) > len(body):
        raise MalformedBody(
            f"Inference-Header-Content-Length {declared!r} must be an integer at most the body size ({len(body)})"
        )
    n = int(declared)
    return body[:n], body[n:]


def _dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object", code="invalid_type")
    return value


def _flag(params: dict[str, Any], key: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise InvalidInput(f'parameter "{key}" must be true or false', code="invalid_type")
    return value


@dataclass(slots=True)
class _Output:
    name: str
    binary: bool
    classification: int = 0


@dataclass(slots=True)
class InferRequest:
    images: np.ndarray  # float32 (N, features) in [0, 1]
    outputs: list[_Output]
    request_id: str | None
    timeout_s: float | None  # the request's "timeout" parameter (microseconds on the wire), as a deadline


def _input_tensor(spec: Any, model: Model, tail: bytes, max_images: int) -> tuple[np.ndarray, int]:
    """One request input -> (float32 (N, features), binary bytes it used)."""
    spec = _dict(spec, "each input")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if name != model.input_name:
        raise InvalidInput(f"unexpected input {name!r}; model {model.name!r} has one input, {model.input_name!r}",
                           code="unknown_input")  # fmt: skip
    dtype = _DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidInput(f"input {name!r}: datatype {datatype!r} is not supported; use FP32 ([0, 1]) or UINT8",
                           code="invalid_type")  # fmt: skip
    h, w = model.image_shape
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or len(shape) not in (2, 3)
        or tuple(shape[1:]) not in ((model.n_features,), (h, w))
    ):
        raise InvalidInput(f"input {name!r}: shape {shape!r}; expected [N, {model.n_features}] or [N, {h}, {w}]",
                           code="invalid_shape")  # fmt: skip
    n = shape[0]
    if n < 0:
        raise InvalidInput(f"input {name!r}: the batch dimension must not be negative", code="invalid_shape")
    _check_count(n, max_images)
    count = n * model.n_features
    params = _dict(spec.get("parameters"), f"input {name!r} parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in spec:
            raise InvalidInput(f"input {name!r} has both JSON data and binary_data_size", code="invalid_input")
        if not isinstance(size, int) or isinstance(size, bool) or size != count * dtype.itemsize:
            raise InvalidInput(
                f"input {name!r}: binary_data_size {size!r} does not match shape {shape} of {datatype} "
                f"({count * dtype.itemsize} bytes)",
                code="invalid_shape",
            )
        if size > len(tail):
            raise MalformedBody(f"input {name!r}: {size} binary bytes declared, {len(tail)} sent")
        arr = np.frombuffer(tail[:size], dtype=dtype)
        used = size
    else:
        if "data" not in spec:
            raise InvalidInput(f'input {name!r} has no "data" and no binary_data_size', code="missing_field")
        arr = _numeric_array(spec["data"], f"input {name!r} data")
        if arr.size != count:
            raise InvalidInput(f"input {name!r}: data has {arr.size} values; shape {shape} needs {count}",
                               code="invalid_shape")  # fmt: skip
        if dtype == np.uint8 and (arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() > 255))):
            raise InvalidInput(f"input {name!r}: UINT8 data must be integers in 0-255", code="out_of_range")
        used = 0
    arr = arr.reshape(n, model.n_features)
    if dtype == np.uint8:
        scale = float(model.metadata["preprocessing"].get("scale", 1 / 255))
        return arr.astype(np.float32) * np.float32(scale), used
    return _check_range(arr.astype(np.float32, copy=False), f"input {name!r}"), used


def _requested_outputs(doc: dict[str, Any], model: Model) -> list[_Output]:
    params = _dict(doc.get("parameters"), '"parameters"')
    default_binary = _flag(params, "binary_data_output", False)
    specs = doc.get("outputs")
    if specs is None:
        return [_Output(model.output_name, default_binary)]
    if not isinstance(specs, list) or not specs:
        raise InvalidInput('"outputs" must be a non-empty list of {"name": ...}', code="invalid_type")
    outputs: list[_Output] = []
    for raw in specs:
        spec = _dict(raw, "each output")
        name = spec.get("name")
        if name not in (model.output_name, LABEL_OUTPUT):
            raise InvalidInput(f"unknown output {name!r}; outputs are {model.output_name!r} and {LABEL_OUTPUT!r}",
                               code="unknown_output")  # fmt: skip
        if any(o.name == name for o in outputs):
            raise InvalidInput(f"output {name!r} is requested twice", code="invalid_input")
        p = _dict(spec.get("parameters"), f"output {name!r} parameters")
        k = p.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= model.n_classes:
            raise InvalidInput(f"output {name!r}: classification must be 0-{model.n_classes}", code="invalid_input")
        if k and name == LABEL_OUTPUT:
            raise InvalidInput(f"classification applies to {model.output_name!r}, not {LABEL_OUTPUT!r}")
        outputs.append(_Output(str(name), _flag(p, "binary_data", default_binary), k))
    return outputs


def parse_infer(body: bytes, declared: str | None, model: Model, max_images: int) -> InferRequest:
    head, tail = _split(body, declared)
    doc = decode.parse_json(head)
    if not isinstance(doc, dict):
        raise InvalidInput("the inference request must be a JSON object", code="invalid_type")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise InvalidInput(f'"inputs" must be a list holding one input, {model.input_name!r}', code="missing_field")
    images, used = _input_tensor(inputs[0], model, tail, max_images)
    if used != len(tail):
        raise MalformedBody(f"{len(tail) - used} bytes of binary data are not claimed by any input")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InvalidInput('"id" must be a string', code="invalid_type")
    timeout = _dict(doc.get("parameters"), '"parameters"').get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0):
        raise InvalidInput('parameter "timeout" must be a positive number of microseconds', code="invalid_input")
    return InferRequest(images, _requested_outputs(doc, model), rid, None if timeout is None else timeout / 1e6)


# ---------------------------------------------------------------------------------------------- encoding
def _classification(probs: np.ndarray, k: int, labels: list[str]) -> list[bytes]:
    """Triton's classification extension: the top ``k`` classes per row as ``"score:index:label"``."""
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [f"{probs[i, j]:f}:{j}:{labels[j]}".encode() for i in range(probs.shape[0]) for j in top[i]]


def encode_outputs(req: InferRequest, model: Model, probs: np.ndarray, labels: np.ndarray) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    n = probs.shape[0]
    entries: list[dict[str, object]] = []
    chunks: list[bytes] = []
    for out in req.outputs:
        data: np.ndarray | list[bytes]
        if out.classification:
            data = _classification(probs, out.classification, model.class_labels)
            datatype, shape = "BYTES", [n, out.classification]
        elif out.name == LABEL_OUTPUT:
            data, datatype, shape = labels.astype("<i8"), "INT64", [n]
        else:
            data, datatype, shape = probs.astype("<f4", copy=False), "FP32", [n, model.n_classes]
        entry: dict[str, object] = {"name": out.name, "datatype": datatype, "shape": shape}
        if out.binary:
            raw = (
                b"".join(struct.pack("<I", len(s)) + s for s in data)
                if isinstance(data, list)
                else np.ascontiguousarray(data).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = [s.decode() for s in data] if isinstance(data, list) else data.ravel()
        entries.append(entry)
    doc: dict[str, object] = {"model_name": model.name, "model_version": model.version, "outputs": entries}
    if req.request_id is not None:
        doc["id"] = req.request_id
    head = orjson.dumps(doc, option=_NUMPY)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


# ---------------------------------------------------------------------------------------------- inference
async def _run(svc: ServiceState, request: Request, model: Model, x: np.ndarray, budget: float | None) -> tuple[
    np.ndarray, BatchResult | None, float, float
]:  # fmt: skip
    """The same batcher calls as /v1: one image is interactive work, more is bulk, split when too big."""
    batcher = svc.batcher
    n = x.shape[0]
    if n <= batcher.bulk_chunk_images:
        res = await batcher.submit(model, x, bulk=n > 1, budget_s=budget, receive=request.receive)
        return res.probabilities, res, res.queue_s, res.inference_s
    probs, queue_s, inference_s = await batcher.submit_many(model, x, budget_s=budget, receive=request.receive)
    return probs, None, queue_s, inference_s


_NUMBERS = {"type": "array", "items": {"type": "number", "minimum": 0}}
_TENSOR_SCHEMA = {
    "type": "object",
    "required": ["name", "shape", "datatype", "data"],
    "properties": {
        "name": {"type": "string", "description": "The model's input name (see the metadata)."},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 3,
                  "description": "[N, 784] or [N, 28, 28]."},
        "datatype": {"type": "string", "enum": list(_DTYPES)},
        "data": {
            "type": "array",
            "items": {"anyOf": [{"type": "number", "minimum": 0}, {"type": "array", "items": {"anyOf": [
                {"type": "number", "minimum": 0}, _NUMBERS]}}]},
            "description": "Row-major values, flat or nested: FP32 in [0, 1], UINT8 0-255.",
        },
        "parameters": {"type": ["object", "null"]},
    },
}  # fmt: skip
_INFER_BODY = {
    "required": True,
    "description": "JSON (shown), or the binary tensor data extension (see the description).",
    "content": {
        decode.JSON: {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string", "description": "Echoed in the response."},
                    "parameters": {
                        "type": ["object", "null"],
                        "properties": {
                            "binary_data_output": {"type": "boolean"},
                            "timeout": {"type": "integer", "minimum": 1, "description": "Deadline in microseconds."},
                        },
                    },
                    "inputs": {"type": "array", "items": _TENSOR_SCHEMA, "minItems": 1, "maxItems": 1},
                    "outputs": {
                        "type": ["array", "null"],
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string", "enum": ["probabilities", LABEL_OUTPUT]},
                                "parameters": {
                                    "type": ["object", "null"],
                                    "properties": {
                                        "binary_data": {"type": "boolean"},
                                        "classification": {"type": "integer", "minimum": 0, "maximum": 10},
                                    },
                                },
                            },
                        },
                    },
                },
            },
            "example": {
                "id": "example-1",
                "inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 784}],
                "outputs": [{"name": "probabilities"}, {"name": LABEL_OUTPUT}],
            },
        },
    },
}
_ERROR_SCHEMA: dict[str, Any] = {
    "description": 'Error: {"error": "message"}',
    "content": {decode.JSON: {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}},
}


_INFER_DOC = (
    "FP32 pixels in [0, 1] or UINT8 0-255, shape [N, 784] or [N, 28, 28], as JSON `data` or with the binary "
    "tensor data extension (a JSON header of `Inference-Header-Content-Length` bytes, then each input's raw "
    "little-endian bytes, sized by its `parameters.binary_data_size`). Outputs: `probabilities` FP32 [N, 10] "
    "(default) and `label` INT64 [N] on request; `binary_data: true` per output (or `binary_data_output` for "
    "all) returns raw bytes after the JSON header. `Content-Encoding: gzip|deflate` bodies are accepted."
)
_INFER_ERRORS: dict[int | str, dict[str, Any]] = {
    code: _ERROR_SCHEMA for code in (400, 404, 413, 415, 422, 500, 503, 504)
}


async def _infer(request: Request, name: str, version: str | None) -> Response:
    svc = state_of(request)
    settings = svc.settings
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    body = _decompress(body, request.headers.get("content-encoding"), settings.max_body_bytes)
    _, budget = admitted(svc, request)
    model = svc.registry.get(name, version)
    req = parse_infer(body, request.headers.get(HEADER_LENGTH), model, settings.max_images_per_request)
    del body
    if req.timeout_s is not None:
        budget = req.timeout_s if budget is None else min(budget, req.timeout_s)
    probs, res, queue_s, inference_s = await _run(svc, request, model, req.images, budget)
    labels = probs.argmax(axis=1)
    svc.quality.remember(request_id_of(request.scope) or "", labels)
    content, header_length = encode_outputs(req, model, probs, labels)
    headers = timing_headers(model, res, queue_s, inference_s)
    if header_length is None:
        return Response(content, media_type=decode.JSON, headers=headers)
    headers["inference-header-content-length"] = str(header_length)
    return Response(content, media_type=decode.RAW, headers=headers)


@router.post("/v2/models/{name}/infer", summary="Inference (Open Inference Protocol)", description=_INFER_DOC,
             openapi_extra={"requestBody": _INFER_BODY}, responses=_INFER_ERRORS)  # fmt: skip
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", summary="Inference on one loaded version",
             description=_INFER_DOC, openapi_extra={"requestBody": _INFER_BODY}, responses=_INFER_ERRORS)  # fmt: skip
async def version_infer(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)


@router.api_route("/v2/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def unknown(request: Request, path: str) -> Response:
    """Unknown /v2 paths answer in the protocol's error shape; a known path with another method gets 405."""
    allowed = sorted(
        m
        for route in router.routes
        if isinstance(route, APIRoute) and route.endpoint is not unknown
        and route.matches(request.scope)[0] is Match.PARTIAL
        for m in route.methods or ()
    )  # fmt: skip
    if allowed:
        return oip_error(405, f"method {request.method} is not allowed here", {"Allow": ", ".join(allowed)})
    raise NotFound(f"no such endpoint: /v2/{path}")
