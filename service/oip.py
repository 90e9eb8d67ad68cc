"""The Open Inference Protocol (KServe v2, spoken by Triton and MLServer) over REST.

Health, server and model metadata, model readiness and inference. Inference is a thin transport over the core
(service/inference.py) and the tensor codec (service/tensors.py), served as pure ASGI; the metadata routes are
plain FastAPI routes. Errors use the protocol's shape, ``{"error": "message"}``, with a 4xx/5xx status.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope

from service import oip_body
from service.asgi import Reply, documented, endpoint, gone_probe, header, read_body
from service.decode import JSON, RAW
from service.envelope import decompress
from service.errors import NotFound, ServiceError, oip_error_json
from service.inference import Core
from service.model import Model
from service.oip_openapi import INFER_BODY, INFER_DOC, INFER_ERRORS
from service.registry import ModelRegistry
from service.rest import timing
from service.tensors import DTYPES, LABEL_OUTPUT, PLATFORM

EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "model_repository(index)")


def core_of(request: Request) -> Core:
    core: Core = request.app.state.core
    return core


def oip_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(oip_error_json(message), status_code=status, media_type=JSON, headers=headers)


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


_meta = APIRouter(route_class=OIPRoute, tags=["Open Inference Protocol (v2)"])


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
            "input_datatypes": list(DTYPES),
        },
    }


def _json(doc: object, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=JSON)


@_meta.get("/v2", summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    return _json({"name": "mnist-serving", "version": request.app.version, "extensions": list(EXTENSIONS)})


@_meta.get("/v2/health/live", summary="Server liveness (200 = live)")
async def server_live() -> Response:
    return _json({"live": True})


@_meta.get("/v2/health/ready", summary="Server readiness (200 = ready, 400 = not ready, as the protocol says)")
async def server_ready(request: Request) -> Response:
    ready = core_of(request).ready
    return _json({"ready": ready}, 200 if ready else 400)


_MODEL_ERRORS: dict[int | str, dict[str, Any]] = {404: {"description": "Unknown model or version not loaded"}}
_READY_ERRORS: dict[int | str, dict[str, Any]] = {**_MODEL_ERRORS, 400: {"description": "Not ready"}}


def _metadata(request: Request, name: str, version: str | None) -> Response:
    reg = core_of(request).registry
    return _json(model_metadata(reg, reg.get(name, version)))


@_meta.get("/v2/models/{name}", summary="Model metadata", responses=_MODEL_ERRORS)
async def metadata(request: Request, name: str) -> Response:
    return _metadata(request, name, None)


@_meta.get("/v2/models/{name}/versions/{version}", summary="Metadata of one loaded version", responses=_MODEL_ERRORS)
async def version_metadata(request: Request, name: str, version: str) -> Response:
    return _metadata(request, name, version)


def _ready(request: Request, name: str, version: str | None) -> Response:
    svc = core_of(request)
    model = svc.registry.get(name, version)
    ready = svc.ready and model.warmed_up
    return _json({"name": svc.registry.name, "version": model.version, "ready": ready}, 200 if ready else 400)


@_meta.get("/v2/models/{name}/ready", summary="Model readiness", responses=_READY_ERRORS)
async def model_ready(request: Request, name: str) -> Response:
    return _ready(request, name, None)


@_meta.get("/v2/models/{name}/versions/{version}/ready", summary="Version readiness", responses=_READY_ERRORS)
async def version_ready(request: Request, name: str, version: str) -> Response:
    return _ready(request, name, version)


def _config(request: Request, name: str, version: str | None) -> Response:
    svc = core_of(request)
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


@_meta.get("/v2/models/{name}/config", summary="Model configuration (Triton extension)", responses=_MODEL_ERRORS)
async def model_config(request: Request, name: str) -> Response:
    return _config(request, name, None)


@_meta.get("/v2/models/{name}/versions/{version}/config", summary="Configuration of one version",
            responses=_MODEL_ERRORS)  # fmt: skip
async def version_config(request: Request, name: str, version: str) -> Response:
    return _config(request, name, version)


@_meta.post("/v2/repository/index", summary="Loaded model versions (model repository extension, read-only)")
async def repository_index(request: Request) -> Response:
    svc = core_of(request)
    reg = svc.registry
    state = "READY" if svc.ready else "UNAVAILABLE"
    return _json([{"name": reg.name, "version": m.version, "state": state} for m in reg.models])


# ---------------------------------------------------------------------------------------------- inference
def _parse(body: bytes, encoding: str | None, declared: str | None, model: Model, limit: int,
           max_images: int, max_json: int) -> oip_body.InferRequest:  # fmt: skip
    return oip_body.parse_infer(decompress(body, encoding, limit), declared, model, max_images, max_json)


class Oip:
    """``POST /v2/models/{name}[/versions/{version}]/infer`` as pure ASGI."""

    def __init__(self, core: Callable[[], Core]) -> None:
        self.core = core

    async def infer(self, scope: Scope, receive: Receive) -> Reply:
        core = self.core()
        settings = core.settings
        params = scope.get("path_params", {})
        body = await read_body(scope, receive, settings.max_body_bytes, header(scope, b"content-length"))
        model = core.registry.get(params.get("name"), params.get("version"))
        encoding = header(scope, b"content-encoding")
        req = await core.offload(len(body) if encoding is None else core.OFF_LOOP_BYTES + 1, _parse, body, encoding,
                                 header(scope, b"inference-header-content-length"), model, settings.max_body_bytes,
                                 settings.max_images_per_request, settings.max_json_bytes)  # fmt: skip
        del body
        stated = core.deadline_ms(header(scope, b"x-request-deadline-ms"))
        source = "X-Request-Deadline-Ms"
        if req.timeout_s is not None and (stated is None or req.timeout_s < stated):
            stated, source = req.timeout_s, 'the "timeout" parameter'
        admission = core.admit(stated, source=source, model=model)
        out = await core.infer(admission, req.images, gone=gone_probe(receive))
        content, header_length = oip_body.encode_outputs(req.outputs, req.request_id, model, out.probabilities,
                                                        out.labels)  # fmt: skip
        headers = timing(out)
        if header_length is None:
            return 200, content, [(b"content-type", JSON.encode()), *headers]
        headers.append((b"inference-header-content-length", str(header_length).encode()))
        return 200, content, [(b"content-type", RAW.encode()), *headers]

    def app(self) -> ASGIApp:
        return endpoint(self.infer, oip=True)


def _doc_infer(name: str) -> None:
    """Declaration only: the route is served by its ASGI app."""


def _doc_version_infer(name: str, version: str) -> None:
    """Declaration only: the route is served by its ASGI app."""


def mount_infer(r: APIRouter, app: ASGIApp) -> None:
    documented(r, "/v2/models/{name}/infer", app, _doc_infer, ["POST"], summary="Inference (Open Inference Protocol)",
               description=INFER_DOC, openapi_extra={"requestBody": INFER_BODY}, responses=INFER_ERRORS)  # fmt: skip
    documented(r, "/v2/models/{name}/versions/{version}/infer", app, _doc_version_infer, ["POST"],
               summary="Inference on one loaded version", description=INFER_DOC,
               openapi_extra={"requestBody": INFER_BODY}, responses=INFER_ERRORS)  # fmt: skip


def router(oip: Oip) -> APIRouter:
    """Every /v2 route of one app: metadata, inference (served by ``oip``), and the catch-all, last."""
    r = APIRouter(route_class=OIPRoute, tags=["Open Inference Protocol (v2)"])
    r.routes.extend(_meta.routes)  # the same (stateless) route objects: `unknown` below must see them all
    mount_infer(r, oip.app())

    async def unknown(request: Request, path: str) -> Response:
        """Unknown /v2 paths answer in the protocol's error shape; a known path with another method gets 405."""
        allowed = sorted(
            m
            for route in r.routes
            if isinstance(route, APIRoute) and route.endpoint is not unknown
            and route.matches(request.scope)[0] is Match.PARTIAL
            for m in route.methods or ()
        )  # fmt: skip
        if allowed:
            return oip_error(405, f"method {request.method} is not allowed here", {"Allow": ", ".join(allowed)})
        raise NotFound(f"no such endpoint: /v2/{path}")

    r.add_api_route("/v2/{path:path}", unknown, methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                    include_in_schema=False)  # fmt: skip
    return r
