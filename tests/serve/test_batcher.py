"""The dynamic batcher on its own: pure asyncio with a fake model (no web code, no torch)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from torchkiln.serve.batcher import BatcherClosed, DynamicBatcher, QueueFull


class FakeModel:
    """Doubles its items; records the batches it saw and the thread it ran on. ``gate`` blocks a call
    whose batch contains ``"block"`` until it is set, so a test can hold the worker busy."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.started = threading.Event()

    def __call__(self, items: list) -> list:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        if "block" in items:
            self.started.set()
            assert self.gate.wait(10)
        if "bad" in items:
            raise ValueError("bad item")
        return [x * 2 if isinstance(x, int) else x for x in items]


async def _hold_worker(batcher: DynamicBatcher, model: FakeModel) -> asyncio.Future:
    """Submit an item that keeps the worker busy until ``model.gate`` is set."""
    fut = batcher.submit_nowait("block")
    await asyncio.get_running_loop().run_in_executor(None, model.started.wait, 10)
    return fut


def test_lone_request_is_not_delayed() -> None:
    async def go() -> float:
        model = FakeModel()
        async with DynamicBatcher(model, max_batch_size=8, max_delay_ms=3000) as batcher:
            start = time.monotonic()
            assert await batcher.submit(21) == 42
            return time.monotonic() - start

    assert asyncio.run(go()) < 1.5  # far below the 3 s delay


def test_full_batch_flushes_at_once() -> None:
    async def go() -> tuple[float, list]:
        model = FakeModel()
        async with DynamicBatcher(model, max_batch_size=4, max_delay_ms=5000) as batcher:
            blocker = await _hold_worker(batcher, model)
            futures = [batcher.submit_nowait(i) for i in range(4)]
            start = time.monotonic()
            model.gate.set()
            results = await asyncio.gather(*futures)
            elapsed = time.monotonic() - start
            await blocker
            assert results == [0, 2, 4, 6]
            return elapsed, model.batches

    elapsed, batches = asyncio.run(go())
    assert elapsed < 2.5  # not the 5 s delay
    assert batches[-1] == [0, 1, 2, 3]


def test_max_delay_counts_from_the_first_request() -> None:
    delay = 1.2

    async def go() -> tuple[float, list]:
        model = FakeModel()
        async with DynamicBatcher(model, max_batch_size=8, max_delay_ms=delay * 1000) as batcher:
            blocker = await _hold_worker(batcher, model)
            t0 = time.monotonic()
            first = batcher.submit_nowait(1)
            model.gate.set()
            await blocker
            await asyncio.sleep(0.6)
            second = batcher.submit_nowait(2)
            assert await asyncio.gather(first, second) == [2, 4]
            return time.monotonic() - t0, model.batches

    elapsed, batches = asyncio.run(go())
    assert batches[-1] == [1, 2]  # the later request joined the first one's batch
    # The flush came about `delay` after the FIRST request, not `delay` after the second (0.6 + 1.2 s).
    assert delay * 0.9 <= elapsed < 0.6 + delay


def test_batches_form_under_concurrency_and_run_off_the_loop() -> None:
    async def go() -> tuple[list, FakeModel, DynamicBatcher]:
        model = FakeModel()
        batcher = DynamicBatcher(model, max_batch_size=8, max_delay_ms=20)
        async with batcher:
            blocker = await _hold_worker(batcher, model)
            futures = [batcher.submit_nowait(i) for i in range(20)]
            model.gate.set()
            await blocker
            return await asyncio.gather(*futures), model, batcher

    results, model, batcher = asyncio.run(go())
    assert results == [2 * i for i in range(20)]
    assert max(len(b) for b in model.batches) == 8
    assert batcher.stats.executions < batcher.stats.inferences
    assert model.threads and all(name.startswith("kiln-infer") for name in model.threads)
    assert threading.main_thread().name not in model.threads


