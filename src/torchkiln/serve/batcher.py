"""The dynamic batcher: requests queue on an asyncio event loop and run in groups on one worker thread.

Pure asyncio, no web code. A batch flushes when it holds ``max_batch_size`` requests or when
``max_delay_ms`` has passed since its *first* request arrived. A request that finds the worker idle and
the queue empty runs at once, so a lone request (or a lone client's next one) never waits out the delay.
The delay applies to requests that queue up while a batch computes, and to a burst that follows a batch
of k requests (closed-loop clients answering): that burst waits, within the delay, for k requests instead
of running its first one alone and splitting into small batches.

The model function runs on a dedicated thread (never on the event loop). If a batch raises, its requests
are retried one by one so that only the request that caused the failure gets the error. Requests whose
caller stopped waiting (timed out, client gone) before their batch formed are dropped uncomputed.

>>> import asyncio
>>> async def demo():
...     batcher = DynamicBatcher(lambda items: [2 * x for x in items], max_batch_size=4, max_delay_ms=5)
...     async with batcher:
...         return await asyncio.gather(*(batcher.submit(i) for i in range(6)))
>>> asyncio.run(demo())
[0, 2, 4, 6, 8, 10]
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchStats", "BatcherClosed", "DynamicBatcher", "QueueFull"]


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already; ``retry_after_s`` estimates when to come back."""

    def __init__(self, depth: int, retry_after_s: float) -> None:
        super().__init__(f"the request queue is full ({depth} waiting); retry in about {retry_after_s:.2g} s")
        self.depth = depth
        self.retry_after_s = retry_after_s


class BatcherClosed(Exception):
    """The batcher is draining or closed and accepts no new requests."""


@dataclass
class BatchStats:
    """Counters a server exports: requests computed (``inferences``) vs model calls (``executions``)."""

    inferences: int = 0
    executions: int = 0
    batches: int = 0
    retried_batches: int = 0
    dropped: int = 0
    failed: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)
    last_batch_s: float = 0.0
    ewma_batch_s: float = 0.0


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    arrival: float


# A hook called on the event loop after every model call: (batch_size, seconds, failed).
BatchHook = Callable[[int, float, bool], None]


