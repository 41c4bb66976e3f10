"""Open Inference Protocol (KServe v2) REST endpoints, so Triton's and KServe's clients work unchanged.

The model takes either input: `image` (BYTES, encoded images) or `pixels` (FP32 [N, C, H, W],
preprocessed as the checkpoint says), and answers `probabilities` (FP32 [N, classes]). Each image
goes through the same batcher as /predict.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Header, HTTPException, Path, Request, Response
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema

from app.deps import AdmittedServiceDep, ServiceDep, running_service
from app.disconnect import while_connected
from app.errors import PROTOCOL_PREFIX
from app.open_inference import (
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    ProtocolError,
    build_outputs,
    encode_response,
    parse_infer_request,
    plan_outputs,
)
from app.open_inference_service import check_model, model_configuration, probabilities_for, served_statistics
from app.open_inference_service import model_metadata as served_model_metadata
from app.open_inference_service import server_metadata as protocol_server_metadata
from app.schemas import error_responses


class ProtocolRoute(APIRoute):
    """A ProtocolError, which the protocol's parsing raises without knowing HTTP, answered as the HTTPException
    that app/errors.py shapes like every other under this prefix, as `{"error": "..."}`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ProtocolError as error:
                raise HTTPException(error.status, str(error)) from None

        return handle


ModelName = Annotated[str, Path(description="the served model's name, as GET /model and GET /v2/models/NAME give it")]
router = APIRouter(prefix=PROTOCOL_PREFIX, tags=["open inference protocol"], route_class=ProtocolRoute)


# Triton's extensions beyond the protocol that are not served, which its clients call (tritonclient's
# get_log_settings, load_model): each path, and what it is.
TRITON_EXTENSIONS = {
    "/models/{model_name}/trace/setting": "trace",
    "/trace/setting": "trace",
    "/logging": "logging",
    "/repository/{rest:path}": "model repository",
    "/systemsharedmemory{rest:path}": "shared-memory",
    "/cudasharedmemory{rest:path}": "shared-memory",
}


def extension_not_served(extension: str) -> Callable[[], Coroutine[Any, Any, Response]]:
    """The route of one of them: 404 that names the extension, where tritonclient said only `[404] Not Found`."""

    async def not_served() -> Response:
        raise HTTPException(
            404,
            f"Triton's {extension} extension is not served here; this server answers the Open Inference Protocol's "
            "health, model metadata (GET /v2/models/NAME) and infer routes, and Triton's model configuration and "
            "statistics",
        )

    return not_served


for _path, _extension in TRITON_EXTENSIONS.items():
    router.add_api_route(_path, extension_not_served(_extension), methods=["GET", "POST"], include_in_schema=False)


# Declared before the model's routes, which would take `stats` in /v2/models/stats for a model's name.
@router.get("/models/stats", responses=error_responses(503, v2=True))
async def all_statistics(request: Request, service: ServiceDep) -> dict:
    """Triton's statistics of every model served: the one model's."""
    return await served_statistics(request.app.state.metrics, service)


@router.get("/models/{model_name}/stats", responses=error_responses(404, 503, v2=True))
@router.get("/models/{model_name}/versions/{version}/stats", responses=error_responses(404, 503, v2=True))
async def statistics(request: Request, model_name: ModelName, service: ServiceDep, version: str | None = None) -> dict:
    """Triton's statistics of the served model (app.open_inference.model_statistics says what each counts), which
    perf_analyzer reads before and after each measurement, for the server's share of the latency it measured."""
    check_model(service, model_name, version)
    return await all_statistics(request, service)


@router.get("")
async def server_metadata(request: Request) -> dict:
    return protocol_server_metadata(request.app.version)


@router.get("/health/live", response_class=Response)
async def server_live() -> Response:
    """200 with an empty body: the protocol says the status is the answer."""
    return Response(status_code=200)


@router.get(
    "/health/ready", response_class=Response, responses={400: {"description": "not ready (the protocol's false)"}}
)
async def server_ready(request: Request) -> Response:
    return Response(status_code=200 if running_service(request) else 400)  # the protocol's "false" is a 4xx


