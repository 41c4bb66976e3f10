"""What the lifespan builds and the routes use, reached through FastAPI dependencies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from anyio import CapacityLimiter
from fastapi import HTTPException, Request, UploadFile

from app.batcher import DynamicBatcher, QueueFullError
from app.config import Settings
from app.inference import InferenceEngine
from app.uploads import DecodedUpload, decode_upload

RETRY_AFTER_S = 1


@dataclass
class ServiceState:
    settings: Settings
    engine: InferenceEngine
    predict_batcher: DynamicBatcher
    attention_batcher: DynamicBatcher
    decode_limiter: CapacityLimiter  # bounds the threads decoding uploads at once
    ready: bool = field(default=False)
    in_flight: int = 0  # inference requests between acceptance and answer

    async def decode(self, upload: UploadFile) -> DecodedUpload:
        settings = self.settings
        return await decode_upload(
            upload, settings.max_image_pixels, self.engine.checkpoint.preprocess, self.decode_limiter, settings.inline_decode_pixels
        )


async def get_state(request: Request) -> ServiceState:
    """The loaded service, or 503. Async on purpose: FastAPI runs a sync dependency on a worker thread."""
    state: ServiceState | None = getattr(request.app.state, "service", None)
    if state is None or not state.ready:
        raise HTTPException(503, "the model is not ready, or the server is shutting down", headers={"Retry-After": str(RETRY_AFTER_S)})
    return state


async def accept_request(request: Request) -> AsyncIterator[ServiceState]:
    """The service for an inference request, counted in flight until its answer is ready (for the drain)."""
    state = await get_state(request)
    state.in_flight += 1
    try:
        yield state
    finally:
        state.in_flight -= 1


async def run_batched(batcher: DynamicBatcher, item: Any, timeout_s: float) -> Any:
    """Submit one input and translate the batcher's failures into HTTP statuses."""
    try:
        return await batcher.submit(item, timeout_s)
    except QueueFullError as error:
        raise HTTPException(503, f"overloaded: {error}", headers={"Retry-After": str(RETRY_AFTER_S)}) from error
    except asyncio.TimeoutError as error:
        raise HTTPException(504, f"no result within {timeout_s} s") from error
