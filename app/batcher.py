"""Dynamic batching: concurrent requests share one forward pass.

A request puts ``(item, future, deadline)`` on a bounded asyncio queue. One collector task takes the
first item, gathers more until the batch is full or ``max_wait_ms`` has passed, drops the requests
whose client has gone or whose deadline has passed, and hands the list of items to ``run_batch`` on a
single inference thread that owns the model. Every future gets its own result, or the batch's error.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


class QueueFullError(Exception):
    """The queue is at capacity; the caller should answer 503 and ask the client to retry."""


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    deadline: float  # time.monotonic() after which the result is no longer wanted
    enqueued: float  # time.monotonic() when it was queued


class DynamicBatcher:
    def __init__(
        self,
        run_batch: Callable[[list[Any]], Sequence[Any]],
        max_batch_size: int,
        max_wait_ms: float,
        queue_size: int,
        executor: ThreadPoolExecutor,
        name: str = "batcher",
        on_batch: Callable[[str, int, list[float], float], None] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.name = name
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=queue_size)
        self._executor = executor  # the single inference thread; it may serve several batchers
        self._collector: asyncio.Task | None = None
        self.on_batch = on_batch  # (name, size, each request's queue time, compute time), e.g. for metrics
        self.batch_sizes: Counter[int] = Counter()  # batch size -> how many batches ran with it
        self.dropped = 0  # requests skipped because their client left or their deadline passed

    def start(self) -> None:
        self._collector = asyncio.get_running_loop().create_task(self._collect_forever(), name=self.name)

    async def stop(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            await asyncio.gather(self._collector, return_exceptions=True)
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("the server is shutting down"))

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def submit(self, item: Any, timeout_s: float) -> Any:
        """Queue one input and wait for its result. Raises QueueFullError or asyncio.TimeoutError."""
        future = asyncio.get_running_loop().create_future()
        try:
            now = time.monotonic()
            self._queue.put_nowait(_Pending(item, future, now + timeout_s, now))
        except asyncio.QueueFull:
            raise QueueFullError(f"{self.name} queue is full ({self._queue.maxsize} waiting)") from None
        # On timeout or client disconnect wait_for cancels the future, so the collector skips it.
        return await asyncio.wait_for(future, timeout_s)

    def stats(self) -> dict:
        batches = sum(self.batch_sizes.values())
        served = sum(size * count for size, count in self.batch_sizes.items())
        return {
            "batches": batches,
            "requests": served,
            "mean_batch_size": served / batches if batches else 0.0,
            "max_batch_size_seen": max(self.batch_sizes, default=0),
            "batch_size_counts": {str(size): count for size, count in sorted(self.batch_sizes.items())},
            "dropped": self.dropped,
            "queue_depth": self.queue_depth,
        }

    async def _gather_batch(self) -> list[_Pending]:
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

    def _still_wanted(self, batch: list[_Pending]) -> list[_Pending]:
        now = time.monotonic()
        wanted = [pending for pending in batch if not pending.future.done() and pending.deadline > now]
        self.dropped += len(batch) - len(wanted)
        return wanted

    async def _collect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._still_wanted(await self._gather_batch())
            if not batch:
                continue
            items = [pending.item for pending in batch]
            started = time.monotonic()
            try:  # on the inference thread: torch never runs on the event loop
                rows = await loop.run_in_executor(self._executor, self.run_batch, items)
            except Exception as error:  # noqa: BLE001 - every request of a failed batch learns why
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            self.batch_sizes[len(batch)] += 1
            if self.on_batch:
                self.on_batch(self.name, len(batch), [started - p.enqueued for p in batch], time.monotonic() - started)
            for pending, row in zip(batch, rows):
                if not pending.future.done():
                    pending.future.set_result(row)
