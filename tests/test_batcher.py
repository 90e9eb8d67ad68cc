"""Deterministic unit tests of the batcher: a gate (threading.Event) holds the real ONNX model call, so what
queues up while a batch runs is decided by the test, never by timing luck."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.batcher import Batcher, Result
from service.engine import Engine, Item, Observations, keep_to_own_cpu, usable_cores
from service.errors import ClientDisconnected, DeadlineExceeded, Draining, EngineError, Overloaded
from service.metrics import Metrics
from service.model import Model, load_model
from service.settings import Settings


class Gate:
    """Wraps the real model's run: records each batch (and its thread), blocks while the gate is closed (only
    batches of more than ``free_rows`` images: 0, every batch)."""

    def __init__(self, model: Model) -> None:
        self.real_run = model.run
        self.batches: list[np.ndarray] = []
        self.threads: list[int] = []
        self.entered = threading.Event()
        self.open = threading.Event()
        self.open.set()
        self.fail_next = False
        self.free_rows = 0
        self.inside = 0
        self.most_inside = 0
        self._lock = threading.Lock()

    def run(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            self.batches.append(x.copy())
            self.threads.append(threading.get_ident())
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        self.entered.set()
        try:
            assert len(x) <= self.free_rows or self.open.wait(10), "test gate never opened"
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("injected engine failure")
            return self.real_run(x)
        finally:
            with self._lock:
                self.inside -= 1


@pytest.fixture
def model(tiny_repo: Path) -> Model:
    return load_model(tiny_repo / "tiny" / "1", Settings(provider="cpu"))


@pytest.fixture
def gate(model: Model) -> Gate:
    g = Gate(model)
    model.run = g.run  # type: ignore[method-assign]
    return g


def make_batcher(**kw: Any) -> Batcher:
    args: dict[str, Any] = {"max_batch_size": 8, "max_wait_s": 0.0, "max_queue_images": 64, "bulk_parallel": 1}
    args.update(kw)
    return Batcher(metrics=Metrics(), **args)


@contextlib.asynccontextmanager
async def running(b: Batcher, gate: Gate | None = None) -> AsyncIterator[Batcher]:
    """``b`` started; on the way out the gate (if any) is opened and ``b`` stopped, whatever the test did."""
    b.start()
    try:
        yield b
    finally:
        if gate is not None:
            gate.open.set()
        await b.stop()


@pytest.fixture
async def batcher() -> AsyncIterator[Batcher]:
    async with running(make_batcher()) as b:
        yield b


def images(n: int, value: float = 0.5) -> np.ndarray:
    return np.full((n, 784), value, dtype=np.float32)


def submit(b: Batcher, model: Model, x: np.ndarray, *, bulk: bool = False, timeout_s: float = 5.0,
           budget_s: float | None = None, gone: Callable[[], bool] | None = None) -> asyncio.Task[Result]:  # fmt: skip
    deadline = asyncio.get_running_loop().time() + timeout_s
    coro = b.submit(model, x, bulk=bulk, deadline=deadline, why="the test's deadline", budget_s=budget_s, gone=gone)
    return asyncio.ensure_future(coro)


async def hold(gate: Gate, b: Batcher, model: Model) -> asyncio.Task[Result]:
    """Start one request and wait until its batch is inside the (closed) gate."""
    gate.open.clear()
    gate.entered.clear()
    first = submit(b, model, images(1, 0.1))
    assert await asyncio.to_thread(gate.entered.wait, 10)
    return first


async def test_idle_request_runs_at_once_alone(batcher: Batcher, model: Model, gate: Gate) -> None:
    probs, labels, queue_s, _, batch_n = await submit(batcher, model, images(1))
    assert probs.shape == (1, 10)
    assert labels.dtype == np.uint8
    assert labels.tolist() == probs.argmax(axis=1).tolist()
    assert batch_n == 1
    assert queue_s >= 0
    assert len(gate.batches) == 1


async def test_requests_queued_while_a_batch_runs_share_the_next_batch(batcher: Batcher, model: Model,
                                                                      gate: Gate) -> None:  # fmt: skip
    first = await hold(gate, batcher, model)
    rest = [submit(batcher, model, images(1, 0.2 + i / 100)) for i in range(5)]
    await asyncio.sleep(0)
    gate.open.set()
    await first
    results = await asyncio.gather(*rest)
    assert [len(b) for b in gate.batches] == [1, 5]
    for i, (probs, labels, _, _, batch_n) in enumerate(results):  # each caller gets its own row back
        assert batch_n == 5
        np.testing.assert_allclose(probs, gate.real_run(images(1, 0.2 + i / 100)), rtol=1e-5)
        assert labels.tolist() == probs.argmax(axis=1).tolist()


async def test_batches_never_exceed_max_batch_size(batcher: Batcher, model: Model, gate: Gate) -> None:
    first = await hold(gate, batcher, model)
    rest = [submit(batcher, model, images(1)) for _ in range(20)]
    await asyncio.sleep(0)
    gate.open.set()
    await asyncio.gather(first, *rest)
    assert [len(b) for b in gate.batches] == [1, 8, 8, 4]


async def test_full_queue_refuses_at_once_with_retry_after(model: Model, gate: Gate) -> None:
    b = make_batcher(max_queue_images=4)
    async with running(b, gate):
        first = await hold(gate, b, model)
        queued = [submit(b, model, images(1)) for _ in range(4)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as err:
            await submit(b, model, images(1))
        assert err.value.code == "queue_full"
        assert int(err.value.headers["Retry-After"]) >= 1
        gate.open.set()
        await asyncio.gather(first, *queued)


async def test_a_deadline_passing_in_the_queue_answers_504_while_the_engine_is_still_busy(
    batcher: Batcher, model: Model, gate: Gate
) -> None:
    first = await hold(gate, batcher, model)
    late = submit(batcher, model, images(1, 0.9), timeout_s=0.05)
    with pytest.raises(DeadlineExceeded, match="the test's deadline"):
        await asyncio.wait_for(late, 10)  # the one timer fired: the engine call is still held by the gate
    assert len(gate.batches) == 1
    gate.open.set()
    await first
    await submit(batcher, model, images(1, 0.3))
    assert not any(np.allclose(x, 0.9) for x in gate.batches)  # never computed


async def test_cancelled_caller_is_dropped_before_compute(batcher: Batcher, model: Model, gate: Gate) -> None:
    first = await hold(gate, batcher, model)
    doomed = submit(batcher, model, images(1, 0.7))
    await asyncio.sleep(0)
    doomed.cancel()
    gate.open.set()
    await first
    await submit(batcher, model, images(1, 0.3))
    assert not any(np.allclose(x, 0.7) for x in gate.batches)


async def test_a_caller_that_is_gone_is_dropped_when_the_batch_forms(batcher: Batcher, model: Model,
                                                                     gate: Gate) -> None:  # fmt: skip
    first = await hold(gate, batcher, model)
    hung_up = False
    doomed = submit(batcher, model, images(1, 0.7), gone=lambda: hung_up)
    kept = submit(batcher, model, images(1, 0.3), gone=lambda: False)
    await asyncio.sleep(0)
    hung_up = True
    gate.open.set()
    await first
    await kept
    with pytest.raises(ClientDisconnected):
        await doomed
    assert not any(np.allclose(x, 0.7) for x in gate.batches)


async def test_a_bulk_request_gone_before_its_chunks_ran_leaves_no_unretrieved_error(model: Model) -> None:
    """Every chunk of a request whose client hung up is answered 499; the request raises once and the other
    chunks' errors are retrieved, not logged by asyncio as 'exception was never retrieved' (an error line per
    client that disconnects during bulk)."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        async with running(make_batcher(bulk_chunk_images=2)) as b:
            with pytest.raises(ClientDisconnected):
                await submit(b, model, images(6), bulk=True, gone=lambda: True)
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert reported == []


