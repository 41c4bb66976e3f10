"""What the lifespan builds and the routes use, reached through FastAPI dependencies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from anyio import CapacityLimiter
from fastapi import HTTPException, Request, UploadFile

from app.batcher import DynamicBatcher, QueueFullError
from app.config import Settings
from app.inference import InferenceEngine
from app.uploads import DecodedUpload, check_content_type, decode_bytes

RETRY_AFTER_S = 1
T = TypeVar("T")


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
        check_content_type(upload)
        return await self.decode_bytes(await upload.read(), upload.filename or "upload")

    async def decode_bytes(self, data: bytes, filename: str) -> DecodedUpload:
        settings = self.settings
        return await decode_bytes(
            data,
            filename,
            settings.max_image_pixels,
            settings.max_aspect_ratio,
            self.engine.checkpoint.preprocess,
            self.decode_limiter,
            settings.inline_decode_pixels,
        )


def served_state(request: Request) -> ServiceState | None:
    """The service if it is loaded and not shutting down, else None."""
    state: ServiceState | None = getattr(request.app.state, "service", None)
    return state if state is not None and state.ready else None


async def get_state(request: Request) -> ServiceState:
    """The loaded service, or 503. Async on purpose: FastAPI runs a sync dependency on a worker thread."""
    state = served_state(request)
    if state is None:
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
    except TimeoutError as error:
        raise HTTPException(504, f"no result within {timeout_s} s") from error


CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer


async def _wait_for_disconnect(request: Request) -> None:
    """The body is already read, so the next ASGI message is the disconnect (or the end of the response)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it, so queued items are dropped before they run."""
    task = asyncio.current_task()
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    watcher.add_done_callback(lambda done: None if done.cancelled() else task.cancel())
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():  # cancelled by the disconnect, not by the server
            task.uncancel()
            raise HTTPException(CLIENT_CLOSED_REQUEST, "the client closed the connection") from None
        raise
    finally:
        watcher.cancel()


async def predict_all(request: Request, state: ServiceState, inputs: list[Any]) -> list[list[float]]:
    """Class probabilities for each input, all queued on the /predict batcher at once, dropped if the client leaves."""
    timeout = state.settings.request_timeout_s
    return await while_connected(request, asyncio.gather(*(run_batched(state.predict_batcher, item, timeout) for item in inputs)))
