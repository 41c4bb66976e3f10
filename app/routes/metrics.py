from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import running_service

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics: this process's requests and latency, the model, and its batchers (queue and compute
    time, batch sizes), which the model process reports when vit-serve runs one."""
    exposition = generate_latest(request.app.state.metrics.registry)
    service = running_service(request)
    if service is not None:
        exposition += await service.backend.metrics()
    return Response(exposition, media_type=CONTENT_TYPE_LATEST)