async def test_engine_error_fails_only_its_batch(batcher: Batcher, model: Model, gate: Gate) -> None:
    gate.fail_next = True
    with pytest.raises(EngineError) as err:
        await submit(batcher, model, images(1))
    assert "error id" in err.value.message
    assert "injected" not in err.value.message
    probs, *_ = await submit(batcher, model, images(1))
    assert probs.shape == (1, 10)


async def test_a_single_image_never_waits_behind_bulk_work(batcher: Batcher, model: Model, gate: Gate) -> None:
    gate.open.clear()
    bulk = submit(batcher, model, images(4, 0.6), bulk=True)
    assert await asyncio.to_thread(gate.entered.wait, 10)
    single = submit(batcher, model, images(1, 0.4))
    for _ in range(500):  # the single image reaches the engine on its own thread while bulk is still inside
        if gate.inside == 2:
            break
        await asyncio.sleep(0.01)
    assert gate.inside == 2
    gate.open.set()
    await asyncio.gather(bulk, single)


async def test_bulk_uint8_is_chunked_and_scaled_off_the_event_loop(model: Model, gate: Gate) -> None:
    b = make_batcher(bulk_chunk_images=4)
    async with running(b):
        x = np.arange(10 * 784, dtype=np.int64).reshape(10, 784).astype(np.uint8)
        probs, labels, _, _, _ = await submit(b, model, x, bulk=True)
        assert [len(c) for c in gate.batches] == [4, 4, 2]
        assert all(c.dtype == np.float32 for c in gate.batches)
        np.testing.assert_allclose(np.concatenate(gate.batches), x / np.float32(255), rtol=1e-6)
        np.testing.assert_allclose(probs, gate.real_run(x / np.float32(255)), rtol=1e-5)
        assert labels.dtype == np.uint8
        assert labels.tolist() == probs.argmax(axis=1).tolist()
        assert threading.get_ident() not in gate.threads


