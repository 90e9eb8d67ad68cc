"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService`` on the shared core.

A second transport beside REST, in the same process and on the same event loop (grpc.aio), on its own port
(``grpc_port``; 0 = off). Inference goes through ``Core.admit`` and ``Core.infer``, so REST and gRPC requests
join the same batches, under the same limits, deadlines and drain. Beside it: the standard gRPC health service
("" = liveness; "readiness" and the inference service = readiness: NOT_SERVING while warming up or draining)
and server reflection.

* Input: one tensor, ``raw_input_contents`` or typed ``contents`` (FP32 ``fp32_contents``, UINT8
  ``uint_contents``), validated by the same codec as REST /v2 (service/tensors.py).
* Output: ``probabilities`` FP32 [N, C] and ``label`` INT64 [N] (both unless ``outputs`` names some), always in
  ``raw_output_contents``; ``classification: k`` on an output gives Triton's top-k BYTES strings.
* Deadline: the RPC's deadline is the caller's budget (and ``parameters.timeout`` in microseconds, the smaller
  wins); work that cannot finish in it fails fast with DEADLINE_EXCEEDED. A cancelled RPC is dropped before
  compute. Errors: the REST message with the status code mapped in ``grpc_status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram

from service.errors import DeadlineExceeded, InvalidInput, MalformedBody, ServiceError
from service.inference import Core
from service.model import Model
from service.proto import grpc_predict_v2_pb2 as pb
from service.tensors import LABEL_OUTPUT, PLATFORM, Output, add_output, input_images, output_tensors, raw_bytes

log = logging.getLogger("service.grpc")

SERVICE = "inference.GRPCInferenceService"
#: Health service names that answer readiness (NOT_SERVING while warming up or draining); "" answers liveness:
#: SERVING for as long as the server runs (Kubernetes' gRPC liveness probe must not fail during a drain).
READINESS_NAMES = ("readiness", SERVICE)
EXTENSIONS = ("classification",)
_C = grpc.StatusCode
#: HTTP status -> gRPC status. 413 is RESOURCE_EXHAUSTED, as gRPC itself answers a message over its size limit.
_STATUS = {400: _C.INVALID_ARGUMENT, 415: _C.INVALID_ARGUMENT, 422: _C.INVALID_ARGUMENT, 413: _C.RESOURCE_EXHAUSTED,
           404: _C.NOT_FOUND, 401: _C.UNAUTHENTICATED, 499: _C.CANCELLED, 503: _C.UNAVAILABLE,
           504: _C.DEADLINE_EXCEEDED}  # fmt: skip
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
with contextlib.suppress(TypeError):  # the health service's descriptors, for reflection (private pool)
    pb.POOL.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)


def grpc_status(exc: ServiceError) -> grpc.StatusCode:
    """The gRPC status of a service error; a deadline the queue cannot meet is DEADLINE_EXCEEDED, not 503."""
    if exc.code == "deadline_unmeetable":
        return _C.DEADLINE_EXCEEDED
    return _STATUS.get(exc.status_code, _C.INTERNAL)


def _int_param(params: Any, key: str, what: str) -> int | None:
    if key not in params:
        return None
    p = params[key]
    kind = p.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidInput(f'{what} parameter "{key}" must be an integer (int64_param)', code="invalid_type")
    return int(getattr(p, kind))


def _input_data(req: pb.ModelInferRequest) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes | list[float]]:
    """The one input tensor and its data: raw bytes, or the typed contents matching its datatype."""
    if len(req.inputs) != 1:
        raise InvalidInput(f"the request has {len(req.inputs)} inputs; the model takes exactly one",
                           code="missing_field")  # fmt: skip
    spec = req.inputs[0]
    if req.raw_input_contents:
        if len(req.raw_input_contents) != 1:
            raise InvalidInput(f"raw_input_contents has {len(req.raw_input_contents)} entries for 1 input")
        if spec.HasField("contents"):
            raise InvalidInput(f"input {spec.name!r} has both contents and raw_input_contents")
        return spec, req.raw_input_contents[0]
    if not spec.HasField("contents"):
        raise InvalidInput(f"input {spec.name!r} has no data: set contents or raw_input_contents",
                           code="missing_field")  # fmt: skip
    field = {"FP32": "fp32_contents", "UINT8": "uint_contents"}.get(spec.datatype)
    used = [f.name for f, _ in spec.contents.ListFields()]
    if field is None or used not in ([field], []):
        raise InvalidInput(f"input {spec.name!r}: datatype {spec.datatype!r} with contents in {used}; use FP32 "
                           "with fp32_contents or UINT8 with uint_contents", code="invalid_type")  # fmt: skip
    return spec, list(getattr(spec.contents, field))


