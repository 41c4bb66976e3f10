"""The service: the model's backend (in this process, or a model process), the upload decoder, and readiness.

The app's lifespan starts it and stops it; routes reach it through the dependencies in app/deps.py.
Failures of the batchers become HTTP statuses here, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from anyio import CapacityLimiter
from fastapi import HTTPException

from app.backend import Backend, LocalBackend
from app.batcher import BatchError, QueueFullError, ShuttingDownError
from app.config import Settings
from app.decoder_pool import DecoderPool
from app.remote_backend import RemoteBackend
from app.served import ExplainItem, Explanation, ServedModel
from app.uploads import UploadDecoder
from model.cpu import cpu_quota
from model.metadata import CheckpointError, file_sha256, read_metadata

RETRY_AFTER_S = 1


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
    backend: Backend
    decoder: UploadDecoder
    checkpoint_sha256: str
    render_limiter: CapacityLimiter  # heatmap PNGs drawn at once: each holds a picture and Matplotlib's buffers
    ready: bool = False  # loaded, warmed up, and not draining
    in_flight: int = 0  # inference requests between admission and answer (answering)

    @classmethod
    async def start(cls, settings: Settings, checkpoint_sha256: str) -> ModelService:
        """The model in this process, or the model process's when vit-serve runs one; then ready."""
        if settings.model_socket:
            backend: Backend = await RemoteBackend.connect(settings.model_socket, settings.model_connect_timeout_s)
        else:
            backend = await LocalBackend.start(settings)
        share_of_cpus = max(1, cpu_quota() // (settings.workers or 1))
        decoder = UploadDecoder(
            preprocess=backend.model.preprocess,
            max_pixels=settings.max_image_pixels,
            max_aspect_ratio=settings.max_aspect_ratio,
            inline_bytes=settings.inline_decode_bytes,
            inline_pixels=settings.inline_decode_pixels,
            display_pixels=settings.max_render_pixels,
            pool=DecoderPool(settings.decode_workers or share_of_cpus, settings.decode_timeout_s),
        )
        return cls(settings, backend, decoder, checkpoint_sha256, CapacityLimiter(share_of_cpus), ready=True)

    @property
    def model(self) -> ServedModel:
        return self.backend.model

    @contextmanager
    def answering(self) -> Iterator[None]:
        """An inference request counted in flight until its answer is ready: the drain waits for it.

        A context manager in each inference route rather than a dependency with yield, which would cost
        every request FastAPI's exit-stack handling.
        """
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def stop(self) -> None:
        self.ready = False
        await self.backend.stop()
        self.decoder.pool.stop()

    async def predict(self, inputs: list[np.ndarray]) -> list[list[float]]:
        """Class probabilities for each (C, H, W) input, all queued on the /predict batcher at once."""
        if len(inputs) == 1:  # the common case, without gather's task
            return [await self._submit("predict", inputs[0])]
        return await asyncio.gather(*(self._submit("predict", item) for item in inputs))

    async def explain(self, item: ExplainItem) -> Explanation:
        return await self._submit("attention", item)

    async def _submit(self, endpoint: str, item: Any) -> Any:
        timeout_s = self.settings.request_timeout_s
        try:
            return await self.backend.submit(endpoint, item, timeout_s)
        except QueueFullError as error:
            raise unavailable(f"overloaded: {error}") from error
        except ShuttingDownError as error:
            raise unavailable(str(error)) from error
        except TimeoutError as error:
            raise HTTPException(504, f"no result within {timeout_s} s") from error
        except BatchError as error:  # logged with its traceback where the batch ran
            raise HTTPException(500, str(error)) from error