async def test_bulk_uses_every_engine_thread_only_while_no_single_image_waits(model: Model, gate: Gate) -> None:
    b = make_batcher(bulk_chunk_images=2, bulk_parallel=2)
    async with running(b, gate):
        gate.open.clear()
        bulk = submit(b, model, images(8, 0.6), bulk=True)
        await asyncio.to_thread(lambda: gate.entered.wait(10))
        for _ in range(200):  # the second chunk enters the gate on the second thread
            if gate.inside == 2:
                break
            await asyncio.sleep(0.01)
        assert gate.inside == 2
        single = submit(b, model, images(1, 0.4))
        for _ in range(500):  # the single image joins on the interactive thread: three engine calls at once
            if gate.inside == 3:
                break
            await asyncio.sleep(0.01)
        assert gate.inside == 3
        gate.open.set()
        await asyncio.gather(bulk, single)
        order = [round(float(x[0, 0]), 3) for x in gate.batches]
        assert order.index(0.4) == 2  # after the two bulk chunks already running, before the other two


async def test_deadline_aware_admission_refuses_unmeetable_requests(model: Model, gate: Gate) -> None:
    b = make_batcher(max_queue_images=10_000, max_batch_size=64)
    async with running(b, gate):
        first = await hold(gate, b, model)
        b._sec_per_image = 0.01  # the measured cost: 10 ms per image
        queued = [submit(b, model, images(1)) for _ in range(50)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as err:
            await submit(b, model, images(1), budget_s=0.1)
        assert err.value.code == "deadline_unmeetable"
        fine = submit(b, model, images(1), budget_s=5.0)
        gate.open.set()
        await asyncio.gather(first, fine, *queued)


async def test_drain_finishes_queued_work_then_refuses(batcher: Batcher, model: Model, gate: Gate) -> None:
    first = await hold(gate, batcher, model)
    queued = submit(batcher, model, images(1))
    await asyncio.sleep(0)
    draining = asyncio.ensure_future(batcher.drain(10))
    await asyncio.sleep(0)
    with pytest.raises(Draining):
        await submit(batcher, model, images(1))
    gate.open.set()
    assert await draining
    await asyncio.gather(first, queued)


async def test_a_batch_measured_cheap_runs_inline_and_an_expensive_one_in_a_thread(model: Model, gate: Gate) -> None:
    b = make_batcher(inline_budget_s=1.0)  # everything is "cheap" under a 1 s budget
    async with running(b):
        b.engine.calibrate(model, [1, 2, 4, 8])
        gate.batches.clear()
        gate.threads.clear()
        await submit(b, model, images(1))
        assert gate.threads == [threading.get_ident()]  # ran on the event loop's thread
        b.inline_budget_s = 0.0
        await submit(b, model, images(1))
        assert gate.threads[-1] != threading.get_ident()
        assert b.inline_max_s > 0


async def settle(b: Batcher, running: int) -> None:
    """Let the dispatcher run until ``running`` bulk engine calls are in flight (state, not timing)."""
    for _ in range(500):
        if b._running[1] == running:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{b._running[1]} bulk engine calls in flight, expected {running}")


async def test_a_bulk_request_alone_is_cut_across_the_idle_bulk_threads(model: Model, gate: Gate) -> None:
    b = make_batcher(bulk_parallel=2, bulk_chunk_images=64)
    b.min_split = 2
    async with running(b, gate):
        gate.open.clear()
        alone = submit(b, model, images(8, 0.6), bulk=True)
        await settle(b, 2)  # two chunks of 4, one per idle thread (not one chunk of 8: the limit is 64)
        behind = submit(b, model, images(8, 0.7), bulk=True)  # every thread busy: one chunk
        await asyncio.sleep(0.05)
        gate.open.set()
        await asyncio.gather(alone, behind)
        assert sorted(len(x) for x in gate.batches) == [4, 4, 8]
        assert gate.most_inside == 2


async def test_while_single_images_keep_arriving_bulk_leaves_them_a_core(model: Model, gate: Gate) -> None:
    b = make_batcher(bulk_parallel=2, bulk_chunk_images=2)
    async with running(b, gate):
        b.single_recent_s = 1e9  # every single image counts as recent: one bulk call at a time
        await submit(b, model, images(1, 0.4))
        gate.open.clear()
        bulk = submit(b, model, images(8, 0.6), bulk=True)
        await settle(b, 1)
        await asyncio.sleep(0.05)
        assert b._running[1] == 1
        b.single_recent_s = 0.0  # no single image lately: bulk may take every thread
        b._wakeup.set()
        await settle(b, 2)
        gate.open.set()
        probs, *_ = await bulk
        assert probs.shape == (8, 10)


async def test_a_cheap_single_image_runs_inline_while_bulk_work_runs(model: Model, gate: Gate) -> None:
    b = make_batcher(bulk_parallel=1, inline_budget_s=1.0)
    async with running(b, gate):
        b.engine.calibrate(model, [1, 2, 4, 8])
        gate.free_rows = 1  # the gate holds the bulk chunk only
        gate.open.clear()
        gate.threads.clear()
        bulk = submit(b, model, images(4, 0.6), bulk=True)
        await settle(b, 1)
        probs, *_ = await submit(b, model, images(1, 0.4))  # answered while the bulk chunk is still held
        assert probs.shape == (1, 10)
        assert gate.threads[-1] == threading.get_ident()  # on the event loop: no hand-off to a thread
        gate.open.set()
        await bulk


def describe_thread() -> tuple[str, int, tuple[int, ...]]:
    """The calling thread's native name, niceness and CPUs."""
    tid = threading.get_native_id()
    name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
    return name, os.getpriority(os.PRIO_PROCESS, tid), tuple(sorted(os.sched_getaffinity(tid)))


def test_bulk_threads_are_named_lower_priority_and_pinned_one_per_cpu() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    engine = Engine(len(cpus))
    try:
        barrier = threading.Barrier(len(cpus))  # one task per thread of the pool, all at once

        def at_once() -> tuple[str, int, tuple[int, ...]]:
            barrier.wait(10)
            return describe_thread()

        seen = [f.result(10) for f in [engine.pools[1].submit(at_once) for _ in cpus]]
        assert {name for name, _, _ in seen} == {"engine-bulk"}
        assert {nice for _, nice, _ in seen} == {min(19, os.getpriority(os.PRIO_PROCESS, 0) + 19)}
        if len(cpus) > 1:  # one thread per CPU the process may use: each on its own CPU
            assert sorted(a for _, _, a in seen) == [(c,) for c in cpus]
            barrier.reset()

            def float_then_return() -> tuple[tuple[int, ...], tuple[int, ...]]:
                barrier.wait(10)
                keep_to_own_cpu(False)  # fewer bulk calls run: any CPU
                floating = describe_thread()[2]
                keep_to_own_cpu(True)
                return floating, describe_thread()[2]

            moves = [f.result(10) for f in [engine.pools[1].submit(float_then_return) for _ in cpus]]
            assert sorted(moves) == [(tuple(cpus), (c,)) for c in cpus]
        interactive = engine.pools[0].submit(describe_thread).result(10)
        assert interactive == ("engine", os.getpriority(os.PRIO_PROCESS, 0), tuple(cpus))
    finally:
        engine.shutdown()


def test_bulk_parallel_zero_means_one_bulk_thread_per_usable_core() -> None:
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))
    engine = Engine(0)
    try:
        assert engine.bulk_parallel == usable_cores()
    finally:
        engine.shutdown()