def test_a_failing_item_fails_alone() -> None:
    async def go() -> tuple[list, DynamicBatcher]:
        model = FakeModel()
        batcher = DynamicBatcher(model, max_batch_size=8, max_delay_ms=50)
        async with batcher:
            blocker = await _hold_worker(batcher, model)
            futures = [batcher.submit_nowait(x) for x in (1, "bad", 3)]
            model.gate.set()
            await blocker
            return await asyncio.gather(*futures, return_exceptions=True), batcher

    results, batcher = asyncio.run(go())
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], ValueError)
    assert batcher.stats.retried_batches == 1 and batcher.stats.failed == 1


def test_an_exception_result_fails_only_its_item() -> None:
    def run(items: list) -> list:
        return [KeyError(x) if x < 0 else x for x in items]

    async def go() -> list:
        async with DynamicBatcher(run, max_batch_size=4, max_delay_ms=1) as batcher:
            return await asyncio.gather(batcher.submit(1), batcher.submit(-1), return_exceptions=True)

    ok, err = asyncio.run(go())
    assert ok == 1 and isinstance(err, KeyError)


def test_queue_bound_and_withdrawn_requests() -> None:
    async def go() -> tuple[FakeModel, DynamicBatcher]:
        model = FakeModel()
        batcher = DynamicBatcher(model, max_batch_size=4, max_delay_ms=1, max_queue=3)
        async with batcher:
            blocker = await _hold_worker(batcher, model)
            futures = [batcher.submit_nowait(i) for i in range(3)]
            with pytest.raises(QueueFull) as info:
                batcher.submit_nowait(99)
            assert info.value.retry_after_s >= 1.0
            futures[1].cancel()  # the caller went away before its batch formed
            model.gate.set()
            await blocker
            assert await futures[0] == 0 and await futures[2] == 4
        return model, batcher

    model, batcher = asyncio.run(go())
    assert all(1 not in batch for batch in model.batches)
    assert batcher.stats.dropped == 1


def test_timeout_withdraws_the_request() -> None:
    async def go() -> tuple[FakeModel, DynamicBatcher]:
        model = FakeModel()
        batcher = DynamicBatcher(model, max_batch_size=4, max_delay_ms=1)
        async with batcher:
            blocker = await _hold_worker(batcher, model)
            with pytest.raises(asyncio.TimeoutError):
                await batcher.submit(7, timeout=0.05)
            model.gate.set()
            await blocker
        return model, batcher

    model, batcher = asyncio.run(go())
    assert all(7 not in batch for batch in model.batches)
    assert batcher.stats.dropped == 1


def test_drain_finishes_queued_work_and_refuses_new() -> None:
    async def go() -> list:
        model = FakeModel()
        batcher = DynamicBatcher(model, max_batch_size=2, max_delay_ms=1000)
        await batcher.start()
        blocker = await _hold_worker(batcher, model)
        futures = [batcher.submit_nowait(i) for i in range(5)]
        drained = asyncio.ensure_future(batcher.drain())
        await asyncio.sleep(0)
        with pytest.raises(BatcherClosed):
            batcher.submit_nowait(10)
        model.gate.set()
        await drained
        await blocker
        return [f.result() for f in futures]

    assert asyncio.run(go()) == [0, 2, 4, 6, 8]


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(lambda items: items, max_batch_size=0)
    with pytest.raises(ValueError, match="max_delay_ms"):
        DynamicBatcher(lambda items: items, max_delay_ms=-1)


def test_a_lone_sequential_client_is_never_delayed() -> None:
    async def go() -> float:
        async with DynamicBatcher(FakeModel(), max_batch_size=8, max_delay_ms=2000) as batcher:
            start = time.monotonic()
            for i in range(5):  # each request follows the previous answer at once
                assert await batcher.submit(i) == 2 * i
            return time.monotonic() - start

    assert asyncio.run(go()) < 2.0  # not 5 x 2 s
