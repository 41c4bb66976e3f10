"""Response models: they document the HTTP contract in /openapi.json."""

from __future__ import annotations

from pydantic import BaseModel, Field


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
    torch_threads: int
    preprocess: dict
    training: dict
    checkpoint_sha256: str
    batching: BatchingInfo
