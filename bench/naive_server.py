"""What a user would otherwise write: the tutorial FastAPI endpoint, one forward pass per request.

A sync endpoint (FastAPI runs it in its thread pool) that decodes the upload and runs the same
checkpoint on it alone. The speed bench serves it beside ours: ``uvicorn bench.naive_server:create_app --factory``.
"""

from __future__ import annotations

import io
import os

import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from model import DEFAULT_CHECKPOINT
from model.checkpoint import load_checkpoint
from model.preprocess import preprocess_image
from model.ranking import ranked_classes


def create_app() -> FastAPI:
    checkpoint = load_checkpoint(os.environ.get("VIT_CHECKPOINT", DEFAULT_CHECKPOINT))
    app = FastAPI(title="naive ViT endpoint")

    @app.get("/health/ready")
    def ready() -> dict:
        return {"status": "ready"}

    @app.post("/predict")
    def predict(file: UploadFile = File(...)) -> dict:  # noqa: B008 - the tutorial way, on purpose
        image = Image.open(io.BytesIO(file.file.read()))
        inputs = preprocess_image(image, checkpoint.preprocess).unsqueeze(0)
        with torch.no_grad():
            probabilities = checkpoint.model(inputs).softmax(dim=-1)
        [predictions] = ranked_classes(probabilities.tolist(), checkpoint.classes, 5)
        return {"model": checkpoint.name, "results": [{"filename": file.filename, "predictions": predictions}]}

    return app
