from __future__ import annotations

from fastapi import APIRouter, Depends

from app.deps import ServiceDep, get_service, no_query_parameters
from app.schemas import BatchingInfo, ModelInfo, Status, error_responses

router = APIRouter(tags=["health"], dependencies=[Depends(no_query_parameters)], responses=error_responses(422))


@router.get("/health/live", response_model=Status)
async def live() -> Status:
    """The process is up and answering."""
    return Status(status="ok")


@router.get(
    "/health/ready",
    response_model=Status,
    responses=error_responses(503),
    dependencies=[Depends(get_service)],
)
async def ready() -> Status:
    """200 once the model is loaded and warmed up; 503 before that and while shutting down."""
    return Status(status="ready")


@router.get("/model", response_model=ModelInfo, responses=error_responses(503))
async def model_info(service: ServiceDep) -> ModelInfo:
    """What is served: the model, its preprocessing, and how requests are batched (with counts)."""
    settings = service.settings
    batching = BatchingInfo(
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        queue_size=settings.queue_size,
        request_timeout_s=settings.request_timeout_s,
        in_flight=service.in_flight,
        stats=await service.backend.stats(),
    )
    return ModelInfo(**service.model.description, checkpoint_sha256=service.checkpoint_sha256, batching=batching)
