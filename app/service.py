"""The service: the model on its inference thread, one batcher per endpoint, the upload decoder, and readiness.

The app's lifespan starts it and stops it; routes reach it through the dependencies in app/deps.py.
Failures of the batchers become HTTP statuses here, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
from anyio import CapacityLimiter
from fastapi import HTTPException

from app.batcher import BatchError, DynamicBatcher, QueueFullError, ShuttingDownError
from app.config import Settings
from app.inference import ExplainItem, Explanation, InferenceEngine, inference_thread
from app.uploads import UploadDecoder
from model.checkpoint import CheckpointError, file_sha256, read_metadata
from model.cpu import cpu_quota

RETRY_AFTER_S = 1
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


def verify_checkpoint(settings: Settings) -> str:
    """The checkpoint's sha256; fails with one message naming the file if it is unusable or not the expected one."""
    read_metadata(settings.checkpoint)
    digest = file_sha256(settings.checkpoint)  # the only read of the whole file besides loading it
    if settings.checkpoint_sha256 and digest != settings.checkpoint_sha256.lower():
        raise CheckpointError(
            f"{settings.checkpoint}: sha256 differs from VIT_CHECKPOINT_SHA256={settings.checkpoint_sha256}"
        )
    return digest


def unavailable(detail: str) -> HTTPException:
    """503 with Retry-After: the client may try again (here later, or at another replica)."""
    return HTTPException(503, detail, headers={"Retry-After": str(RETRY_AFTER_S)})


@dataclass
class ModelService:
    settings: Settings
    engine: InferenceEngine
    executor: ThreadPoolExecutor  # the one inference thread that both batchers run on
    predict_batcher: DynamicBatcher[torch.Tensor, list[float]]
    attention_batcher: DynamicBatcher[ExplainItem, Explanation]
    decoder: UploadDecoder
    checkpoint_sha256: str
    ready: bool = False  # loaded, warmed up, and not draining
    in_flight: int = 0  # inference requests between admission and answer

    @classmethod
    async def start(
        cls,
        settings: Settings,
        checkpoint_sha256: str,
        on_batch: Callable[[str, list[float], float], None] | None = None,
    ) -> ModelService:
        """Load and warm up the model on the inference thread, start both batchers, and turn ready."""
        executor = inference_thread()
        engine = await asyncio.get_running_loop().run_in_executor(executor, InferenceEngine, settings)

        def batcher(name: str, run_batch: Callable) -> DynamicBatcher:
            return DynamicBatcher(
                run_batch, settings.max_batch_size, settings.max_wait_ms, settings.queue_size, executor, name, on_batch
            )

        decoder = UploadDecoder(
            preprocess=engine.checkpoint.preprocess,
            max_pixels=settings.max_image_pixels,
            max_aspect_ratio=settings.max_aspect_ratio,
            inline_pixels=settings.inline_decode_pixels,
            limiter=CapacityLimiter(settings.decode_workers or cpu_quota()),
        )
        service = cls(
            settings,
            engine,
            executor,
            predict_batcher=batcher("predict", engine.predict_batch),
            attention_batcher=batcher("attention", engine.explain_batch),
            decoder=decoder,
            checkpoint_sha256=checkpoint_sha256,
        )
        for each in service.batchers.values():
            each.start()
        service.ready = True
        return service

    async def stop(self) -> None:
        self.ready = False
        for batcher in self.batchers.values():
            await batcher.stop()
        self.executor.shutdown(wait=True)

    @property
    def batchers(self) -> dict[str, DynamicBatcher]:
        return {"predict": self.predict_batcher, "attention": self.attention_batcher}

    async def predict(self, inputs: list[torch.Tensor]) -> list[list[float]]:
        """Class probabilities for each (C, H, W) input, all queued on the /predict batcher at once."""
        return await asyncio.gather(*(self._submit(self.predict_batcher, item) for item in inputs))

    async def explain(self, item: ExplainItem) -> Explanation:
        return await self._submit(self.attention_batcher, item)

    async def _submit(self, batcher: DynamicBatcher[ItemT, ResultT], item: ItemT) -> ResultT:
        timeout_s = self.settings.request_timeout_s
        try:
            return await batcher.submit(item, timeout_s)
        except QueueFullError as error:
            raise unavailable(f"overloaded: {error}") from error
        except ShuttingDownError as error:
            raise unavailable(str(error)) from error
        except TimeoutError as error:
            raise HTTPException(504, f"no result within {timeout_s} s") from error
        except BatchError as error:  # the batcher has logged it with its traceback
            raise HTTPException(500, str(error)) from error
