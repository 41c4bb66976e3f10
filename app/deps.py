"""FastAPI dependencies: the running service (or 503), and admission of inference requests for the drain."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from app.service import ModelService, unavailable


def running_service(request: Request) -> ModelService | None:
    """The service if it is loaded and not shutting down, else None."""
    service: ModelService | None = getattr(request.app.state, "service", None)
    return service if service is not None and service.ready and service.backend.alive else None


async def get_service(request: Request) -> ModelService:
    """The running service, or 503. Async on purpose: FastAPI runs a sync dependency on a worker thread."""
    service = running_service(request)
    if service is None:
        raise unavailable("the model is not ready, or the server is shutting down")
    return service


async def admit(request: Request) -> AsyncIterator[ModelService]:
    """The service for an inference request, counted in flight until its answer is ready (the drain waits for it)."""
    service = await get_service(request)
    service.in_flight += 1
    try:
        yield service
    finally:
        service.in_flight -= 1


ServiceDep = Annotated[ModelService, Depends(get_service)]
AdmittedServiceDep = Annotated[ModelService, Depends(admit)]
