"""What the lifespan builds and the routes use, reached through FastAPI dependencies."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import HTTPException, Request

from app.batcher import DynamicBatcher, QueueFullError
from app.config import Settings
from app.inference import InferenceEngine

RETRY_AFTER_S = 1


@dataclass
class ServiceState:
    settings: Settings
    engine: InferenceEngine
    predict_batcher: DynamicBatcher
    attention_batcher: DynamicBatcher
    ready: bool = field(default=False)


def get_state(request: Request) -> ServiceState:
    state: ServiceState | None = getattr(request.app.state, "service", None)
    if state is None or not state.ready:
        raise HTTPException(503, "the model is not ready", headers={"Retry-After": str(RETRY_AFTER_S)})
    return state


async def run_batched(batcher: DynamicBatcher, tensor: torch.Tensor, timeout_s: float) -> Any:
    """Submit one input and translate the batcher's failures into HTTP statuses."""
    try:
        return await batcher.submit(tensor, timeout_s)
    except QueueFullError as error:
        raise HTTPException(503, f"overloaded: {error}", headers={"Retry-After": str(RETRY_AFTER_S)}) from error
    except asyncio.TimeoutError as error:
        raise HTTPException(504, f"no result within {timeout_s} s") from error
