"""The engine side of batching: the unit of work, float conversion, the engine threads and the measured cost.

Two lanes of threads run ONNX Runtime calls: one thread for interactive batches (one call at a time, so later
arrivals batch up behind it) and ``bulk_parallel`` threads for bulk chunks (default: one per usable core).
uint8 pixels are scaled to float32 on those threads, never on the event loop. The bulk threads run at a lower
OS priority (``bulk_nice``): they may fill every core, yet the event loop and the interactive thread get a core
the moment they have work. With one bulk thread per CPU the process may use, each bulk thread is pinned to its
own CPU: otherwise the kernel, balancing CPUs by priority weight, often stacks both low-priority threads on one
CPU while the other idles; while single images keep arriving (fewer bulk threads run) they may run on any CPU.
``calibrate`` times the engine per batch size at warm-up and ``observe`` lowers a figure a quick call disproves;
a batch whose measured cost is under the inline budget may run on the event loop instead (service/batcher.py
decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from service.model import Model

log = logging.getLogger("service.engine")

#: How much nicer (lower priority, ``nice(1)``) than the process the bulk engine threads run by default.
BULK_NICE = 19
_own = threading.local()  # a pinned bulk thread's CPU (``cpu``) and whether it keeps to it now (``pinned``)

#: What a caller gets: its rows of the output, their labels (argmax, uint8), seconds queued, seconds of the engine
#: call, images in that call.
Result = tuple[np.ndarray, np.ndarray, float, float, int]
#: Called after successful batches with (model, inputs float32 (N, F), probabilities, per item in order (request
#: number, rows), whole): the chunks of one bulk request share its number; ``whole``: every item is a whole request.
BatchObserver = Callable[["Model", np.ndarray, np.ndarray, Sequence[tuple[int, int]], bool], None]
#: Interactive batches are handed to the quality observer together, once this many images are gathered.
GATHER_ROWS = 64
#: A finished engine call: (inputs as float32, probabilities, seconds), or None when skipped.
Computed = tuple[np.ndarray, np.ndarray, float] | None


class Item:
    """Queued work: one request, or one chunk of a bulk request (``request`` is shared by its chunks)."""

    __slots__ = ("deadline", "enqueued", "future", "gone", "images", "model", "n", "request", "why")

    def __init__(self, images: np.ndarray, model: Model, future: asyncio.Future[Result], enqueued: float,
                 deadline: float, why: str, gone: Callable[[], bool] | None, request: int) -> None:  # fmt: skip
        self.images, self.model, self.future, self.n = images, model, future, images.shape[0]
        self.enqueued, self.deadline, self.why, self.gone, self.request = enqueued, deadline, why, gone, request


def to_float(items: Sequence[Item]) -> np.ndarray:
    """One float32 (N, F) array for the engine; uint8 pixels are scaled by the model's preprocessing."""
    first = items[0]
    if len(items) == 1 and first.images.dtype == np.float32:
        return first.images
    out = np.empty((sum(it.n for it in items), first.images.shape[1]), dtype=np.float32)
    row = 0
    for it in items:
        if it.images.dtype == np.uint8:
            np.multiply(it.images, np.float32(it.model.scale), out=out[row : row + it.n], casting="unsafe")
        else:
            out[row : row + it.n] = it.images
        row += it.n
    return out


class Engine:
    """The engine threads (an interactive lane and a bulk lane) and the measured cost per batch size."""

    def __init__(self, bulk_parallel: int = 0, bulk_nice: int = BULK_NICE) -> None:
        self.bulk_parallel = bulk_parallel if bulk_parallel > 0 else usable_cores()
        cpus = sorted(os.sched_getaffinity(0))
        pins = iter(cpus if len(cpus) == self.bulk_parallel > 1 else [])  # one bulk thread per CPU: pinned
        self.pools = (
            ThreadPoolExecutor(1, "engine", initializer=setup_thread, initargs=("engine", 0, iter([]))),
            ThreadPoolExecutor(self.bulk_parallel, "engine-bulk", initializer=setup_thread,
                               initargs=("engine-bulk", bulk_nice, pins)),
        )  # fmt: skip
        # id(model) -> (weak reference to the model, batch size -> seconds): unloaded models are not kept alive
        self._costs: dict[int, tuple[weakref.ref[Model], dict[int, float]]] = {}

    def calibrate(self, model: Model, sizes: Sequence[int], rounds: int = 7) -> dict[int, float]:
        """Time the engine at each batch size; run in a thread at warm-up. Each size is timed by the fastest of
        ``rounds`` calls after an unmeasured one, and a batch never counts as dearer than a larger one: a
        process warming up beside others (a node starting several pods) is preempted in some calls, and a
        preempted call says nothing about the engine. ``observe`` corrects the table in service."""
        x = np.zeros((max(sizes), model.n_features), dtype=np.float32)
        table: dict[int, float] = {}
        for n in sorted(set(sizes)):  # ascending: ``cost`` takes the first size that fits
            model.run(x[:n])
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                model.run(x[:n])
                times.append(time.perf_counter() - t0)
            table[n] = min(times)
        dearest = float("inf")
        for n in sorted(table, reverse=True):
            dearest = table[n] = min(table[n], dearest)
        live = {k: v for k, v in self._costs.items() if v[0]() is not None}
        self._costs = live | {id(model): (weakref.ref(model), table)}
        return table

    def observe(self, model: Model, n: int, seconds: float) -> None:
        """An engine call of ``n`` images took ``seconds`` in service: when ``n`` is a calibrated size and the call
        was faster than its measured cost, that cost comes down to it (a warm-up slowed by a busy machine is
        corrected by the first quick call). A slower call changes nothing: its time includes whatever preempted
        it, or, on an engine thread, the wait to take the interpreter lock back from the event loop."""
        entry = self._costs.get(id(model))
        if entry is not None and (old := entry[1].get(n)) is not None and seconds < old and entry[0]() is model:
            entry[1][n] = seconds

    def cost(self, model: Model, n: int) -> float | None:
        """The measured seconds of a batch of ``n`` (the next calibrated size up); None if unmeasured."""
        entry = self._costs.get(id(model))
        if entry is None or entry[0]() is not model:
            return None
        table = entry[1]
        size = next((s for s in table if s >= n), None)
        return table[size] if size is not None else None

    def launch(self, lane: int, batch: list[Item], loop: asyncio.AbstractEventLoop,
               pinned: bool = True) -> asyncio.Future[Computed]:  # fmt: skip
        """Run ``batch`` on ``lane``; a pinned bulk thread keeps to its CPU only while ``pinned``."""
        return asyncio.wrap_future(self.pools[lane].submit(compute, batch, pinned), loop=loop)

    def background(self, lane: int, fn: Callable[..., object], *args: object) -> None:
        self.pools[lane].submit(fn, *args)

    def shutdown(self) -> None:
        for pool in self.pools:
            pool.shutdown(wait=True)