async def test_a_single_image_at_low_load_runs_in_its_callers_task_and_bursts_still_batch(
    model: Model, gate: Gate
) -> None:
    b = make_batcher(inline_budget_s=1.0)  # every batch counts as cheap: the order of calls is what is tested
    b.engine.calibrate(model, [1, 2, 4, 8])
    gate.batches.clear()
    gate.threads.clear()
    async with running(b):
        loop_thread = threading.get_ident()
        await submit(b, model, images(1))  # idle: runs at once, on the event loop
        burst = await asyncio.gather(*(submit(b, model, images(1)) for _ in range(8)))  # one loop iteration
        assert [len(x) for x in gate.batches] == [1, 1, 7]  # the burst's first ran at once, the rest as one batch
        assert set(gate.threads) == {loop_thread}
        assert [r[4] for r in burst] == [1] + [7] * 7
        assert all(r[1].tolist() == r[0].argmax(axis=1).tolist() for r in burst)  # each caller its own row's label
        await submit(b, model, images(1))  # the last batch held 7: this one goes through the queue...
        await submit(b, model, images(1))  # ... and, the load low again, this one at once
        assert [len(x) for x in gate.batches][3:] == [1, 1]
        assert b.inline_max_s > 0


async def test_inline_batches_are_observed_together_one_call_per_run_of_one_model() -> None:
    """Inline batches are gathered and handed to the quality observer in one call per run of batches of the same
    model (rows and per-request parts concatenated in order), not one call per batch, on the event loop's thread."""
    calls: list[tuple[object, np.ndarray, np.ndarray, list[tuple[int, int]]]] = []
    engine = Engine(1)
    threads: set[str] = set()

    def observer(m: object, x: np.ndarray, p: np.ndarray, parts: list[tuple[int, int]], whole: bool) -> None:
        threads.add(threading.current_thread().name)
        calls.append((m, x, p, list(parts)))

    observations = Observations(engine, observer)  # type: ignore[arg-type]
    a, b = object(), object()
    loop = asyncio.get_running_loop()
    request = iter(range(100))
    try:
        for model, rows in ((a, 1), (a, 2), (b, 1), (a, 1)):
            items = [Item(images(rows), model, loop.create_future(), 0.0, 1e9, "", None, next(request))]  # type: ignore[arg-type]
            x = images(rows, value=len(calls) + rows / 10)
            observations.inline(loop, items, x, x[:, :10])
        observations.flush()
    finally:
        engine.shutdown()
    assert threads == {threading.current_thread().name}
    assert [(m is a, len(x), parts) for m, x, _, parts in calls] == [
        (True, 3, [(0, 1), (1, 2)]),
        (False, 1, [(2, 1)]),
        (True, 1, [(3, 1)]),
    ]
    assert all(p.shape == (len(x), 10) for _, x, p, _ in calls)


