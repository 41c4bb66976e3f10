"""Response models: they document the HTTP contract in /openapi.json."""

from __future__ import annotations

from pydantic import BaseModel


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


class Status(BaseModel):
    status: str


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_wait_ms: float
    queue_size: int
    request_timeout_s: float
    stats: dict[str, dict]


class ModelInfo(BaseModel):
    name: str
    classes: list[str]
    config: dict
    parameters: int
    device: str
    preprocess: dict
    training: dict
    checkpoint_sha256: str
    batching: BatchingInfo