def usable_cores() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (``cpu.max``, containers)."""
    cores = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError, IndexError):
        group = Path("/proc/self/cgroup").read_text().split("\n", 1)[0].split("::", 1)[1]
        quota, period = Path(f"/sys/fs/cgroup{group.rstrip('/')}/cpu.max").read_text().split()
        cores = min(cores, max(1, -(-int(quota) // int(period))))  # "max 100000" (no quota): ValueError
    return cores


def setup_thread(name: str, nice: int, pins: Iterator[int]) -> None:
    """Engine thread start: a native name (``top -H``, ``ps -L``), ``nice`` more niceness than the process
    (Linux: per thread, capped at 19) and the next CPU of ``pins``, if any, as its only CPU. Where the system
    refuses one of them, the thread runs without it."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    try:
        if nice > 0:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        if (cpu := next(pins, None)) is not None:
            os.sched_setaffinity(tid, {cpu})
            _own.cpu, _own.pinned = cpu, True
    except (OSError, AttributeError):
        log.warning("could not set the priority or the CPU of an engine thread (%s)", name)


def keep_to_own_cpu(pinned: bool) -> None:
    """In a bulk thread pinned at start: keep to its CPU, or, not ``pinned``, run on any (while single images
    keep arriving only one bulk thread runs, and it should take whichever CPU the event loop is not on)."""
    cpu = getattr(_own, "cpu", None)
    if cpu is not None and _own.pinned != pinned:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu} if pinned else os.sched_getaffinity(os.getpid()))
            _own.pinned = pinned


def compute(batch: list[Item], pinned: bool = True) -> Computed:
    """In an engine thread: one call for the batch, skipped if every caller has hung up since the hand-over."""
    keep_to_own_cpu(pinned)
    if all(it.future.done() or (it.gone is not None and it.gone()) for it in batch):
        return None
    x = to_float(batch)
    t0 = time.perf_counter()
    probs = batch[0].model.run(x)
    return x, probs, time.perf_counter() - t0


class Observations:
    """Quality statistics after the callers have their results: a bulk chunk is observed on its bulk thread;
    interactive batches (inline or on the engine thread, a few dozen images at most) are gathered and observed
    64 images (or 0.25 s) at a time on the event loop, one vectorized observer call for several batches (about
    25 us for 64 images). Handing that call to a thread cost far more: the two threads then pass the interpreter
    lock back and forth at every numpy call of either (docs/design.md)."""

    def __init__(self, engine: Engine, observer: BatchObserver | None) -> None:
        self.engine = engine
        self.observer = observer
        self._pending: list[tuple[list[Item], np.ndarray, np.ndarray]] = []
        self._rows = 0
        self._timer: asyncio.TimerHandle | None = None

    def threaded(self, lane: int, batch: list[Item], x: np.ndarray, probs: np.ndarray) -> None:
        """A batch that ran on ``lane``'s thread (called on the event loop when it is done)."""
        if lane == 0:
            self.inline(asyncio.get_running_loop(), batch, x, probs)
        elif self.observer is not None:
            self.engine.background(lane, self._observe, [(batch, x, probs)], False)

    def inline(self, loop: asyncio.AbstractEventLoop, batch: list[Item], x: np.ndarray, probs: np.ndarray) -> None:
        """An interactive batch, gathered with the others (called on the event loop)."""
        if self.observer is None:
            return
        self._pending.append((batch, x, probs))
        self._rows += x.shape[0]
        if self._rows >= GATHER_ROWS:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(0.25, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending, self._rows = self._pending, [], 0
        if pending:
            self._observe(pending, True)

    def _observe(self, pending: list[tuple[list[Item], np.ndarray, np.ndarray]], whole: bool) -> None:
        """One observer call per run of batches of the same model (interactive batches arrive by the dozen, each
        item a whole request: ``whole``)."""
        assert self.observer is not None
        start = 0
        while start < len(pending):
            model, end = pending[start][0][0].model, start + 1
            while end < len(pending) and pending[end][0][0].model is model:
                end += 1
            run = pending[start:end]
            x = run[0][1] if len(run) == 1 else np.concatenate([x for _, x, _ in run])
            probs = run[0][2] if len(run) == 1 else np.concatenate([p for _, _, p in run])
            try:
                self.observer(model, x, probs, [(it.request, it.n) for batch, _, _ in run for it in batch], whole)
            except Exception:
                log.exception("batch observer failed")
            start = end