class Timed:
    """A stand-in engine whose calls take ``delay[n]`` seconds for a batch of ``n`` (a preempted warm-up)."""

    n_features = 784

    def __init__(self, delay: dict[int, list[float]]) -> None:
        self.delay = delay

    def run(self, x: np.ndarray) -> np.ndarray:
        queue = self.delay.get(len(x))
        if queue:
            time.sleep(queue.pop(0))
        return np.zeros((len(x), 10), np.float32)


def test_calibration_keeps_the_fastest_call_and_never_ranks_a_batch_dearer_than_a_larger_one() -> None:
    engine = Engine(1)
    try:
        # size 1: every call but one preempted; size 2: never. The warm-up call of each size is not measured.
        stub = Timed({1: [0.05, 0.05, 0.05, 0.0, 0.05], 2: []})
        table = engine.calibrate(stub, [1, 2], rounds=4)  # type: ignore[arg-type]
        assert table[1] < 0.04  # the one call that was not preempted
        assert table[1] <= table[2]
        stub = Timed({1: [0.0] + [0.03] * 4, 2: []})  # size 1 preempted in every measured call
        table = engine.calibrate(stub, [1, 2], rounds=4)  # type: ignore[arg-type]
        assert table[1] == table[2] < 0.03  # no dearer than the larger batch
    finally:
        engine.shutdown()