def _outputs(req: pb.ModelInferRequest, model: Model) -> list[Output]:
    """Each requested output (always raw bytes); every output when none is named."""
    if not req.outputs:
        return [Output(model.output_name, True), Output(LABEL_OUTPUT, True)]
    out: list[Output] = []
    for spec in req.outputs:
        k = _int_param(spec.parameters, "classification", f"output {spec.name!r}") or 0
        add_output(out, spec.name, k, True, model)
    return out


class GrpcServer:
    """The grpc.aio server, its health service and metrics. ``start_grpc`` builds and starts one."""

    def __init__(self, core: Core) -> None:
        self.core = core
        s = core.settings
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", s.grpc_max_message_bytes or s.max_body_bytes),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a shared port
            ],
            maximum_concurrent_rpcs=s.max_inflight_requests or None,
        )
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._version = importlib.metadata.version("mnist-serving")
        self._watcher: asyncio.Task[None] | None = None
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        registry = core.metrics.registry
        self._requests = Counter("mnist_grpc_requests_total", "gRPC calls by method and status code.",
                                 ["method", "code"], registry=registry)  # fmt: skip
        self._duration = Histogram("mnist_grpc_request_duration_seconds", "gRPC call duration by method.",
                                   ["method"], buckets=_LATENCY_BUCKETS, registry=registry)  # fmt: skip
        methods: dict[str, tuple[type[Message], Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]]] = {
            "ServerLive": (pb.ServerLiveRequest, self._live),
            "ServerReady": (pb.ServerReadyRequest, self._ready),
            "ModelReady": (pb.ModelReadyRequest, self._model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, self._server_metadata),
            "ModelMetadata": (pb.ModelMetadataRequest, self._model_metadata),
            "ModelInfer": (pb.ModelInferRequest, self._infer),
        }
        handlers = {name: self._rpc(name, cls, fn) for name, (cls, fn) in methods.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server, pool=pb.POOL)

    def _rpc(self, method: str, request_type: type[Message], fn: Callable[..., Awaitable[Message]]) -> Any:
        """Bytes in, bytes out: a message that does not parse is INVALID_ARGUMENT (gRPC's own would be INTERNAL)."""
        duration = self._duration.labels(method)
        counts: dict[grpc.StatusCode, Any] = {}  # label children, resolved once per code

        async def handler(raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            start = time.perf_counter()
            code = _C.OK
            self._inflight += 1
            self._idle.clear()
            try:
                try:
                    request = request_type.FromString(raw)
                except DecodeError as exc:
                    raise MalformedBody(f"the {request_type.__name__} message does not parse: {exc}") from None
                response = await fn(request, context)
                return response.SerializeToString()  # type: ignore[no-any-return]
            except ServiceError as exc:
                code = grpc_status(exc)
                retry = exc.headers.get("Retry-After")
                await context.abort(code, exc.message, (("retry-after", retry),) if retry else ())
            except asyncio.CancelledError:  # the client cancelled, or its deadline passed: gRPC ends the call
                left = context.time_remaining()
                code = _C.DEADLINE_EXCEEDED if left is not None and left <= 0 else _C.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise
            except Exception:
                code = _C.INTERNAL
                error_id = uuid.uuid4().hex[:12]
                log.exception("gRPC call failed", extra={"method": method, "error_id": error_id})
                await context.abort(code, f"internal error (error id {error_id})")
            finally:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.set()
                duration.observe(time.perf_counter() - start)
                child = counts.get(code)
                if child is None:
                    child = counts[code] = self._requests.labels(method, code.name)
                child.inc()
            raise AssertionError("unreachable")  # abort() raises

        return grpc.unary_unary_rpc_method_handler(handler)

    # ------------------------------------------------------------------------------------------ methods
    async def _live(self, req: pb.ServerLiveRequest, context: object) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def _ready(self, req: pb.ServerReadyRequest, context: object) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready)

    async def _model_ready(self, req: pb.ModelReadyRequest, context: object) -> pb.ModelReadyResponse:
        model = self.core.registry.get(req.name, req.version or None)
        return pb.ModelReadyResponse(ready=self.core.ready and model.warmed_up)

    async def _server_metadata(self, req: pb.ServerMetadataRequest, context: object) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="mnist-serving", version=self._version, extensions=EXTENSIONS)

    async def _model_metadata(self, req: pb.ModelMetadataRequest, context: object) -> pb.ModelMetadataResponse:
        reg = self.core.registry
        model = reg.get(req.name, req.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=reg.name,
            versions=[m.version for m in reg.models],
            platform=PLATFORM,
            inputs=[tensor(name=model.input_name, datatype="FP32", shape=[-1, model.n_features])],
            outputs=[
                tensor(name=model.output_name, datatype="FP32", shape=[-1, model.n_classes]),
                tensor(name=LABEL_OUTPUT, datatype="INT64", shape=[-1]),
            ],
        )

    async def _infer(
        self, req: pb.ModelInferRequest, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> pb.ModelInferResponse:
        core = self.core
        budget = context.time_remaining()  # the caller's deadline; None when it set none
        timeout_us = _int_param(req.parameters, "timeout", "the request")
        if timeout_us is not None:
            if timeout_us <= 0:
                raise InvalidInput('parameter "timeout" must be a positive number of microseconds')
            budget = timeout_us / 1e6 if budget is None else min(budget, timeout_us / 1e6)
        if budget is not None and budget <= 0:
            raise DeadlineExceeded("the call's deadline passed before it was admitted")
        model = core.registry.get(req.model_name, req.model_version or None)
        admission = core.admit(budget, source="the call's deadline", model=model)
        spec, data = _input_data(req)
        outputs = _outputs(req, model)
        images = input_images(spec.name, spec.datatype, list(spec.shape), data, model,
                              core.settings.max_images_per_request)  # fmt: skip
        result = await core.infer(admission, images, gone=context.cancelled, transport="grpc")
        resp = pb.ModelInferResponse(model_name=model.name, model_version=result.model.version, id=req.id)
        resp.parameters["prediction_id"].string_param = result.prediction_id
        for out, datatype, shape, values in output_tensors(outputs, model, result.probabilities, result.labels):
            resp.outputs.add(name=out.name, datatype=datatype, shape=shape)
            resp.raw_output_contents.append(raw_bytes(values))
        return resp

    # ------------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        s = self.core.settings
        host = f"[{s.host}]" if ":" in s.host and not s.host.startswith("[") else s.host  # an IPv6 address
        self.port = self.server.add_insecure_port(f"{host}:{s.grpc_port}")
        await self.health.set("", _SERVING)
        await self._sync_health()
        await self.server.start()
        changed = asyncio.Event()
        self.core.state.on_ready.append(changed.set)
        self.core.state.on_drain.append(changed.set)
        self._watcher = asyncio.create_task(self._watch(changed))
        log.info("gRPC listening", extra={"host": s.host, "port": self.port})

    async def _sync_health(self) -> None:
        status = _SERVING if self.core.ready else _NOT_SERVING
        for name in READINESS_NAMES:
            await self.health.set(name, status)

    async def _watch(self, changed: asyncio.Event) -> None:
        """Readiness names follow the core: SERVING once warm, NOT_SERVING for good once draining starts."""
        while True:
            changed.clear()
            await self._sync_health()
            if self.core.draining:
                return
            await changed.wait()

    async def drain(self, grace_s: float) -> None:
        """Health NOT_SERVING, new inference refused (UNAVAILABLE, by the core), calls in flight finish
        (at most ``grace_s``), then the server stops. Call it before the batcher stops."""
        if self._watcher is not None:
            self._watcher.cancel()
        for name in READINESS_NAMES:
            await self.health.set(name, _NOT_SERVING)
        start = time.monotonic()
        if self._inflight:
            log.info("gRPC draining", extra={"calls_in_flight": self._inflight, "grace_s": grace_s})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace_s)
        if self._inflight:
            log.warning("gRPC drain timeout: cancelling the calls left", extra={"calls_in_flight": self._inflight})
        await self.server.stop(max(0.0, min(1.0, grace_s - (time.monotonic() - start))))


async def start_grpc(core: Core) -> GrpcServer:
    """Bind ``settings.host:settings.grpc_port`` and serve on the running event loop (uvicorn's)."""
    server = GrpcServer(core)
    await server.start()
    return server
