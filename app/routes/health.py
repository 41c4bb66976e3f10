from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from app.schemas import BatchingInfo, ModelInfo, Status
from app.state import ServiceState, get_state

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=Status)
async def live() -> Status:
    """The process is up and answering."""
    return Status(status="ok")


@router.get("/health/ready", response_model=Status, responses={503: {"description": "loading or shutting down"}})
async def ready(request: Request) -> Status:
    """200 once the model is loaded and warmed up; 503 before that and while shutting down."""
    await get_state(request)
    return Status(status="ready")


@router.get("/model", response_model=ModelInfo)
async def model_info(request: Request, state: Annotated[ServiceState, Depends(get_state)]) -> ModelInfo:
    """What is served: the model, its preprocessing, and how requests are batched (with counts)."""
    settings = state.settings
    batching = BatchingInfo(
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        queue_size=settings.queue_size,
        request_timeout_s=settings.request_timeout_s,
        in_flight=state.in_flight,
        stats={"predict": state.predict_batcher.stats(), "attention": state.attention_batcher.stats()},
    )
    return ModelInfo(**state.engine.describe(), checkpoint_sha256=request.app.state.checkpoint_sha256, batching=batching)
