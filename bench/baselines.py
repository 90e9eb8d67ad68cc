"""The designs the service is measured against, each served exactly like the service: the same server
(uvicorn + httptools, one worker, no access log, same keep-alive), the same event loop as the service in the
same run (``--loop``), the same model and the same ONNX Runtime session options (built by the service's own
``service.model._session_options`` from the service's settings):

- ``classic``: a pydantic ``list[float]`` body and one ``session.run`` per request, no batching
  (the lab report's Flask service, written in FastAPI);
- ``careful``: raw body + the service's own JSON decoder and validation (``service.decode.json_one``: typed
  numbers only, shape, finiteness, range; the same 4xx errors) + one ``session.run`` per request;
- ``ceiling``: a FastAPI route that reads the same body and returns a canned answer (no parsing, no model):
  the most this framework and server can do on this machine;
- ``asgi``: the same canned answer from a bare ASGI callable (no FastAPI/Starlette at all): what the HTTP
  server alone costs;
- ``lean``: the least a batching server of this model can be: a bare ASGI callable, the service's own decoder
  (the same 4xx answers), and every request whose body is read in one event-loop iteration answered by one
  ``session.run`` on the loop; nothing else (no guards, limits, deadlines, ids, metrics or feedback): what the
  work itself costs on this machine, against which the service's features are measured;
- ``proto``: the same canned answer from a plain asyncio protocol that parses with httptools and writes the
  answer from its parser callback: no ASGI server, no task per request. What the kernel, the event loop and
  the HTTP parser alone cost: the floor under ``asgi``, and what uvicorn's ASGI cycle adds above it.

``--server granian`` serves ``asgi`` under granian instead of uvicorn (bench/granian_serve.py serves the
service itself under granian).

Run one: ``python -m bench.baselines --kind careful --model models/mnist-mlp/1 --port 8101``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any, Literal

import httptools
import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import Response

from bench.models import serving_file
from service import decode
from service.errors import ServiceError, error_json
from service.model import _session_options
from service.settings import Settings, settings_from_args

Kind = Literal["classic", "careful", "ceiling", "asgi", "lean", "proto"]
KINDS: tuple[Kind, ...] = ("classic", "careful", "ceiling", "asgi", "lean", "proto")
LOOPS = ("asyncio", "uvloop")
_JSON = "application/json"


def session_for(model_file: Path, settings: Settings | None = None) -> ort.InferenceSession:
    """A session with the service's options, from the service's settings (the ``MNIST_*`` environment)."""
    opts = _session_options(settings or settings_from_args([]))
    return ort.InferenceSession(str(model_file), sess_options=opts, providers=["CPUExecutionProvider"])


class PredictIn(BaseModel):
    image: list[float] = Field(min_length=784, max_length=784)


class PredictOut(BaseModel):
    label: int
    probabilities: list[float]


READY = b'{"status":"ready"}'  # every design's /readyz


def _ready() -> Response:
    return Response(READY, media_type=_JSON)


def classic_app(model_file: Path, settings: Settings | None = None) -> FastAPI:
    session = session_for(model_file, settings)
    input_name = session.get_inputs()[0].name
    app = FastAPI()

    @app.post("/v1/predict", response_model=PredictOut)
    async def predict(req: PredictIn) -> PredictOut:
        x = np.asarray(req.image, dtype=np.float32).reshape(1, 784)
        probs = session.run(None, {input_name: x})[0][0]
        return PredictOut(label=int(probs.argmax()), probabilities=probs.tolist())

    app.get("/readyz")(_ready)
    return app


def careful_app(model_file: Path, settings: Settings | None = None) -> FastAPI:
    s = settings or settings_from_args([])
    session = session_for(model_file, s)
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    shape = decode.Shape(784, 28, 28, s.max_images_per_request, s.max_png_pixels)
    app = FastAPI()

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        try:
            x = decode.decode(decode.SINGLE, request.headers.get("content-type"), await request.body(), shape)
        except ServiceError as exc:
            return Response(error_json(exc.code, exc.message, None), exc.status_code, media_type=_JSON)
        probs = session.run([output_name], {input_name: x})[0][0]
        content = orjson.dumps(
            {"label": int(probs.argmax()), "probabilities": probs}, option=orjson.OPT_SERIALIZE_NUMPY
        )
        return Response(content, media_type=_JSON)

    app.get("/readyz")(_ready)
    return app


CANNED = orjson.dumps(
    {
        "label": 7,
        "probabilities": [1.2e-07, 3.4e-06, 2.1e-05, 1.1e-04, 2.2e-08, 1.0e-06, 3.3e-10, 0.99985, 9.1e-07, 1.5e-05],
        "model": "mnist-mlp",
        "version": "1",
        "request_id": "0123456789abcdef0123456789abcdef",
    }
)


def ceiling_app() -> FastAPI:
    app = FastAPI()

    async def canned(request: Request) -> Response:
        await request.body()
        return Response(CANNED, media_type=_JSON)

    app.post("/v1/predict")(canned)
    app.post("/v1/predict/batch")(canned)
    app.get("/readyz")(_ready)
    return app


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Canned answers with no framework: drain the body, answer 200 (or the readiness JSON)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    body = READY if scope["path"] == "/readyz" else CANNED
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def lean_app(model_file: Path, settings: Settings | None = None) -> Any:
    s = settings or settings_from_args([])
    session = session_for(model_file, s)
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    shape = decode.Shape(784, 28, 28, s.max_images_per_request, s.max_png_pixels)
    pending: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []

    def run_batch() -> None:  # once per loop iteration that queued work: one engine call for all of it
        batch = pending[:]
        pending.clear()
        x = batch[0][0] if len(batch) == 1 else np.concatenate([b[0] for b in batch])
        try:
            probs = session.run([output_name], {input_name: x})[0]
        except Exception as exc:  # every caller of the batch gets the error
            for _, fut in batch:
                fut.set_exception(exc)
            return
        for row, (_, fut) in enumerate(batch):
            if not fut.done():
                fut.set_result(probs[row])

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/predict":
            await asgi_app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        ct = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-type"), None)
        try:
            x = decode.decode(decode.SINGLE, ct, b"".join(chunks), shape)
        except ServiceError as exc:
            status, body = exc.status_code, error_json(exc.code, exc.message, None)
        else:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[np.ndarray] = loop.create_future()
            if not pending:
                loop.call_soon(run_batch)
            pending.append((x, fut))
            probs = await fut
            status = 200
            body = orjson.dumps({"label": int(probs.argmax()), "probabilities": probs},
                                option=orjson.OPT_SERIALIZE_NUMPY)  # fmt: skip
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def create_app(kind: Kind, model_file: Path | None, settings: Settings | None = None) -> Any:
    if kind == "ceiling":
        return ceiling_app()
    if kind == "asgi":
        return asgi_app
    if kind == "proto":
        raise ValueError("proto is no ASGI app: serve_proto serves it")
    if model_file is None:
        raise ValueError(f"--model is required for {kind}")
    if kind == "lean":
        return lean_app(model_file, settings)
    return classic_app(model_file, settings) if kind == "classic" else careful_app(model_file, settings)


class CannedProtocol(asyncio.Protocol):
    """``proto``: HTTP/1.1 with keep-alive, parsed by httptools; every complete request gets the canned answer
    (``/readyz`` its readiness JSON) written from the parser's callback. Nothing else: no limits, no timeouts."""

    def connection_made(self, transport: Any) -> None:
        self.transport, self.path = transport, b""
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.path = url

    def on_message_complete(self) -> None:
        body = READY if self.path == b"/readyz" else CANNED
        keep = self.parser.should_keep_alive()
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
                             % (len(body), b"" if keep else b"connection: close\r\n", body))  # fmt: skip
        if not keep:
            self.transport.close()


