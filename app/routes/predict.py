from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from app.deps import AdmittedRoute, AdmittedServiceDep, one_value_each
from app.disconnect import while_connected
from app.schemas import UPLOAD_ERRORS, PredictResponse, error_responses
from app.service import ModelService
from app.uploads import DecodedUpload
from model.ranking import DEFAULT_TOP_K, default_top_k, ranked_classes

router = APIRouter(tags=["inference"], route_class=AdmittedRoute, dependencies=[Depends(one_value_each)])


class PredictQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")  # ?topk=3 is a 422 naming `topk`, not five classes

    top_k: int | None = Field(
        None,
        ge=1,
        le=1000,
        description=f"how many classes to return per image (default: {DEFAULT_TOP_K}, or all of a smaller model's)",
    )


class PredictUpload(BaseModel):
    """multipart/form-data with one or more images."""

    model_config = ConfigDict(extra="forbid")  # -F top_k=2 is a 422 naming the part, not five classes

    file: list[UploadFile] = Field(description="one or more images, each in a part named 'file'")


@router.post("/predict", response_model=PredictResponse, responses=error_responses(*UPLOAD_ERRORS))
async def predict(
    body: Annotated[PredictUpload, File()],
    query: Annotated[PredictQuery, Query()],
    service: AdmittedServiceDep,
    request: Request,
) -> dict:
    """Classify each uploaded image; results come back in upload order."""
    classes = service.model.classes
    top_k = default_top_k(len(classes)) if query.top_k is None else query.top_k
    if top_k > len(classes):
        raise HTTPException(422, f"top_k must be at most {len(classes)}, the number of classes")
    if len(body.file) > service.settings.max_files:
        raise HTTPException(413, f"{len(body.file)} files sent; at most {service.settings.max_files} per request")
    with service.answering():
        decoded, rows = await while_connected(request, _classify(service, body.file))
    ranked = ranked_classes(rows, classes, top_k)
    # A dict, which FastAPI validates against PredictResponse and serialises in one pass of pydantic-core:
    # building the models here first costs a Python call per prediction, and FastAPI would check them again.
    return {
        "model": service.model.name,
        "results": [
            {"filename": upload.filename, "predictions": predictions}
            for upload, predictions in zip(decoded, ranked, strict=True)
        ],
    }


async def _classify(service: ModelService, files: list[UploadFile]) -> tuple[list[DecodedUpload], list[list[float]]]:
    decoded = await service.decoder.decode_uploads(files)
    return decoded, await service.predict([upload.pixels for upload in decoded])
