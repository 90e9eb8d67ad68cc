"""Dynamic micro-batching: concurrent requests become one vectorized ONNX Runtime call.

One consumer task owns two FIFO deques, interactive work (single images) and bulk chunks; it wakes on an event
(new work, a finished engine call), drops callers that are gone or past their deadline, and runs the rest:

- interactive work: one batch of up to ``max_batch_size`` images at a time, so later arrivals join the next.
  A batch measured to cost under ``inline_budget_s`` runs on the event loop (a thread hand-off costs more),
  others on the interactive engine thread. At low load (the last batch held one image, nothing waits) a single
  image runs in its caller's task at once, the first of each loop iteration only, so bursts still batch.
- bulk: niced engine threads (service/engine.py), ``bulk_parallel`` of them (default one per usable core), all
  busy while no single image arrives, one fewer while they keep arriving, one while one waits: a single image
  never queues, nor waits for a CPU, behind bulk. A request is cut into chunks of ``bulk_chunk_images``, or one
  per idle thread (``min_split`` images or more), so one request alone uses every core.

Deadlines are absolute (``loop.time()``), checked when a batch forms; one timer, armed for the earliest queued
deadline, answers 504 to callers whose deadline passes while they wait. Results reach callers through their
Future as ``(probabilities, labels, queue_s, inference_s, batch_images)``; the labels (argmax) of a batch are
computed once for all its callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from service.engine import BULK_NICE, BatchObserver, Computed, Engine, Item, Observations, Result, to_float
from service.errors import Draining, EngineError, Overloaded
from service.queues import Queues

if TYPE_CHECKING:
    from service.metrics import Metrics
    from service.model import Model

log = logging.getLogger("service.batcher")


class Batcher(Queues):
    def __init__(self, *, max_batch_size: int, max_wait_s: float, max_queue_images: int, metrics: Metrics,
                 observer: BatchObserver | None = None, bulk_chunk_images: int = 1024,
                 max_bulk_queue_images: int | None = None, bulk_parallel: int = 0, inline_budget_s: float = 500e-6,
                 bulk_nice: int = BULK_NICE) -> None:  # fmt: skip
        self.max_batch_size, self.max_wait_s, self.inline_budget_s = max_batch_size, max_wait_s, inline_budget_s
        self.bulk_chunk_images = bulk_chunk_images
        self.min_split = 256  # the fewest images of a chunk cut to keep idle bulk threads busy
        self.single_recent_s, self._single_at = 0.1, -1e9  # the last single image's arrival (loop.time())
        super().__init__(max_queue_images, max_bulk_queue_images or max_queue_images, metrics)
        self._running = [0, 0]  # engine calls in flight: interactive (0 or 1), bulk
        self.engine = Engine(bulk_parallel, bulk_nice)  # bulk_parallel 0: one bulk thread per usable core
        self.bulk_parallel = self.engine.bulk_parallel
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The loop it runs on, kept: on Python 3.11 ``asyncio.get_running_loop()`` is a getpid() system call.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = True
        self._sec_per_image = 2e-5  # for Retry-After and deadline admission (exponentially weighted)
        self.inline_max_s = 0.0  # the longest batch run on the event loop so far (the loop's worst stall)
        self._observations = Observations(self.engine, observer)
        self._hot, self._last_batch = False, 0  # a single image ran now in this loop iteration; last batch size
        self._requests = itertools.count()  # numbers the requests: the chunks of one bulk request share one

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run(), name="batcher")

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work, let queued and running batches finish. True if all finished in time."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self.busy and time.monotonic() < deadline:  # noqa: ASYNC110 (once, at shutdown)
            await asyncio.sleep(0.01)
        return not self.busy

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._timer is not None:
            self._timer.cancel()
        self._loop = None
        self._observations.flush()
        for q in self._queues:
            while q:
                if not (it := q.popleft()).future.done():
                    it.future.set_exception(Draining())
        self.engine.shutdown()

    def now(self) -> float:
        """The clock deadlines are read against: the event loop's (``loop.time()``)."""
        return (self._loop or asyncio.get_running_loop()).time()

    @property
    def busy(self) -> bool:
        return bool(self._queued[0] or self._queued[1] or self._running[0] or self._running[1])

    # ----------------------------------------------------------------- admission
    def estimate_wait_s(self, images: int, *, bulk: bool) -> float:
        """Expected time until ``images`` more images would be done, from the measured engine cost."""
        ahead = self._queued[0] + (self._queued[1] if bulk else 0) + images
        running = self._running[0] * self.max_batch_size + self._running[1] * self.bulk_chunk_images
        return (ahead + running) * self._sec_per_image

    # ----------------------------------------------------------------- submit
    async def submit(self, model: Model, images: np.ndarray, *, bulk: bool, deadline: float, why: str,
                     budget_s: float | None = None, gone: Callable[[], bool] | None = None) -> Result:  # fmt: skip
        """Queue ``images`` ((n, F) float32 in [0, 1] or uint8 0-255) and wait for their outputs.

        ``deadline`` is absolute (``loop.time()``), ``why`` names it in a 504. With ``budget_s`` (the caller
        stated a deadline), work the queue cannot finish in time is refused at once. ``gone()`` returning True
        (the caller hung up) drops the work before compute. Bulk work runs in chunks of ``bulk_chunk_images``.
        """
        n = images.shape[0]
        self._admit(n, bulk, budget_s)
        loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        step = self._chunk_images(self._queued[1] + n, now) if bulk else n
        if not bulk:
            self._single_at = now
        request = next(self._requests)
        if not bulk and self._may_run_now(loop, model, n):  # low load: no hand-off to the consumer task and back
            item = Item(images, model, loop.create_future(), now, deadline, why, gone, request)
            self._inline(loop, [item])
            return item.future.result()
        items = [self._enqueue(loop, model, images if step == n else images[i : i + step], bulk, now, deadline, why,
                               gone, request) for i in range(0, n, step)]  # fmt: skip
        self._wakeup.set()
        if deadline < self._timer_at:
            self._arm(loop, deadline)
        try:
            if len(items) == 1:
                return await items[0].future
            results = [await it.future for it in items]
        except BaseException as exc:  # one chunk failed or the caller was cancelled: the rest is not wanted
            if isinstance(exc, asyncio.CancelledError):  # the caller's task (an RPC cancelled, a client gone)
                self._metrics.dropped["cancelled"].inc()
            for it in items:
                if not it.future.done():
                    it.future.cancel()
                elif not it.future.cancelled():
                    it.future.exception()  # retrieved: one error answers the request, the others are not logged
            raise
        probs, labels = np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])
        return probs, labels, max(r[2] for r in results), sum(r[3] for r in results), max(r[4] for r in results)

    def _may_run_now(self, loop: asyncio.AbstractEventLoop, model: Model, n: int) -> bool:
        """Run a single image in its caller's task: nothing interactive waits or runs, the last batch held one
        image, it is cheap (inline budget), and none ran so yet in this loop iteration (later arrivals batch)."""
        if self._hot or self._last_batch > 1 or self._queued[0] or self._running[0] or self.max_wait_s > 0:
            return False
        cost = self.engine.cost(model, n)
        if cost is None or cost > self.inline_budget_s:
            return False
        self._hot = True
        loop.call_soon(setattr, self, "_hot", False)
        return True

    def _bulk_threads(self, now: float) -> int:
        """Bulk engine calls allowed at once: every bulk thread; one fewer while single images keep arriving
        (one came in the last ``single_recent_s``: a core stays theirs); one while one waits or runs."""
        waiting = self._queued[0] or self._running[0]
        return 1 if waiting else max(1, self.bulk_parallel - (now - self._single_at < self.single_recent_s))

    def _chunk_images(self, n: int, now: float) -> int:
        """Images per bulk engine call while ``n`` wait: ``bulk_chunk_images``, or fewer to fill free threads."""
        pieces = max(1, min(self._bulk_threads(now) - self._running[1], n // self.min_split))
        return min(self.bulk_chunk_images, -(-n // pieces))

    def check_room(self, n: int, *, bulk: bool) -> None:
        """Raise what ``submit`` would for ``n`` images (draining, queue full) before the work is even read."""
        self._admit(n, bulk, None)

    def _admit(self, n: int, bulk: bool, budget_s: float | None) -> None:
        if not self._accepting:
            self._metrics.dropped["draining"].inc()
            raise Draining()
        q = 1 if bulk else 0
        if self._queued[q] + n > self._limits[q]:
            self._metrics.dropped["queue_full"].inc()
            raise Overloaded(f"the queue is full ({self._queued[q]} images waiting); retry later",
                             retry_after_s=self.estimate_wait_s(0, bulk=bulk), code="queue_full")  # fmt: skip
        if budget_s is not None and (wait := self.estimate_wait_s(n, bulk=bulk)) > budget_s:
            self._metrics.dropped["deadline_unmeetable"].inc()
            raise Overloaded(f"cannot finish within the stated deadline ({budget_s * 1000:.0f} ms): "
                             f"about {wait * 1000:.0f} ms of work is queued",
                             retry_after_s=wait, code="deadline_unmeetable")  # fmt: skip

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wakeup.clear()
            try:
                await self._dispatch(loop)
            except Exception:  # the loop survives everything; _launch fails only the batch concerned
                log.exception("batcher dispatch failed")
            await self._wakeup.wait()

    async def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._queued[0] and not self._running[0]:
            if self.max_wait_s > 0 and self._queued[0] < self.max_batch_size:
                await asyncio.sleep(self.max_wait_s)
            batch = self._take(0, self.max_batch_size, loop.time())
            if batch:
                cost = self.engine.cost(batch[0].model, sum(it.n for it in batch))
                if cost is not None and cost <= self.inline_budget_s:
                    self._inline(loop, batch)
                else:
                    self._launch(loop, 0, batch)
        while self._queued[1] and self._running[1] < self._bulk_threads(now := loop.time()):
            batch = self._take(1, self._chunk_images(self._queued[1], now), now)
            if not batch:
                break
            self._launch(loop, 1, batch, pinned=self._bulk_threads(now) == self.bulk_parallel)

    def _inline(self, loop: asyncio.AbstractEventLoop, batch: list[Item]) -> None:
        started = loop.time()
        start = time.perf_counter()
        try:
            x = to_float(batch)
            probs = batch[0].model.run(x)
        except Exception as exc:
            self._fail(batch, exc)
            return
        seconds = time.perf_counter() - start
        self.inline_max_s = max(self.inline_max_s, seconds)
        self._metrics.stats.inline_batches += 1
        self._deliver(batch, x, probs, started, seconds)
        self._observations.inline(loop, batch, x, probs)

    def _launch(self, loop: asyncio.AbstractEventLoop, qi: int, batch: list[Item], pinned: bool = True) -> None:
        start = loop.time()
        self._running[qi] += 1
        fut = self.engine.launch(qi, batch, loop, pinned)
        fut.add_done_callback(lambda f: self._finish(qi, batch, start, f))

    def _finish(self, qi: int, batch: list[Item], start: float, done: asyncio.Future[Computed]) -> None:
        self._running[qi] -= 1
        self._wakeup.set()
        exc = done.exception()
        if exc is not None:
            self._fail(batch, exc)
            return
        out = done.result()
        if out is None:
            for it in batch:
                self._gone(it)
            return
        x, probs, seconds = out
        self._deliver(batch, x, probs, start, seconds)
        self._observations.threaded(qi, batch, x, probs)

    def _deliver(self, batch: list[Item], x: np.ndarray, probs: np.ndarray, started: float, seconds: float) -> None:
        """Hand each caller its rows. ``started``: when the batch left the queue (``loop.time()``)."""
        n = self._last_batch = x.shape[0]
        self._sec_per_image += 0.1 * (seconds / n - self._sec_per_image)
        self.engine.observe(batch[0].model, n, seconds)
        labels = probs.argmax(axis=1).astype(np.uint8)
        waits, row = [], 0
        for it in batch:
            queue_s = started - it.enqueued
            waits.append(queue_s)
            if not it.future.done():
                end = row + it.n
                it.future.set_result((probs[row:end], labels[row:end], queue_s, seconds, n))
            row += it.n
        self._metrics.observe_batch(batch[0].model, n, seconds, waits)

    def _fail(self, batch: list[Item], exc: BaseException) -> None:
        """An error in one batch fails only that batch's callers, with a generic message; logged once."""
        error_id = uuid.uuid4().hex[:12]
        log.error("inference failed for a batch",
                  extra={"error_id": error_id, "batch_images": sum(it.n for it in batch)}, exc_info=exc)  # fmt: skip
        self._metrics.dropped["engine_error"].inc(len(batch))
        for it in batch:
            if not it.future.done():
                it.future.set_exception(EngineError(error_id))