def serve_proto(host: str, port: int, loop: str = "asyncio") -> None:
    """Serve ``proto`` on the given event loop until stopped (SIGTERM ends the process)."""

    async def run() -> None:
        server = await asyncio.get_running_loop().create_server(CannedProtocol, host, port, reuse_address=True)
        await server.serve_forever()

    if loop == "uvloop":
        import uvloop

        uvloop.run(run())
    else:
        asyncio.run(run())


def serve(app: Any, host: str, port: int, loop: str = "asyncio") -> None:
    """The service's uvicorn settings (service/server.py), so only the application code differs."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop=loop,
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=5,
        server_header=False,
        proxy_headers=False,
        ws="none",
    )
    uvicorn.Server(config).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=KINDS, required=True, help="Which design to serve.")
    parser.add_argument("--model", type=Path, help="The model version folder (its file for MNIST_MODEL_PRECISION).")
    parser.add_argument("--host", default="127.0.0.1", help="Interface (default 127.0.0.1).")
    parser.add_argument("--port", type=int, required=True, help="TCP port.")
    parser.add_argument("--loop", choices=LOOPS, default=None,
                        help="Event loop (default: the service's, MNIST_EVENT_LOOP or its default).")  # fmt: skip
    parser.add_argument("--server", choices=("uvicorn", "granian"), default="uvicorn", help="HTTP server.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = settings_from_args(
        []
    )  # the service's settings from the MNIST_* environment: session options, limits, loop
    loop = args.loop or settings.event_loop
    if args.server == "granian":
        if args.kind != "asgi":
            raise SystemExit("--server granian serves --kind asgi only (bench/granian_serve.py serves the service)")
        from bench.granian_serve import serve_granian

        serve_granian("bench.baselines:asgi_app", args.host, args.port, loop, factory=False)
        return 0
    if args.kind == "proto":
        serve_proto(args.host, args.port, loop)
        return 0
    model_file = None
    if args.model is not None:
        model_file = serving_file(args.model, settings.model_precision) if args.model.is_dir() else args.model
    serve(create_app(args.kind, model_file, settings), args.host, args.port, loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
