"""Where the model runs for a server process: in this process (LocalBackend), or in a model process
that several front ends feed (app/remote_backend.py). Both answer the same calls."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from app.batcher import DynamicBatcher, InferenceThread
from app.config import Settings
from app.metrics import BatchMetrics
from app.served import ServedModel

if TYPE_CHECKING:
    from app.inference import InferenceEngine


class Backend(Protocol):
    model: ServedModel
    alive: bool  # False once a model process has gone

    async def submit(self, endpoint: str, item: Any, timeout_s: float) -> Any:
        """One input's result. Raises QueueFullError, TimeoutError, BatchError or ShuttingDownError."""

    async def stats(self) -> dict[str, dict]:
        """Each batcher's report (app.batcher.DynamicBatcher.report)."""

    async def metrics(self) -> bytes:
        """The batchers' Prometheus exposition (app.metrics.BatchMetrics)."""

    async def stop(self) -> None: ...


class LocalBackend:
    """The engine on this process's inference thread, with one batcher per endpoint."""

    alive = True

    def __init__(self, engine: InferenceEngine, thread: InferenceThread, settings: Settings) -> None:
        self.model = engine.served_model()
        self.thread = thread  # the one inference thread that both batchers run on
        self.batch_metrics = BatchMetrics()
        runs = {"predict": engine.predict_batch, "attention": engine.explain_batch}  # one batcher per endpoint
        self.batchers: dict[str, DynamicBatcher] = {
            name: DynamicBatcher(
                run_batch,
                settings.max_batch_size,
                settings.max_wait_ms,
                settings.queue_size,
                thread,
                name,
                self.batch_metrics,
            )
            for name, run_batch in runs.items()
        }
        for name in self.batchers:
            self.batch_metrics.watch(name)

    @classmethod
    async def start(cls, settings: Settings) -> LocalBackend:
        """Load and warm up the model on the inference thread, then start both batchers."""
        # Imported here: a front end of the model process never starts this backend, and never loads torch.
        from app.inference import InferenceEngine

        thread = InferenceThread()
        engine = await asyncio.get_running_loop().run_in_executor(thread.executor, InferenceEngine, settings)
        thread.inline_lone_batches = engine.inline_lone_batches()
        backend = cls(engine, thread, settings)
        for batcher in backend.batchers.values():
            batcher.start()
        return backend

    async def submit(self, endpoint: str, item: Any, timeout_s: float) -> Any:
        return await self.batchers[endpoint].submit(item, timeout_s)

    def enqueue(self, endpoint: str, item: Any, timeout_s: float) -> asyncio.Future:
        """submit without the wait: the future to watch (app.batcher.DynamicBatcher.enqueue)."""
        return self.batchers[endpoint].enqueue(item, timeout_s)

    async def stats(self) -> dict[str, dict]:
        return {name: batcher.report() for name, batcher in self.batchers.items()}

    async def metrics(self) -> bytes:
        return self.batch_metrics.exposition()

    async def stop(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()
        self.thread.shutdown()
