from __future__ import annotations

import difflib
from pathlib import PureWindowsPath
from typing import Annotated, Literal
from urllib.parse import quote

import numpy as np
from anyio import to_thread
from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, Response, UploadFile
from PIL import Image
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from app.deps import AdmittedRoute, AdmittedServiceDep, one_value_each
from app.disconnect import while_connected
from app.errors import quoted
from app.heatmap import Colormap, Upsampling, encode_png, render_grid, render_heatmap, render_overlay
from app.schemas import UPLOAD_ERRORS, AttentionResponse, ClassRef, error_responses
from app.served import ExplainItem, Explanation, MapRequest
from app.service import ModelService
from app.uploads import DecodedUpload
from model.attention_methods import HeadFusion, Method
from model.images import PreprocessConfig, convert_mode, pixels_to_image, seen_region
from model.metadata import composed, some_of

router = APIRouter(tags=["explanations"], route_class=AdmittedRoute, dependencies=[Depends(one_value_each)])


def index_or_label(value: object) -> object:
    """`target=7` is an index and `target=Sneaker` a label (a class named "7" is asked for by its index); a query
    string's values all arrive as strings. A label is composed, as the model's class names are: a Mac's "Café",
    pasted from a file name, is decomposed."""
    if not isinstance(value, str):
        return value
    digits = value.removeprefix("-")
    return int(value) if digits.isascii() and digits.isdigit() else composed(value)


class AttentionQuery(BaseModel):
    """How to explain the image, and how to draw the explanation."""

    model_config = ConfigDict(extra="forbid")  # ?metod=gradient is a 422 naming `metod`, not a rollout

    method: Method = Field(
        "rollout",
        description="raw: one layer's class-token attention; last: the last layer's (DINO); rollout: attention "
        "rollout (Abnar & Zuidema 2020); gradient: class-specific gradient x attention (Chefer et al. 2021); "
        "threshold: the last-layer patches holding `mass` of the attention (DINO)",
    )
    layer: int | None = Field(
        None, description="raw: the layer (negative counts from the end; default: last); grid: show this layer's heads"
    )
    head: int | None = Field(None, ge=0, description="raw, last, threshold: one head instead of a fusion of all")
    head_fusion: HeadFusion = Field("mean", description="how the heads' maps become one: their mean, max or min")
    discard_ratio: float = Field(
        0.0, ge=0.0, lt=1.0, description="rollout: drop this share of the weakest patch-to-patch weights"
    )
    start_layer: int = Field(0, ge=0, description="rollout: the first layer rolled out")
    target: Annotated[int | str | None, BeforeValidator(index_or_label)] = Field(
        None, description="gradient: the class to explain, by index or label (default: the top-1)"
    )
    mass: float = Field(0.6, gt=0.0, le=1.0, description="threshold: the share of attention the kept patches hold")
    colormap: Colormap = Field("viridis", description="Matplotlib colormap of the heatmap")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="overlay opacity of the heatmap")
    upsample: Upsampling = Field(
        "bilinear", description="how the patch grid is enlarged to the picture: smooth, or in visible blocks"
    )
    size: Literal["original", "input"] = Field(
        "original", description="the uploaded image's size, or the model's input size"
    )
    view: Literal["overlay", "heatmap", "grid"] = Field(
        "overlay", description="grid: raw class-token attention, layers x heads, with method raw or none"
    )
    format: Literal["png", "json"] = Field("png", description="json: the patch-grid values instead of a picture")


# The map parameters each method reads (model.attention.attention_map); the grid view reads only `layer`.
METHOD_PARAMETERS = {
    "raw": {"layer", "head", "head_fusion"},
    "last": {"head", "head_fusion"},
    "rollout": {"head_fusion", "discard_ratio", "start_layer"},
    "gradient": {"target"},
    "threshold": {"head", "head_fusion", "mass"},
}
MAP_PARAMETERS = set().union(*METHOD_PARAMETERS.values())
DRAWING_PARAMETERS = {"colormap", "alpha", "upsample", "size"}


def unread_parameters(query: AttentionQuery) -> list[str]:
    """A sentence for each parameter given that the answer would not depend on."""
    given, problems = query.model_fields_set, []
    reads = {"layer"} if query.view == "grid" else METHOD_PARAMETERS[query.method]
    if ignored := sorted(given & MAP_PARAMETERS - reads):
        using = f"view {query.view}" if query.view == "grid" else f"method {query.method}"
        problems.append(f"{', '.join(ignored)} not used by {using}, which reads {', '.join(sorted(reads))}")
    if query.view == "grid" and query.method != "raw" and "method" in given:
        problems.append(f"method {query.method} not used by view grid, which shows each head's raw attention")
    if {"head", "head_fusion"} <= given & reads:
        problems.append("head and head_fusion both given: head shows one head, head_fusion fuses them all")
    if query.format == "json" and (ignored := sorted(given & DRAWING_PARAMETERS)):
        problems.append(f"{', '.join(ignored)} not used by format json, which gives the values undrawn")
    elif query.view == "heatmap" and "alpha" in given:
        problems.append("alpha not used by view heatmap, which draws the map alone, over no picture")
    return problems