class DynamicBatcher:
    """Group ``submit``-ted items into batches for ``run_batch(items) -> results`` (one result per item).

    ``run_batch`` runs on one dedicated worker thread; it may return an ``Exception`` instance in place of
    a result to fail that item alone. ``thread_init`` runs once on that thread (``torch.set_num_threads``,
    for instance) and ``thread_context`` wraps every call there (``torch.inference_mode``).
    """

    def __init__(
        self,
        run_batch: Callable[[list[Any]], Sequence[Any]],
        *,
        max_batch_size: int = 32,
        max_delay_ms: float = 5.0,
        max_queue: int = 1024,
        thread_init: Callable[[], None] | None = None,
        thread_context: Callable[[], Any] | None = None,
        on_batch: BatchHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {max_delay_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._thread_init = thread_init
        self._thread_context = thread_context
        self._on_batch = on_batch
        self._clock = clock
        self._queue: collections.deque[_Pending] = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._accepting = False
        self._closing = False
        self._busy = False

    # ------------------------------------------------------------------------------------------ life

    async def start(self) -> None:
        """Start the worker thread and the scheduling task on the running loop."""
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="kiln-infer", initializer=self._thread_init
        )
        self._accepting = True
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name="kiln-batcher")

    async def drain(self) -> None:
        """Stop accepting new requests, finish every queued one, then stop the worker."""
        self._accepting = False
        self._closing = True
        self._wake()
        if self._task is not None:
            await self._task
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def __aenter__(self) -> DynamicBatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.drain()

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting the batch being computed)."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """Whether a batch is computing now."""
        return self._busy

    def retry_after_s(self) -> float:
        """Rough time until the queue has room: the batches ahead of a new request times the recent batch
        time (at least one second, the granularity of an HTTP Retry-After)."""
        batches_ahead = math.ceil((len(self._queue) + 1) / self.max_batch_size)
        return max(1.0, batches_ahead * (self.stats.ewma_batch_s or 0.1))

    async def run_on_worker(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the worker thread (under ``thread_context``), e.g. a warm-up, between batches."""
        if self._executor is None:
            raise BatcherClosed("the batcher is not running")

        def call() -> Any:
            if self._thread_context is not None:
                with self._thread_context():
                    return fn()
            return fn()

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    # ------------------------------------------------------------------------------------------ calls

    def submit_nowait(self, item: Any) -> asyncio.Future:
        """Queue ``item``; the returned future resolves to its result. Cancel it to withdraw the item
        (it is then dropped if its batch has not formed yet). Raises :class:`QueueFull` or
        :class:`BatcherClosed` at once instead of queueing."""
        if not self._accepting:
            raise BatcherClosed("the server is shutting down and accepts no new requests")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(len(self._queue), self.retry_after_s())
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(item, future, self._clock()))
        self._wake()
        return future

    async def submit(self, item: Any, timeout: float | None = None) -> Any:
        """Queue ``item`` and wait for its result (``asyncio.TimeoutError`` after ``timeout`` seconds;
        the item is then withdrawn if it has not been computed)."""
        future = self.submit_nowait(item)
        if timeout is None:
            return await future
        return await asyncio.wait_for(future, timeout)

    # ------------------------------------------------------------------------------------------ loop

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        queue = self._queue
        while queue and len(batch) < self.max_batch_size:
            pending = queue.popleft()
            if pending.future.done():  # withdrawn: timed out or the client went away
                self.stats.dropped += 1
                continue
            batch.append(pending)
        return batch

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, timeout: float | None) -> None:
        """Until the next submit (or drain), or ``timeout`` seconds. A bare future and a timer handle:
        cheaper per request than ``asyncio.wait_for`` on an Event, which makes a task each time."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, self._wake)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _schedule(self) -> None:
        last_done, last_size = -math.inf, 0
        just_ran = False
        while True:
            # How many requests to wait for (at most max_delay from the first): a full batch for requests
            # that queued while a batch computed; none for requests found on an idle worker.
            target = self.max_batch_size if just_ran else 0
            just_ran = False
            if not self._queue:
                if self._closing:
                    return
                await self._wait(None)
                if self._clock() - last_done >= self.max_delay_s or last_size <= 1:
                    # An idle server (no batch in the last max_delay, or a lone client's last request):
                    # the request runs now, with whatever arrived in the same instant.
                    target = 0
                else:
                    # Right after a batch of k: closed-loop clients send their next requests as their
                    # answers arrive. Wait (within max_delay) for those k instead of running the first
                    # alone and splitting the burst into small batches.
                    target = min(self.max_batch_size, last_size)
            if target and not self._closing:
                while self._queue and len(self._queue) < target and not self._closing:
                    remaining = self._queue[0].arrival + self.max_delay_s - self._clock()
                    if remaining <= 0:
                        break
                    await self._wait(remaining)
            batch = self._take()
            if not batch:
                continue
            await self._execute(batch)
            last_done, last_size, just_ran = self._clock(), len(batch), True

    async def _execute(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        items = [p.item for p in batch]
        self._busy = True
        try:
            ok, results, seconds = await loop.run_in_executor(self._executor, self._call, items)
            self._record(len(items), seconds, not ok)
            if not ok and len(items) > 1:
                # Find the culprit: retry one by one so only the request that fails gets the error.
                self.stats.retried_batches += 1
                results = []
                for item in items:
                    one_ok, one, one_s = await loop.run_in_executor(self._executor, self._call, [item])
                    self._record(1, one_s, not one_ok)
                    results.append(one[0] if one_ok else one)
            elif not ok:
                results = [results]
        finally:
            self._busy = False
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                self.stats.failed += 1
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    def _call(self, items: list[Any]) -> tuple[bool, Any, float]:
        """On the worker thread: ``(True, results, seconds)`` or ``(False, exception, seconds)``."""
        start = time.perf_counter()
        try:
            if self._thread_context is not None:
                with self._thread_context():
                    results = list(self.run_batch(items))
            else:
                results = list(self.run_batch(items))
            if len(results) != len(items):
                raise RuntimeError(
                    f"run_batch returned {len(results)} results for {len(items)} items; it must return one "
                    "result per item"
                )
            return True, results, time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - handed to the request(s) that caused it
            return False, exc, time.perf_counter() - start

    def _record(self, size: int, seconds: float, failed: bool) -> None:
        stats = self.stats
        stats.executions += 1
        if not failed:
            stats.inferences += size
        stats.batches += 1
        stats.batch_sizes[size] += 1
        stats.last_batch_s = seconds
        stats.ewma_batch_s = seconds if stats.ewma_batch_s == 0 else 0.8 * stats.ewma_batch_s + 0.2 * seconds
        if self._on_batch is not None:
            self._on_batch(size, seconds, failed)


def worker_thread_name() -> str:
    """The current thread's name (tests check that inference never runs on the event loop's thread)."""
    return threading.current_thread().name
