"""The inference core: what every transport (REST v1, Open Inference Protocol, gRPC) does with a request.

Admission (ready, draining, the caller's deadline), decoding by media type (off the event loop when the body is
big), single vs bulk submission to the batcher, dropping callers that are gone (``gone()``, supplied by the
transport), remembering predictions for feedback, and the shape of a result. It imports nothing from HTTP.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from service import decode
from service.errors import Draining, InvalidInput, NotReady, PayloadTooLarge, Unauthorized
from service.model import Model
from service.registry import ModelRegistry
from service.state import ServiceState

log = logging.getLogger("service")

#: Bodies larger than this are decoded in the decoding thread, so a big JSON never stalls the event loop. There is
#: one such thread: decoding holds the interpreter lock (a second thread would add no speed), and a big JSON body
#: takes several times its size while it is decoded, so two at once would double that peak.
OFF_LOOP_BYTES = 64 * 1024
#: PNGs over this size are decoded in the decoding thread too (zlib packs ~1,000 pixels per byte: a 1 KiB PNG
#: decodes to at most about a megapixel, a few ms; a 28x28 digit is a few hundred bytes).
PNG_ON_LOOP_BYTES = 1024
DEADLINE_HEADER = "X-Request-Deadline-Ms"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted request: the model that will answer and the deadline it runs under."""

    model: Model
    budget_s: float  # seconds from admission to the deadline
    stated: bool  # the caller stated the deadline (work that cannot meet it is refused at once)
    why: str  # names the deadline in a 504


@dataclass(slots=True)
class Outcome:
    probabilities: np.ndarray  # (N, classes) float32
    labels: np.ndarray  # (N,) uint8
    model: Model
    prediction_id: str  # server-issued; what feedback refers to
    queue_s: float
    inference_s: float
    batch_images: int


