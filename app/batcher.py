"""Dynamic batching: concurrent requests share one forward pass.

A request puts ``(item, future, deadline)`` on a bounded asyncio queue. One collector task takes the
first item, gathers more until the batch is full or ``max_wait_ms`` has passed, drops the requests
whose client has gone or whose deadline has passed, and hands the list of items to ``run_batch`` on a
single inference thread that owns the model (or, where asked, runs a lone input on the event loop: see
InferenceThread). Every future gets its own result, or the batch's error.
The collector outlives any failure: a failed batch is logged once and fails only its own requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

logger = logging.getLogger("app.batcher")

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class QueueFullError(Exception):
    """The queue is at capacity; the caller should answer 503 and ask the client to retry."""


class BatchError(RuntimeError):
    """The batch this request was part of failed; the message says why, the cause is chained."""


class ShuttingDownError(RuntimeError):
    """The batcher stopped before this request's result was ready."""


class InferenceThread:
    """The one thread that runs the model, for every batcher of a process, and whether it is busy now.

    Each batch handed to it costs two thread hand-overs: the thread wakes to run it, and the event loop
    wakes for the result. Under load both are awake anyway; at one connection each is a wake-up of an
    idle core. With `inline_lone_batches`, a batch of one input that finds the thread idle runs on the
    event loop instead, and the loop waits meanwhile: what arrives in the meantime waits in its socket,
    as it would have waited in the queue, and is read once the batch is done. A batch of more, or one
    that finds the thread busy, goes to the thread, so two batches never run at once.
    """

    def __init__(self, inline_lone_batches: bool = False) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.inline_lone_batches = inline_lone_batches
        self.running = 0  # batches handed to the thread and not yet back; only the event loop reads and writes it

    async def run(self, run_batch: Callable[[list[ItemT]], Sequence[ResultT]], items: list[ItemT]) -> Sequence[ResultT]:
        if self.inline_lone_batches and len(items) == 1 and self.running == 0:
            return run_batch(items)
        self.running += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, run_batch, items)
        finally:
            self.running -= 1

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)


@dataclass
class _Pending(Generic[ItemT, ResultT]):
    item: ItemT
    future: asyncio.Future[ResultT]
    deadline: float  # time.monotonic() after which the result is no longer wanted
    enqueued: float  # time.monotonic() when it was queued


class BatchObserver(Protocol):
    """What a batcher reports as it works, for metrics (app.metrics.BatchMetrics). The batcher is named first."""

    def batch_ran(self, batcher: str, queue_seconds: list[float], compute_seconds: float, queue_depth: int) -> None:
        """A batch gave its results: each request's time in the queue, the batch's time, and what waits now."""

    def requests_dropped(self, batcher: str, count: int) -> None:
        """Requests skipped before running: their client left or their deadline passed."""

    def batch_failed(self, batcher: str) -> None:
        """A batch raised; its requests got the error."""


@dataclass
class BatchStats:
    """What one batcher has done: the one record that /model shows and /metrics exports."""

    batch_sizes: Counter[int] = field(default_factory=Counter)  # batch size -> how many batches ran with it
    dropped: int = 0  # requests skipped because their client left or their deadline passed
    failed_batches: int = 0  # batches that raised; each of their requests got the error

    @property
    def batches(self) -> int:
        return sum(self.batch_sizes.values())

    @property
    def requests(self) -> int:
        return sum(size * count for size, count in self.batch_sizes.items())

    def batches_of_at_most(self, size: int) -> int:
        return sum(count for batch_size, count in self.batch_sizes.items() if batch_size <= size)

    def to_dict(self) -> dict:
        batches, served = self.batches, self.requests
        return {
            "batches": batches,
            "requests": served,
            "mean_batch_size": served / batches if batches else 0.0,
            "max_batch_size_seen": max(self.batch_sizes, default=0),
            "batch_size_counts": {str(size): count for size, count in sorted(self.batch_sizes.items())},
            "dropped": self.dropped,
            "failed_batches": self.failed_batches,
        }