@router.get("/models/{model_name}", responses=error_responses(404, 503, v2=True))
@router.get("/models/{model_name}/versions/{version}", responses=error_responses(404, 503, v2=True))
async def model_metadata(model_name: ModelName, service: ServiceDep, version: str | None = None) -> dict:
    check_model(service, model_name, version)
    return served_model_metadata(service)


@router.get("/models/{model_name}/config", responses=error_responses(404, 503, v2=True))
@router.get("/models/{model_name}/versions/{version}/config", responses=error_responses(404, 503, v2=True))
async def model_config(model_name: ModelName, service: ServiceDep, version: str | None = None) -> dict:
    """Triton's model configuration of the served model, which perf_analyzer reads before it sends a request
    (it stopped at `failed to get model config`), and tritonclient's get_model_config returns."""
    check_model(service, model_name, version)
    return model_configuration(service)


@router.get(
    "/models/{model_name}/ready",
    responses={400: {"description": "not ready (the protocol's false)"}} | error_responses(404, v2=True),
)
@router.get(
    "/models/{model_name}/versions/{version}/ready",
    responses={400: {"description": "not ready (the protocol's false)"}} | error_responses(404, v2=True),
)
async def model_ready(model_name: ModelName, request: Request, version: str | None = None) -> Response:
    service = running_service(request)
    if service is None:
        return Response(status_code=400)
    check_model(service, model_name, version)
    return Response(status_code=200)


# The infer routes read their body themselves (JSON, or JSON then raw bytes with the binary extension), so
# the schema names it here; `document` files InferRequest under the schema's components.
INFER_DOCUMENTATION = {
    "responses": {
        200: {
            "model": InferResponse,
            "description": "JSON, or with binary outputs a JSON header, then the bytes",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        **error_responses(400, 401, 404, 408, 413, 415, 500, 503, 504, v2=True),
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": f"the binary tensor data extension: InferRequest's JSON ({HEADER_LENGTH} bytes), "
                    "then each input's bytes",
                },
            },
        }
    },
}


def document(app: FastAPI) -> None:
    """Finish the app's OpenAPI schema for these routes: InferRequest, which the infer routes parse themselves,
    goes under its components; and the 422 that FastAPI lists for any route with parameters goes, since
    these routes' parameters are plain strings that cannot fail validation."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            _, definitions = models_json_schema(
                [(InferRequest, "validation")], ref_template="#/components/schemas/{model}"
            )
            schema["components"]["schemas"].update(definitions["$defs"])
            for path, operations in schema["paths"].items():
                for operation in operations.values() if path.startswith(router.prefix) else ():
                    operation["responses"].pop("422", None)
        return app.openapi_schema

    app.openapi = openapi


@router.post("/models/{model_name}/infer", **INFER_DOCUMENTATION)
@router.post("/models/{model_name}/versions/{version}/infer", **INFER_DOCUMENTATION)
async def infer(
    model_name: ModelName,
    request: Request,
    service: AdmittedServiceDep,
    version: str | None = None,
    header_length: Annotated[
        str | None,
        Header(
            alias=HEADER_LENGTH,
            description="binary tensor data extension: the length of the JSON part, which raw tensor bytes follow",
        ),
    ] = None,
) -> Response:
    """Class probabilities for a batch of images; `classification: K` on the output gives the top K as labels."""
    check_model(service, model_name, version)
    if request.headers.get("content-encoding", "identity") != "identity":
        raise HTTPException(
            415, f"Content-Encoding {request.headers['content-encoding']!r} is not accepted; send the body uncompressed"
        )
    with service.answering(), request.app.state.metrics.timing_infer():  # for Triton's statistics
        infer_request, inputs = parse_infer_request(await request.body(), header_length)
        plans = plan_outputs(infer_request, len(service.model.classes))
        probabilities = await while_connected(request, probabilities_for(service, inputs))
        outputs = build_outputs(plans, probabilities, service.model.classes)
        body, headers = encode_response(service.model.name, infer_request.id, outputs)
    return Response(body, headers=headers)