def checked_against_model(query: AttentionQuery, service: ModelService) -> AttentionQuery:
    """The query with its target as a class index. Limits that depend on the served model, and parameters the
    answer would not depend on, are a 422 like any other bad parameter, rather than an answer that silently
    differs from what was asked."""
    model, classes = service.model, len(service.model.classes)
    problems = unread_parameters(query)
    if isinstance(query.target, str):
        if query.target in model.classes:
            query = query.model_copy(update={"target": model.classes.index(query.target)})
        else:
            meant = difflib.get_close_matches(query.target, model.classes, n=1, cutoff=0.6)
            problems.append(
                f"target {quoted(query.target)} is not a class of this model"
                + (f" (did you mean {meant[0]!r}?)" if meant else "")
                + f"; give an index in [0, {classes - 1}] or a label: {some_of(model.classes)}"
            )
    if query.layer is not None and not -model.depth <= query.layer < model.depth:
        problems.append(f"layer must be in [{-model.depth}, {model.depth - 1}]")
    if query.head is not None and query.head >= model.num_heads:
        problems.append(f"head must be in [0, {model.num_heads - 1}]")
    if query.start_layer >= model.depth:
        problems.append(f"start_layer must be in [0, {model.depth - 1}]")
    if isinstance(query.target, int) and not 0 <= query.target < classes:
        problems.append(f"target must be in [0, {classes - 1}], or a label")
    if problems:
        raise HTTPException(422, "; ".join(problems))
    return query


def map_request(query: AttentionQuery) -> MapRequest:
    return MapRequest(
        method=query.method,
        layer=query.layer,
        head=query.head,
        head_fusion=query.head_fusion,
        discard_ratio=query.discard_ratio,
        start_layer=query.start_layer,
        mass=query.mass,
        target=query.target,
        grid=query.view == "grid",
    )


def base_image(upload: DecodedUpload, query: AttentionQuery, preprocess: PreprocessConfig) -> Image.Image:
    if query.size == "input":  # what the model saw: converted and resized
        return convert_mode(pixels_to_image(upload.pixels), channels=3)
    picture = upload.display  # decoded for this request: upright, RGB, within VIT_MAX_RENDER_PIXELS
    if preprocess.crop_pct is None:
        return picture
    # the part the model saw, where its map belongs: a centre crop's map spread over the whole picture misplaced it
    left, top, right, bottom = seen_region(upload.size, preprocess)
    width, height = picture.size
    return picture.crop((round(left * width), round(top * height), round(right * width), round(bottom * height)))


def class_ref(index: int, explanation: Explanation, classes: list[str]) -> ClassRef:
    return ClassRef(index=index, label=classes[index], probability=explanation.probabilities[index])


def render(upload: DecodedUpload, explanation: Explanation, query: AttentionQuery, service: ModelService) -> Response:
    """Runs on a worker thread: Matplotlib and Pillow only (the maps were computed on the inference thread)."""
    values = explanation.values
    if query.format == "json":
        classes = service.model.classes
        method = "raw" if query.view == "grid" else query.method  # what the grid shows, whatever the default
        answer = AttentionResponse(
            model=service.model.name,
            filename=upload.filename,
            method=method,
            parameters=query.model_dump(exclude=DRAWING_PARAMETERS | {"format"}) | {"method": method},
            predicted=class_ref(int(np.argmax(explanation.probabilities)), explanation, classes),
            target=class_ref(explanation.target, explanation, classes),
            map=values.tolist(),
        )
        return Response(answer.model_dump_json(), media_type="application/json")
    base = base_image(upload, query, service.model.preprocess)
    if query.view == "grid":
        row_labels = [f"layer {layer}" for layer in explanation.layers]
        column_labels = [f"head {head}" for head in range(values.shape[1])]
        picture = render_grid(base, values, row_labels, column_labels, query.colormap, query.alpha, query.upsample)
    elif query.view == "heatmap":
        picture = render_heatmap(values, base.size, query.colormap, query.upsample)
    else:
        picture = render_overlay(base, values, query.colormap, query.alpha, query.upsample)
    return Response(
        encode_png(picture), media_type="image/png", headers={"Content-Disposition": disposition(upload, query)}
    )


def disposition(upload: DecodedUpload, query: AttentionQuery) -> str:
    """`inline` with a name for the PNG, `boot-rollout.png` for boot.jpg: `curl -OJ` and a browser's download
    named every heatmap `attention`. A name that is not plain ASCII goes as RFC 6266's `filename*`, as
    Starlette's FileResponse sends it, so that no upload's name can break the header."""
    stem = PureWindowsPath(upload.filename).stem or "image"  # the last part of a path, by / or by a backslash
    name = f"{stem}-{'grid' if query.view == 'grid' else query.method}.png"
    quoted_name = quote(name, safe="")
    return f'inline; filename="{name}"' if quoted_name == name else f"inline; filename*=utf-8''{quoted_name}"


class AttentionUpload(BaseModel):
    """multipart/form-data with one image."""

    model_config = ConfigDict(extra="forbid")  # -F method=raw is a 422 naming the part, not a rollout

    file: UploadFile = Field(description="the image to explain, in a part named 'file'")


@router.post(
    "/attention",
    response_class=Response,
    # "model" files AttentionResponse under the schema's components, where ReDoc resolves its references.
    responses={
        200: {"model": AttentionResponse, "content": {"image/png": {}}, "description": "a PNG, or with format=json"},
        **error_responses(*UPLOAD_ERRORS),
    },
)
async def attention(
    body: Annotated[AttentionUpload, File()],
    query: Annotated[AttentionQuery, Query()],
    service: AdmittedServiceDep,
    request: Request,
) -> Response:
    """An attention heatmap of the uploaded image: a PNG (overlay, bare heatmap or grid) or its values as JSON."""
    query = checked_against_model(query, service)
    if len((await request.form()).getlist("file")) > 1:
        raise HTTPException(422, "send one file to /attention (a part named 'file'); /predict takes several")
    display = query.size == "original" and query.format == "png"
    with service.answering():
        [upload] = await while_connected(request, service.decoder.decode_uploads([body.file], display))
        explanation = await while_connected(request, service.explain(ExplainItem(upload.pixels, map_request(query))))
        return await to_thread.run_sync(render, upload, explanation, query, service, limiter=service.render_limiter)
