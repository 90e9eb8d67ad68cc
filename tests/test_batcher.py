"""Deterministic unit tests of the batcher: a gate (threading.Event) holds the real ONNX model call,
so what queues up while a batch runs is decided by the test, never by timing luck."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from service.batcher import Batcher, BatchResult, ClientDisconnected
from service.errors import DeadlineExceeded, Draining, EngineError, Overloaded
from service.metrics import Metrics
from service.model import Model, load_model
from service.settings import Settings


class Gate:
    """Wraps the real model's run: records each batch and blocks until the test opens the gate."""

    def __init__(self, model: Model) -> None:
        self.real_run = model.run
        self.batches: list[np.ndarray] = []
        self.entered = threading.Event()
        self.open = threading.Event()
        self.open.set()
        self.fail_next = False

    def run(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(x.copy())
        self.entered.set()
        assert self.open.wait(10), "test gate never opened"
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected engine failure")
        return self.real_run(x)


@pytest.fixture
def model(tiny_repo: Path) -> Model:
    return load_model(tiny_repo / "tiny" / "1", Settings(provider="cpu"))


@pytest.fixture
def gate(model: Model) -> Gate:
    g = Gate(model)
    model.run = g.run  # type: ignore[method-assign]
    return g


def make_batcher(**kw: float) -> Batcher:
    """Pipeline depth 1 unless asked: one engine call at a time, so batch formation is easy to reason about."""
    args: dict[str, float] = {
        "max_batch_size": 8, "max_wait_s": 0.0, "max_queue_images": 64, "request_timeout_s": 5.0, "pipeline_depth": 1
    }  # fmt: skip
    args.update(kw)
    return Batcher(metrics=Metrics(), **args)  # type: ignore[arg-type]


@pytest.fixture
async def batcher() -> AsyncIterator[Batcher]:
    b = make_batcher()
    b.start()
    yield b
    await b.stop()


def images(n: int, value: float = 0.5) -> np.ndarray:
    return np.full((n, 784), value, dtype=np.float32)


async def hold(gate: Gate, b: Batcher, model: Model) -> asyncio.Task[BatchResult]:
    """Start one request and wait until its batch is inside the (closed) gate."""
    gate.open.clear()
    gate.entered.clear()
    first = asyncio.ensure_future(b.submit(model, images(1, 0.1)))
    assert await asyncio.to_thread(gate.entered.wait, 10)
    return first


async def test_idle_request_runs_at_once_alone(batcher: Batcher, model: Model, gate: Gate) -> None:
    res = await batcher.submit(model, images(1))
    assert res.batch_images == 1
    assert len(gate.batches) == 1
    expected = gate.real_run(images(1))
    np.testing.assert_allclose(res.probabilities, expected, rtol=1e-6)


async def test_requests_queued_while_a_batch_runs_share_the_next_batch(
    batcher: Batcher, model: Model, gate: Gate
) -> None:
    first = await hold(gate, batcher, model)
    rest = [asyncio.ensure_future(batcher.submit(model, images(1, v))) for v in (0.2, 0.3, 0.4)]
    await asyncio.sleep(0)  # let them enqueue
    assert batcher.queued_images == 3
    gate.open.set()
    results = await asyncio.gather(first, *rest)
    assert [r.batch_images for r in results] == [1, 3, 3, 3]
    assert [b.shape[0] for b in gate.batches] == [1, 3]
    # each caller gets its own row back
    for r, v in zip(results[1:], (0.2, 0.3, 0.4), strict=True):
        np.testing.assert_allclose(r.probabilities, gate.real_run(images(1, v)), rtol=1e-5)


async def test_batches_never_exceed_max_batch_size(batcher: Batcher, model: Model, gate: Gate) -> None:
    first = await hold(gate, batcher, model)
    rest = [asyncio.ensure_future(batcher.submit(model, images(1))) for _ in range(11)]
    await asyncio.sleep(0)
    gate.open.set()
    await asyncio.gather(first, *rest)
    assert [b.shape[0] for b in gate.batches] == [1, 8, 3]


async def test_full_queue_refuses_at_once_with_retry_after(model: Model, gate: Gate) -> None:
    b = make_batcher(max_queue_images=2)
    b.start()
    try:
        first = await hold(gate, b, model)
        queued = [asyncio.ensure_future(b.submit(model, images(1))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as info:
            await b.submit(model, images(1))
        assert info.value.status_code == 503
        assert int(info.value.headers["Retry-After"]) >= 1
        gate.open.set()
        await asyncio.gather(first, *queued)
    finally:
        gate.open.set()
        await b.stop()


async def test_request_past_its_deadline_gets_504_and_is_not_computed(model: Model, gate: Gate) -> None:
    b = make_batcher(request_timeout_s=0.05)
    b.start()
    try:
        first = await hold(gate, b, model)
        with pytest.raises(DeadlineExceeded) as info:
            await b.submit(model, images(1, 0.9))
        assert info.value.status_code == 504
        gate.open.set()
        with pytest.raises(DeadlineExceeded):  # the held one also outlived its deadline
            await first
        follow = await b.submit(model, images(1, 0.3))
        assert follow.batch_images == 1
        # the expired request never reached the engine: batches were [held], [follow]
        assert [float(x[0, 0]) for x in gate.batches] == pytest.approx([0.1, 0.3])
    finally:
        gate.open.set()
        await b.stop()


async def test_cancelled_caller_is_dropped_before_compute(batcher: Batcher, model: Model, gate: Gate) -> None:
    first = await hold(gate, batcher, model)
    doomed = asyncio.ensure_future(batcher.submit(model, images(1, 0.7)))
    kept = asyncio.ensure_future(batcher.submit(model, images(1, 0.2)))
    await asyncio.sleep(0)
    doomed.cancel()
    await asyncio.sleep(0)
    gate.open.set()
    await first
    res = await kept
    assert res.batch_images == 1
    assert doomed.cancelled()
    assert all(not np.isclose(x[:, 0], 0.7).any() for x in gate.batches)


async def test_disconnected_client_is_dropped(batcher: Batcher, model: Model, gate: Gate) -> None:
    gone = asyncio.Event()

    async def receive() -> dict[str, str]:
        await gone.wait()
        return {"type": "http.disconnect"}

    first = await hold(gate, batcher, model)
    waiting = asyncio.ensure_future(batcher.submit(model, images(1, 0.7), receive=receive))
    await asyncio.sleep(0)
    gone.set()
    with pytest.raises(ClientDisconnected):
        await waiting
    gate.open.set()
    await first
    assert [b.shape[0] for b in gate.batches] == [1]
    ok = await batcher.submit(model, images(1))
    assert ok.batch_images == 1


async def test_engine_error_fails_only_its_batch(batcher: Batcher, model: Model, gate: Gate) -> None:
    first = await hold(gate, batcher, model)
    gate.fail_next = True
    gate.open.set()
    with pytest.raises(EngineError) as info:
        await first
    assert info.value.status_code == 500
    assert info.value.error_id in info.value.message
    assert "injected" not in info.value.message  # no internals leak
    after = await asyncio.gather(*(batcher.submit(model, images(1)) for _ in range(3)))
    assert all(r.probabilities.shape == (1, 10) for r in after)


async def test_interactive_work_goes_before_queued_bulk(batcher: Batcher, model: Model, gate: Gate) -> None:
    first = await hold(gate, batcher, model)
    bulk = asyncio.ensure_future(batcher.submit_many(model, images(16, 0.6)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    single = asyncio.ensure_future(batcher.submit(model, images(1, 0.2)))
    await asyncio.sleep(0)
    gate.open.set()
    await first
    res = await single
    probs, _, _ = await bulk
    assert probs.shape == (16, 10)
    # the single image ran in the first batch after the held one, ahead of both bulk chunks
    assert float(gate.batches[1][0, 0]) == pytest.approx(0.2)
    assert res.batch_images == 1


async def test_deadline_aware_admission_refuses_unmeetable_requests(model: Model, gate: Gate) -> None:
    b = make_batcher(max_queue_images=10_000, max_batch_size=256)
    b.start()
    try:
        first = await hold(gate, b, model)
        backlog = [asyncio.ensure_future(b.submit(model, images(200), bulk=True)) for _ in range(10)]
        await asyncio.sleep(0)
        b._sec_per_image = 1e-3  # as if measured: 2,000 queued images = about 2 s of work
        with pytest.raises(Overloaded) as info:
            await b.submit(model, images(1), bulk=True, budget_s=0.05)
        assert info.value.code == "deadline_unmeetable"
        assert int(info.value.headers["Retry-After"]) >= 2
        gate.open.set()
        await asyncio.gather(first, *backlog)
    finally:
        gate.open.set()
        await b.stop()


async def test_drain_finishes_queued_work_then_refuses(batcher: Batcher, model: Model, gate: Gate) -> None:
    first = await hold(gate, batcher, model)
    queued = asyncio.ensure_future(batcher.submit(model, images(1)))
    await asyncio.sleep(0)
    drained = asyncio.ensure_future(batcher.drain(5))
    await asyncio.sleep(0)
    with pytest.raises(Draining):
        await batcher.submit(model, images(1))
    gate.open.set()
    assert await drained
    assert (await queued).probabilities.shape == (1, 10)
    await first


async def test_pipelining_hands_bulk_over_ahead_but_keeps_interactive_work_queued(model: Model, gate: Gate) -> None:
    b = make_batcher(pipeline_depth=2)
    b.start()
    try:
        gate.open.clear()
        first = asyncio.ensure_future(b.submit(model, images(3, 0.1), bulk=True))
        assert await asyncio.to_thread(gate.entered.wait, 10)
        second = asyncio.ensure_future(b.submit(model, images(2, 0.3), bulk=True))
        for _ in range(5):
            await asyncio.sleep(0)
        assert b.queued_images == 0  # a bulk chunk is handed to the inference thread behind the running one
        third = asyncio.ensure_future(b.submit(model, images(1, 0.4)))
        for _ in range(5):
            await asyncio.sleep(0)
        assert b.queued_images == 1  # interactive work waits for a free engine (droppable, joinable)
        gate.open.set()
        results = await asyncio.gather(first, second, third)
        assert [r.batch_images for r in results] == [3, 2, 1]
    finally:
        gate.open.set()
        await b.stop()


async def test_bulk_chunks_are_bulk_chunk_images_each(model: Model, gate: Gate) -> None:
    b = make_batcher(max_batch_size=4, bulk_chunk_images=10, max_queue_images=100)
    b.start()
    try:
        probs, _, _ = await b.submit_many(model, images(25, 0.5))
        assert probs.shape == (25, 10)
        assert [x.shape[0] for x in gate.batches] == [10, 10, 5]
    finally:
        await b.stop()


class _Connection:
    """Stands for uvicorn's request cycle: the batcher reads ``disconnected`` instead of starting a task."""

    def __init__(self) -> None:
        self.disconnected = False

    async def receive(self) -> dict[str, str]:
        raise AssertionError("the batcher must not call receive() when it can read the connection state")


async def test_connection_state_is_read_when_the_batch_forms(batcher: Batcher, model: Model, gate: Gate) -> None:
    conn = _Connection()
    first = await hold(gate, batcher, model)
    waiting = asyncio.ensure_future(batcher.submit(model, images(1, 0.7), receive=conn.receive))
    await asyncio.sleep(0)
    conn.disconnected = True
    gate.open.set()
    await first
    with pytest.raises(ClientDisconnected):
        await waiting
    assert all(not np.isclose(x[:, 0], 0.7).any() for x in gate.batches)