def test_a_quick_engine_call_in_service_lowers_the_measured_cost_and_a_slow_one_does_not_raise_it() -> None:
    engine = Engine(1)
    try:
        stub = Timed({1: [0.02] * 3, 2: [0.02] * 3})
        engine.calibrate(stub, [1, 2], rounds=2)  # type: ignore[arg-type]
        assert engine.cost(stub, 1) >= 0.02  # type: ignore[arg-type,operator]
        engine.observe(stub, 1, 30e-6)  # type: ignore[arg-type]
        assert engine.cost(stub, 1) == 30e-6  # type: ignore[arg-type]
        engine.observe(stub, 1, 0.02)  # type: ignore[arg-type]  # preempted, or waiting for the interpreter lock
        assert engine.cost(stub, 1) == 30e-6  # type: ignore[arg-type]
        engine.observe(stub, 3, 1e-9)  # type: ignore[arg-type]  # not a calibrated size: nothing to correct
        assert engine.cost(stub, 3) is None  # type: ignore[arg-type]
        engine.observe(Timed({}), 1, 1e-9)  # type: ignore[arg-type]  # an uncalibrated model: ignored
    finally:
        engine.shutdown()


async def test_a_batch_measured_dear_at_warm_up_runs_inline_once_the_engine_is_seen_cheap(model: Model,
                                                                                           gate: Gate) -> None:  # fmt: skip
    b = make_batcher(inline_budget_s=0.05)
    async with running(b, gate):
        real = gate.run
        model.run = lambda x: (time.sleep(0.06), real(x))[1]  # type: ignore[method-assign]  # a busy warm-up
        await asyncio.to_thread(b.engine.calibrate, model, [1], 1)
        model.run = real  # type: ignore[method-assign]
        gate.threads.clear()
        await submit(b, model, images(1))
        assert gate.threads[-1] != threading.get_ident()  # over the budget: the engine thread, and measured there
        await submit(b, model, images(1))
        assert gate.threads[-1] == threading.get_ident()  # now known cheap: inline, in the caller's task