class Core:
    OFF_LOOP_BYTES = OFF_LOOP_BYTES

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.settings = state.settings
        self.metrics = state.metrics
        self._shapes: dict[int, decode.Shape] = {}
        self._plain: Admission | None = None  # the last admission made without a stated deadline
        self._decoding = ThreadPoolExecutor(1, "decode")  # its thread starts with the first big body

    @property
    def registry(self) -> ModelRegistry:
        return self.state.registry

    @property
    def ready(self) -> bool:
        return self.state.ready

    @property
    def draining(self) -> bool:
        return self.state.draining

    # ------------------------------------------------------------------------------------------ admission
    def admit(self, deadline_s: float | None = None, *, source: str = DEADLINE_HEADER,
              model: Model | None = None) -> Admission:  # fmt: skip
        """Refuse work the service cannot take (not ready, draining); settle the deadline.

        A caller's deadline replaces the service's ``request_timeout_s``, up to ``max_deadline_s``.
        """
        state = self.state
        if not state.ready:
            if state.draining:
                self.metrics.dropped["draining"].inc()
                raise Draining()
            self.metrics.dropped["not_ready"].inc()
            raise NotReady("the model is not loaded and warm yet", headers={"Retry-After": "1"})
        chosen = model if model is not None else state.registry.default
        if deadline_s is None:  # the same for every such request to one model: the last one made is reused
            if (admission := self._plain) is None or admission.model is not chosen:
                timeout = self.settings.request_timeout_s
                admission = Admission(chosen, timeout, False, f"the service's request timeout ({timeout:g} s)")
                self._plain = admission
            return admission
        if not (math.isfinite(deadline_s) and deadline_s > 0):
            raise InvalidInput(f"{source} must be a positive number", code="invalid_deadline")
        budget = min(deadline_s, self.settings.max_deadline_s)
        return Admission(chosen, budget, True, f"its deadline ({budget * 1000:g} ms, from {source})")

    @staticmethod
    def deadline_ms(raw: str | bytes | None) -> float | None:
        """``X-Request-Deadline-Ms`` -> seconds (None if absent); 400 when it is not a positive number."""
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            raise InvalidInput(f"{DEADLINE_HEADER} must be a positive number of milliseconds",
                               code="invalid_header") from None  # fmt: skip
        if not (math.isfinite(value) and value > 0):
            raise InvalidInput(f"{DEADLINE_HEADER} must be a positive number of milliseconds", code="invalid_header")
        return value / 1000.0

    def room_for(self, media: str, content_length: str | None, model: Model, limit: int) -> None:
        """503 ``queue_full`` before a binary bulk body is read when even the fewest images its declared size
        can hold (raw: one byte a pixel; .npy: at most four) would not fit the bulk queue. A size over the body
        ``limit`` is left to the 413 of reading it."""
        if media not in (decode.RAW, decode.NPY) or not content_length or not content_length.strip().isdigit():
            return
        if int(content_length) > limit:
            return
        fewest = int(content_length) // (model.n_features * (1 if media == decode.RAW else 4))
        if fewest > 1:
            self.state.batcher.check_room(fewest, bulk=True)

    # ------------------------------------------------------------------------------------------ decoding
    def shape(self, model: Model) -> decode.Shape:
        shape = self._shapes.get(id(model))
        if shape is None:
            s = self.settings
            shape = decode.Shape(model.n_features, *model.image_shape, s.max_images_per_request, s.max_png_pixels)
            self._shapes = {**self._shapes, id(model): shape}
        return shape

    async def decode(self, table: dict[str, decode.Decoder], content_type: str | None, body: bytes,
                     model: Model) -> np.ndarray:  # fmt: skip
        """Pixels from a body, by media type; bodies over ``OFF_LOOP_BYTES`` are decoded in the decoding thread."""
        if len(body) > self.settings.max_json_bytes and decode.media_type(content_type) == decode.JSON:
            raise PayloadTooLarge(f"the JSON body is {len(body)} bytes; JSON is limited to "
                                  f"{self.settings.max_json_bytes} (send .npy or raw uint8 for bulk)")  # fmt: skip
        size, media = len(body), decode.media_type(content_type)
        if media in (decode.PNG, decode.MULTIPART) and size > PNG_ON_LOOP_BYTES:
            size = OFF_LOOP_BYTES + 1  # a small PNG can still declare millions of pixels: decode it off the loop
        elif media == decode.RAW:
            size = 0  # raw uint8 is a view of the body, whatever its size: no thread hand-off
        return await self.offload(size, decode.decode, table, content_type, body, self.shape(model))

    async def offload(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` here when ``size`` bytes are cheap to handle, else in the decoding thread (one at a time)."""
        if size <= OFF_LOOP_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._decoding, fn, *args)

    def close(self) -> None:
        """Let the decoding thread go (a decode still running finishes on its own)."""
        self._decoding.shutdown(wait=False)

    # ------------------------------------------------------------------------------------------ inference
    async def infer(self, admission: Admission, images: np.ndarray, *, gone: Callable[[], bool] | None = None,
                    transport: str = "http", bulk: bool | None = None) -> Outcome:  # fmt: skip
        """Run validated pixels ((N, F) uint8 or float32 in [0, 1]) through the batcher and remember the answer.

        One image is interactive work, more is bulk (``bulk`` overrides). ``gone()`` returning True drops the
        work before compute. Raises the service's errors (503 refused, 504 past the deadline, 499 gone, 500).
        """
        requests = self.metrics.stats.requests
        if transport in requests:
            requests[transport] += 1
        n = images.shape[0]
        batcher = self.state.batcher
        probs, labels, queue_s, inference_s, batch_n = await batcher.submit(
            admission.model,
            images,
            bulk=n > 1 if bulk is None else bulk,
            deadline=batcher.now() + admission.budget_s,
            why=admission.why,
            budget_s=admission.budget_s if admission.stated else None,
            gone=gone,
        )
        pid = self.state.feedback.remember(labels)
        return Outcome(probs, labels, admission.model, pid, queue_s, inference_s, batch_n)

    # ------------------------------------------------------------------------------------------ feedback
    def feedback(self, prediction_id: str, label: int, index: int, *, source: str, token: str | None) -> bool | None:
        """Score a reported true label; None when the prediction is unknown (forgotten, or another replica's)."""
        required = self.settings.feedback_token
        if required and not _same(token, required):
            raise Unauthorized("feedback needs a valid bearer token", headers={"WWW-Authenticate": "Bearer"})
        return self.state.feedback.score(prediction_id, label, index, source)

    # ------------------------------------------------------------------------------------------ lifecycle
    async def warm_up(self) -> None:
        """Warm every loaded model, measure the engine's cost per batch size, then say ready."""
        state = self.state
        try:
            for model in state.registry.models:
                await asyncio.to_thread(model.warm_up, self.settings.largest_batch)
                await self.calibrate(model)
        except Exception:
            log.exception("warm-up failed; the service stays not ready")
            return
        if self.settings.gc_tuning:
            gc.collect()
            gc.freeze()  # the start-up objects (FastAPI, pydantic, ONNX Runtime bindings) are never scanned again
            gc.set_threshold(10_000, 20, 20)
        if not state.draining:
            state.set_ready()
            log.info("ready", extra={"model": state.registry.name, "version": state.registry.default.version})

    async def calibrate(self, model: Model) -> None:
        """Measure a (warm) model's engine cost per batch size: the batcher runs cheap batches inline."""
        sizes = sorted(
            {min(1 << i, self.settings.max_batch_size) for i in range(self.settings.max_batch_size.bit_length())}
        )
        costs = await asyncio.to_thread(self.state.batcher.engine.calibrate, model, sizes)
        log.info("engine cost measured", extra={"model": model.name, "version": model.version,
                                                "engine_us": {str(n): round(c * 1e6, 1) for n, c in costs.items()}})  # fmt: skip


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