class DynamicBatcher(Generic[ItemT, ResultT]):
    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], Sequence[ResultT]],
        max_batch_size: int,
        max_wait_ms: float,
        queue_size: int,
        thread: InferenceThread,
        name: str = "batcher",
        observer: BatchObserver | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.name = name
        self.observer = observer
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Pending[ItemT, ResultT]] = asyncio.Queue(maxsize=queue_size)
        self._thread = thread  # it may serve several batchers
        self._collector: asyncio.Task | None = None
        self._running: list[_Pending[ItemT, ResultT]] = []  # the batch on the inference thread now

    def start(self) -> None:
        self._collector = asyncio.get_running_loop().create_task(self._collect_forever(), name=self.name)

    async def stop(self) -> None:
        """Stop collecting, and fail every request not yet answered: the running batch's and the queued ones."""
        if self._collector is not None:
            self._collector.cancel()
            await asyncio.gather(self._collector, return_exceptions=True)
        unanswered = self._running + [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        self._fail(unanswered, ShuttingDownError("the server is shutting down"))

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def report(self) -> dict:
        """What /model shows of this batcher: its statistics and its queue now."""
        return self.stats.to_dict() | {"queue_depth": self.queue_depth}

    async def submit(self, item: ItemT, timeout_s: float) -> ResultT:
        """Queue one input and wait for its result. Raises QueueFullError, TimeoutError or BatchError."""
        # On timeout or client disconnect wait_for cancels the future, so the collector skips it.
        return await asyncio.wait_for(self.enqueue(item, timeout_s), timeout_s)

    def enqueue(self, item: ItemT, timeout_s: float) -> asyncio.Future[ResultT]:
        """Queue one input; raises QueueFullError. Its future gets the result or BatchError, TimeoutError if
        its deadline passes before it runs, or ShuttingDownError. Cancel the future to drop the input.

        No task and no timer per input, as the model process asks: a caller that needs the answer by
        the deadline times its own wait, as submit does.
        """
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        try:
            now = time.monotonic()
            self._queue.put_nowait(_Pending(item, future, now + timeout_s, now))
        except asyncio.QueueFull:
            raise QueueFullError(f"{self.name} queue is full ({self._queue.maxsize} waiting)") from None
        return future

    async def _gather_batch(self) -> list[_Pending[ItemT, ResultT]]:
        """Everything already queued, up to a full batch; then, if max_wait_ms > 0, wait for more.

        With max_wait_ms = 0 a lone request runs at once, and requests that arrive while a batch is
        running pile up in the queue and form the next batch: no fixed wait, batches grow with load.
        """
        batch = [await self._queue.get()]
        gather_until = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = gather_until - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    def _still_wanted(self, batch: list[_Pending[ItemT, ResultT]]) -> list[_Pending[ItemT, ResultT]]:
        now = time.monotonic()
        wanted = [pending for pending in batch if not pending.future.done() and pending.deadline > now]
        if len(wanted) < len(batch):
            self.stats.dropped += len(batch) - len(wanted)
            self._report("requests_dropped", len(batch) - len(wanted))
            late = [pending for pending in batch if not pending.future.done() and pending.deadline <= now]
            self._fail(late, TimeoutError(f"{self.name}: the deadline passed before the input ran"))
        return wanted

    async def _collect_forever(self) -> None:
        while True:
            try:
                self._running = self._still_wanted(await self._gather_batch())
                if self._running:
                    await self._run(self._running)
            except Exception as error:  # the loop must outlive anything that one batch does
                unanswered = [pending for pending in self._running if not pending.future.done()]
                logger.exception(
                    "%s batcher: a batch of %d failed, %d requests unanswered",
                    self.name,
                    len(self._running),
                    len(unanswered),
                )
                if unanswered:
                    self.stats.failed_batches += 1
                    self._fail(unanswered, BatchError(f"inference failed: {error}"), cause=error)
                    self._report("batch_failed")
            self._running = []

    async def _run(self, batch: list[_Pending[ItemT, ResultT]]) -> None:
        started = time.monotonic()
        items = [pending.item for pending in batch]
        results = await self._thread.run(self.run_batch, items)
        if len(results) != len(batch):
            raise BatchError(f"run_batch returned {len(results)} results for {len(batch)} inputs")
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)
        self.stats.batch_sizes[len(batch)] += 1
        queue_seconds = [started - pending.enqueued for pending in batch]
        self._report("batch_ran", queue_seconds, time.monotonic() - started, self.queue_depth)

    def _report(self, event: str, *details: object) -> None:
        """Tell the observer; one that fails is logged, and costs no request its answer."""
        if self.observer is None:
            return
        try:
            getattr(self.observer, event)(self.name, *details)
        except Exception:
            logger.exception("%s batcher: its observer failed on %s", self.name, event)

    @staticmethod
    def _fail(batch: list[_Pending], error: Exception, cause: Exception | None = None) -> None:
        error.__cause__ = cause
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)
