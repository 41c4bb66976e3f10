from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from app.heatmap import render_overlay
from app.inference import AttentionRow
from app.state import ServiceState, get_state, run_batched
from app.uploads import DecodedUpload, decode_upload
from model.attention import METHODS

router = APIRouter(tags=["explanations"])

Method = Literal["rollout", "last"]
Colormap = Literal["viridis", "inferno", "magma", "plasma", "cividis", "jet", "gray"]


def render(upload: DecodedUpload, row: AttentionRow, method: Method, colormap: Colormap, alpha: float) -> bytes:
    """Runs on a worker thread: the map is a torch computation, the overlay a Matplotlib one."""
    attention_map = METHODS[method](row.attentions.unsqueeze(1))[0]  # (layers, 1, heads, N, N) -> (grid, grid)
    return render_overlay(upload.image, np.asarray(attention_map), colormap, alpha)


@router.post("/attention", response_class=Response, responses={200: {"content": {"image/png": {}}}})
async def attention(
    file: Annotated[UploadFile, File(description="the image to explain")],
    state: Annotated[ServiceState, Depends(get_state)],
    method: Annotated[Method, Query(description="rollout (Abnar & Zuidema 2020) or last (last layer, class token)")] = "rollout",
    colormap: Annotated[Colormap, Query()] = "viridis",
    alpha: Annotated[float, Query(ge=0.0, le=1.0, description="heatmap opacity over the image")] = 0.5,
) -> Response:
    """A PNG of the attention map over the uploaded image, at the image's own size."""
    upload = await decode_upload(file, state.settings.max_image_pixels, state.engine.checkpoint.preprocess)
    row = await run_batched(state.attention_batcher, upload.tensor, state.settings.request_timeout_s)
    png = await run_in_threadpool(render, upload, row, method, colormap, alpha)
    return Response(png, media_type="image/png")
