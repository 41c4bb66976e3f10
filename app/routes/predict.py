from __future__ import annotations

import heapq
from typing import Annotated

from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile

from app.schemas import FileResult, Prediction, PredictResponse
from app.state import ServiceState, accept_request, predict_all

router = APIRouter(tags=["inference"])


def top_predictions(probabilities: list[float], classes: list[str], top_k: int) -> list[Prediction]:
    best = heapq.nlargest(top_k, range(len(probabilities)), key=probabilities.__getitem__)
    return [Prediction(label=classes[i], index=i, probability=probabilities[i]) for i in best]


@router.post("/predict", response_model=PredictResponse)
async def predict(
    file: Annotated[list[UploadFile], File(description="one or more images, each in a part named 'file'")],
    state: Annotated[ServiceState, Depends(accept_request)],
    request: Request,
    top_k: Annotated[int, Query(ge=1, le=1000, description="how many classes to return per image")] = 5,
) -> PredictResponse:
    """Classify each uploaded image; results come back in upload order."""
    classes = state.engine.classes
    if top_k > len(classes):
        raise HTTPException(422, f"top_k must be at most {len(classes)}, the number of classes")
    if len(file) > state.settings.max_files:
        raise HTTPException(413, f"{len(file)} files sent; at most {state.settings.max_files} per request")
    decoded = [await state.decode(upload) for upload in file]
    rows = await predict_all(request, state, [item.pixels for item in decoded])
    return PredictResponse(
        model=state.engine.checkpoint.name,
        results=[
            FileResult(filename=item.filename, predictions=top_predictions(row, classes, top_k))
            for item, row in zip(decoded, rows)
        ],
    )
