"""Dynamic micro-batching: concurrent requests become one vectorized ONNX Runtime call.

One consumer task owns two FIFO deques (interactive single-image work first, then bulk chunks) and one
inference thread. It waits for the first item without polling, takes everything queued up to
``max_batch_size`` images (no idle delay: an item arriving at an idle service runs at once), runs the
batch off the event loop, and fans results back out through each item's Future. Items whose caller has
gone (cancelled Future) or whose deadline passed are dropped before compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import DeadlineExceeded, Draining, EngineError, Overloaded, ServiceError
from service.metrics import Metrics
from service.model import Model

log = logging.getLogger("service.batcher")

#: Called in the inference thread after each successful batch with (model, inputs, probabilities).
BatchObserver = Callable[[Model, np.ndarray, np.ndarray], None]
#: An ASGI ``receive``: once the body is read, it returns ``http.disconnect`` when the client goes away.
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


class ClientDisconnected(ServiceError):
    """The caller went away while queued; its item was dropped unrun (nobody reads this response)."""

    status_code = 499
    code = "client_disconnected"


@dataclass(slots=True)
class BatchResult:
    """What one caller gets back: its rows of the output and where the time went."""

    probabilities: np.ndarray
    model: Model
    queue_s: float
    inference_s: float
    batch_images: int


@dataclass(slots=True, eq=False)
class _Item:
    images: np.ndarray
    model: Model
    future: asyncio.Future[BatchResult]
    enqueued: float
    bulk: bool
    timer: asyncio.TimerHandle | None = field(default=None)
    #: uvicorn's per-request cycle (has ``.disconnected``): polled when the batch forms, no task per request.
    conn: Any = field(default=None)


class Batcher:
    def __init__(
        self,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_images: int,
        request_timeout_s: float,
        metrics: Metrics,
        observer: BatchObserver | None = None,
        bulk_chunk_images: int | None = None,
        max_bulk_queue_images: int | None = None,
        pipeline_depth: int = 2,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images
        self.request_timeout_s = request_timeout_s
        self.bulk_chunk_images = bulk_chunk_images or max_batch_size
        self._limits = (max_queue_images, max_bulk_queue_images or max_queue_images)
        self.pipeline_depth = pipeline_depth
        self._metrics = metrics
        self._observer = observer
        self._queues: tuple[deque[_Item], deque[_Item]] = (deque(), deque())  # interactive, bulk
        self._queued = [0, 0]
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task[None] | None = None
        self._inflight = 0  # engine calls submitted and not finished (at most pipeline_depth)
        self._slot = asyncio.Event()
        self._accepting = True
        # Measured engine cost (exponentially weighted), for Retry-After and deadline-aware admission.
        self._sec_per_image = 2e-5
        self._last_batch_s = 0.0

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work, let queued and running batches finish. True if all finished in time."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while (self._queued[0] or self._queued[1] or self._inflight) and time.monotonic() < deadline:  # noqa: ASYNC110 (once, at shutdown)
            await asyncio.sleep(0.01)
        return not (self._queued[0] or self._queued[1] or self._inflight)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for q in self._queues:
            while q:
                item = q.popleft()
                if not item.future.done():
                    item.future.set_exception(Draining())
        self._executor.shutdown(wait=True)

    # ----------------------------------------------------------------- admission
    @property
    def queued_images(self) -> int:
        return self._queued[0] + self._queued[1]

    def estimate_wait_s(self, images: int, *, bulk: bool) -> float:
        """Expected time until ``images`` more images would be done, from the measured batch cost."""
        ahead = self._queued[0] + (self._queued[1] if bulk else 0) + images
        return ahead * self._sec_per_image + self._inflight * self._last_batch_s

    def _admit(self, n: int, bulk: bool, budget_s: float | None) -> None:
        if not self._accepting:
            self._metrics.dropped["draining"].inc()
            raise Draining()
        q = 1 if bulk else 0
        if self._queued[q] + n > self._limits[q]:
            self._metrics.dropped["queue_full"].inc()
            raise Overloaded(
                f"the queue is full ({self._queued[q]} images waiting); retry later",
                retry_after_s=self.estimate_wait_s(0, bulk=bulk),
                code="queue_full",
            )
        if budget_s is not None:
            wait = self.estimate_wait_s(n, bulk=bulk)
            if wait > budget_s:
                self._metrics.dropped["deadline_unmeetable"].inc()
                raise Overloaded(
                    f"cannot finish within the stated deadline ({budget_s * 1000:.0f} ms): "
                    f"about {wait * 1000:.0f} ms of work is queued",
                    retry_after_s=wait,
                    code="deadline_unmeetable",
                )

    # ----------------------------------------------------------------- submit
    async def submit(
        self,
        model: Model,
        images: np.ndarray,
        *,
        bulk: bool = False,
        budget_s: float | None = None,
        receive: Receive | None = None,
    ) -> BatchResult:
        """Queue ``images`` (float32, (n, features)) as one item and wait for their outputs.

        With ``receive``, a client that disconnects while its item waits has the item dropped unrun: under
        uvicorn, by reading its connection state when the batch forms; elsewhere, by a task on ``receive``.
        """
        self._admit(images.shape[0], bulk, budget_s)
        return await self._wait(self._enqueue(model, images, bulk, budget_s, receive))

    async def submit_many(
        self, model: Model, images: np.ndarray, *, budget_s: float | None = None, receive: Receive | None = None
    ) -> tuple[np.ndarray, float, float]:
        """Bulk work: split into ``bulk_chunk_images`` chunks, queued behind interactive work.

        Returns (probabilities, longest queue seconds, total inference seconds).
        """
        self._admit(images.shape[0], True, budget_s)
        step = self.bulk_chunk_images
        items = [
            self._enqueue(model, images[i : i + step], True, budget_s, receive) for i in range(0, images.shape[0], step)
        ]
        try:
            results = [await self._wait(it) for it in items]
        except BaseException:
            for it in items:
                if not it.future.done():
                    it.future.cancel()
            raise
        probs = results[0].probabilities if len(results) == 1 else np.concatenate([r.probabilities for r in results])
        return probs, max(r.queue_s for r in results), sum(r.inference_s for r in results)

    def _enqueue(
        self, model: Model, images: np.ndarray, bulk: bool, budget_s: float | None, receive: Receive | None
    ) -> _Item:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[BatchResult] = loop.create_future()
        item = _Item(images, model, fut, time.perf_counter(), bulk)
        timeout = self.request_timeout_s if budget_s is None else min(budget_s, self.request_timeout_s)
        item.timer = loop.call_later(timeout, self._expire, item)
        if receive is not None:
            conn = getattr(receive, "__self__", None) or getattr(receive, "connection", None)
            if conn is not None and isinstance(getattr(conn, "disconnected", None), bool):
                item.conn = conn
            else:
                watcher = asyncio.ensure_future(receive())
                watcher.add_done_callback(lambda w: _on_disconnect(w, fut))
                fut.add_done_callback(lambda _: watcher.cancel())
        q = 1 if bulk else 0
        n = images.shape[0]
        self._queues[q].append(item)
        self._queued[q] += n
        self._metrics.queue_depth[q].inc(n)
        self._wakeup.set()
        return item

    async def _wait(self, item: _Item) -> BatchResult:
        try:
            return await item.future
        except asyncio.CancelledError:
            if item.future.cancelled() and not _current_task_cancelling():
                raise ClientDisconnected("the client disconnected while its request was queued") from None
            raise
        finally:
            if item.timer is not None:
                item.timer.cancel()
            if item.future.cancelled():  # the caller went away; the consumer drops the item unseen
                self._metrics.dropped["cancelled"].inc()

    def _expire(self, item: _Item) -> None:
        if not item.future.done():
            self._metrics.dropped["timeout"].inc()
            item.future.set_exception(
                DeadlineExceeded(f"the request waited longer than its deadline ({self.request_timeout_s:g} s)")
            )

    # ----------------------------------------------------------------- consumer
    def _take(self) -> list[_Item]:
        """Pop up to max_batch_size images of one model (a bigger bulk chunk goes alone); drop the items
        whose caller is gone (cancelled, disconnected or expired) before compute."""
        batch: list[_Item] = []
        size = 0
        model: Model | None = None
        for qi, q in enumerate(self._queues):
            while q:
                item = q[0]
                n = item.images.shape[0]
                gone = item.conn is not None and item.conn.disconnected
                if gone or item.future.done():
                    q.popleft()
                    self._queued[qi] -= n
                    self._metrics.queue_depth[qi].dec(n)
                    if gone and not item.future.done():
                        item.future.cancel()
                    continue
                if (model is not None and item.model is not model) or (batch and size + n > self.max_batch_size):
                    return batch
                q.popleft()
                self._queued[qi] -= n
                self._metrics.queue_depth[qi].dec(n)
                model = item.model
                batch.append(item)
                size += n
        return batch

    async def _run(self) -> None:
        """Form batches and hand them to the inference thread; bulk chunks are handed over up to
        ``pipeline_depth`` ahead, so the thread never waits for the event loop between two chunks."""
        loop = asyncio.get_running_loop()
        while True:
            if not (self._queued[0] or self._queued[1]):
                self._wakeup.clear()
                await self._wakeup.wait()
            # Only bulk work is handed over ahead: interactive items wait here for a free engine, where a
            # caller that hangs up can still be dropped and later arrivals can still join their batch.
            if self._inflight >= self.pipeline_depth or (self._inflight and self._queued[0]):
                self._slot.clear()
                await self._slot.wait()
                continue
            if self.max_wait_s > 0 and self.queued_images < self.max_batch_size:
                await asyncio.sleep(self.max_wait_s)
            batch = self._take()
            if not batch:
                continue
            try:
                self._launch(loop, batch)
            except Exception as exc:  # the loop survives everything
                self._fail(batch, exc)

    def _launch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        model = batch[0].model
        x = batch[0].images if len(batch) == 1 else np.concatenate([it.images for it in batch])
        start = time.perf_counter()
        done = asyncio.wrap_future(self._executor.submit(self._infer, model, x, batch), loop=loop)
        self._inflight += 1
        done.add_done_callback(lambda f: self._finish(loop, batch, x, start, f))

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Item],
        x: np.ndarray,
        start: float,
        done: asyncio.Future[tuple[np.ndarray | None, float]],
    ) -> None:
        self._inflight -= 1
        self._slot.set()
        exc = done.exception()
        if exc is not None:
            self._fail(batch, exc)
            return
        probs, seconds = done.result()
        if probs is None:
            for it in batch:
                if not it.future.done():
                    it.future.cancel()
            return
        model, n = batch[0].model, x.shape[0]
        self._sec_per_image += 0.1 * (seconds / n - self._sec_per_image)
        self._last_batch_s = seconds
        self._metrics.observe_batch(model, n, seconds, [start - it.enqueued for it in batch])
        row = 0
        for it in batch:
            k = it.images.shape[0]
            if not it.future.done():
                it.future.set_result(BatchResult(probs[row : row + k], model, start - it.enqueued, seconds, n))
            row += k
        if self._observer is not None:  # quality statistics: after the callers have their results
            loop.run_in_executor(self._executor, self._observe, model, x, probs)

    def _fail(self, batch: list[_Item], exc: BaseException) -> None:
        """An error in one batch fails only that batch's callers, with a generic message; logged once."""
        error_id = uuid.uuid4().hex[:12]
        log.error(
            "inference failed for a batch",
            extra={"error_id": error_id, "batch_images": sum(i.images.shape[0] for i in batch)},
            exc_info=exc,
        )
        self._metrics.dropped["engine_error"].inc(len(batch))
        for it in batch:
            if not it.future.done():
                it.future.set_exception(EngineError(error_id))

    def _infer(self, model: Model, x: np.ndarray, batch: list[_Item]) -> tuple[np.ndarray | None, float]:
        if all(it.conn is not None and it.conn.disconnected for it in batch):
            return None, 0.0  # handed over ahead, and every caller has hung up since: skip the compute
        t0 = time.perf_counter()
        probs = model.run(x)
        return probs, time.perf_counter() - t0

    def _observe(self, model: Model, x: np.ndarray, probs: np.ndarray) -> None:
        assert self._observer is not None
        try:
            self._observer(model, x, probs)
        except Exception:
            log.exception("batch observer failed")


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _on_disconnect(watcher: asyncio.Future[MutableMapping[str, Any]], fut: asyncio.Future[BatchResult]) -> None:
    if watcher.cancelled() or watcher.exception() is not None:
        return
    if watcher.result().get("type") == "http.disconnect" and not fut.done():
        fut.cancel()
