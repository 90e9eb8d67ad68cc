"""The batcher's two queues (interactive, bulk) and their deadlines: items in, batches out, one timer.

Deadlines are absolute (``loop.time()``). They are checked when a batch is taken, and one timer, armed for the
earliest deadline queued, answers 504 to callers whose deadline passes while they wait: no timer per request.
Callers that are gone (``gone()``, or their future already done) are answered and dropped before compute.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from service.engine import Item
from service.errors import ClientDisconnected, DeadlineExceeded

if TYPE_CHECKING:
    from service.metrics import Metrics
    from service.model import Model


class Queues:
    def __init__(self, max_queue_images: int, max_bulk_queue_images: int, metrics: Metrics) -> None:
        self._limits = (max_queue_images, max_bulk_queue_images)
        self._metrics = metrics
        self._queues: tuple[deque[Item], deque[Item]] = (deque(), deque())  # interactive, bulk
        self._queued = [0, 0]  # images waiting in each (the queue-depth gauge reads them at scrape time)
        for q, gauge in enumerate(metrics.queue_depth):
            gauge.set_function(functools.partial(self._queued.__getitem__, q))
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    def _enqueue(self, loop: asyncio.AbstractEventLoop, model: Model, images: np.ndarray, bulk: bool, now: float,
                 deadline: float, why: str, gone: Callable[[], bool] | None, request: int) -> Item:  # fmt: skip
        item = Item(images, model, loop.create_future(), now, deadline, why, gone, request)
        q = 1 if bulk else 0
        self._queues[q].append(item)
        self._queued[q] += item.n
        return item

    # ----------------------------------------------------------------- deadlines: one timer
    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._sweep)

    def _sweep(self) -> None:
        """Answer 504 to every queued caller whose deadline has passed; re-arm for the earliest left."""
        self._timer, self._timer_at = None, float("inf")
        loop = asyncio.get_running_loop()
        now = loop.time()
        earliest = float("inf")
        for qi, q in enumerate(self._queues):
            keep = [it for it in q if not (it.future.done() or it.deadline <= now)]
            if len(keep) < len(q):  # one pass, rebuilt: no O(n) removals from the middle of a deque
                for it in q:
                    if it.future.done() or it.deadline <= now:
                        self._dequeued(qi, it)
                        self._expire(it)
                q.clear()
                q.extend(keep)
            earliest = min([earliest, *(it.deadline for it in q)])
        if earliest < float("inf"):
            self._arm(loop, earliest)

    def _expire(self, it: Item) -> None:
        if not it.future.done():
            self._metrics.dropped["timeout"].inc()
            it.future.set_exception(DeadlineExceeded(f"the request waited longer than {it.why}"))

    def _gone(self, it: Item) -> None:
        if not it.future.done():
            self._metrics.dropped["cancelled"].inc()
            it.future.set_exception(ClientDisconnected("the client went away while its request waited"))

    def _dequeued(self, qi: int, it: Item) -> None:
        self._queued[qi] -= it.n

    # ----------------------------------------------------------------- consumer
    def _take(self, qi: int, limit: int, now: float) -> list[Item]:
        """Pop up to ``limit`` images of one model (a bigger item goes alone); callers that are gone or past
        their deadline are answered and dropped before compute."""
        q = self._queues[qi]
        batch: list[Item] = []
        size = 0
        while q:
            it = q[0]
            if it.future.done() or it.deadline <= now or (it.gone is not None and it.gone()):
                q.popleft()
                self._dequeued(qi, it)
                if it.deadline <= now:
                    self._expire(it)
                else:
                    self._gone(it)
                continue
            if batch and (it.model is not batch[0].model or size + it.n > limit):
                break
            q.popleft()
            self._dequeued(qi, it)
            batch.append(it)
            size += it.n
        return batch
