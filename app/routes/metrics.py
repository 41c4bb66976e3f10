from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.deps import no_query_parameters, running_service
from app.metrics import scrape
from app.schemas import error_responses

router = APIRouter(tags=["health"], dependencies=[Depends(no_query_parameters)], responses=error_responses(422))


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests and latency, the model, and its batchers (queue and compute time, batch
    sizes); under vit-serve with several processes, the sum over all of them."""
    exposition = await scrape(request.app.state.metrics, running_service(request))
    return Response(exposition, media_type=CONTENT_TYPE_LATEST)
