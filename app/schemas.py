"""Response models, and the error model with each status's meaning and example: they document the HTTP
contract in /openapi.json."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.config import Precision, Quantization


class Prediction(BaseModel):
    label: str
    index: int
    probability: float


class FileResult(BaseModel):
    filename: str
    predictions: list[Prediction]


class PredictResponse(BaseModel):
    model: str
    results: list[FileResult]


class ClassRef(BaseModel):
    index: int
    label: str
    probability: float


class AttentionResponse(BaseModel):
    model: str
    filename: str
    method: str
    parameters: dict
    predicted: ClassRef
    target: ClassRef
    map: list = Field(description="patch-grid values: (grid, grid), or (layers, heads, grid, grid) for view=grid")


class Status(BaseModel):
    status: str


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_wait_ms: float
    queue_size: int
    request_timeout_s: float
    in_flight: int = Field(description="inference requests accepted and not yet answered")
    stats: dict[str, dict]


class ModelInfo(BaseModel):
    name: str
    classes: list[str]
    config: dict
    parameters: int
    device: str
    precision: Precision = Field(description="the arithmetic of the forward pass (VIT_PRECISION)")
    quantize: Quantization = Field(description="int8: the linear layers run dynamically quantized")
    torch_threads: int
    preprocess: dict
    training: dict
    checkpoint_sha256: str
    batching: BatchingInfo


class ErrorResponse(BaseModel):
    """Every error but v2's: one sentence that says what was wrong (app/errors.py)."""

    detail: str = Field(description="what was wrong: the file, parameter or limit, and what to send instead")


class V2ErrorResponse(BaseModel):
    """An error of the Open Inference Protocol routes, in the protocol's shape."""

    error: str


# status -> (when it is answered, an example of its sentence)
ERRORS: dict[int, tuple[str, str]] = {
    400: (
        "not an image, corrupt, truncated, or an extreme aspect ratio",
        "boot.png: not an image in a format we can read",
    ),
    401: (
        "VIT_API_KEY is set, and the request has no or a wrong key",
        "no API key: this server needs the header 'Authorization: Bearer <key>'",
    ),
    404: ("no such model or version", "unknown model 'resnet'; this server serves 'vit-tiny-fashion-mnist'"),
    408: (
        "the request's headers or body did not arrive within VIT_RECEIVE_TIMEOUT_S; the connection is closed",
        "the request body did not arrive within 60 s of its headers",
    ),
    413: (
        "the body, the files, an image's pixels or its decoding time over a limit",
        "request body is larger than the limit of 10485760 bytes",
    ),
    415: (
        "a body not multipart, a part of a non-image content type, an image format or mode (LAB) not served",
        "notes.txt: unsupported content type 'text/plain'; send an image",
    ),
    422: (
        "a parameter out of range, unknown, or unused by the method; no part named 'file'",
        "query parameter 'top_k': Input should be greater than or equal to 1, not '0'",
    ),
    500: ("the batch this request ran in failed (logged)", "inference failed: CUDA out of memory"),
    503: (
        "the queue is full, the model is not ready, or the server is draining",
        "predict queue is full (256 waiting)",
    ),
    504: ("no result within VIT_REQUEST_TIMEOUT_S", "no result within 10.0 s"),
    507: ("no space left to store the upload", "the server has no space left to receive the upload; try again later"),
}
RETRY_AFTER = {"Retry-After": {"description": "seconds after which to try again", "schema": {"type": "integer"}}}


def error_responses(*statuses: int, v2: bool = False) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route that can answer `statuses`: the error model, when, and an example."""
    model, key = (V2ErrorResponse, "error") if v2 else (ErrorResponse, "detail")
    return {
        status: {
            "model": model,
            "description": ERRORS[status][0],
            "content": {"application/json": {"example": {key: ERRORS[status][1]}}},
            **({"headers": RETRY_AFTER} if status in (503, 507) else {}),
        }
        for status in statuses
    }


UPLOAD_ERRORS = (400, 401, 408, 413, 415, 422, 500, 503, 504, 507)  # what /predict and /attention can answer
