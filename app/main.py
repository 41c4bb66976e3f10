"""The FastAPI application: ``uvicorn app.main:create_app --factory``, or the ``vit-serve`` command (app/cli.py)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from fastapi.telemetry import TelemetryConfig
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.config import STARTUP_FAILURE

from app.config import Settings, get_settings, settings_problems, unknown_variables
from app.drain import SigtermDrain
from app.errors import answer_http_error, answer_validation_error
from app.heap import frozen_heap
from app.http_protocol import STATE_KEY
from app.logs import share_uvicorns_handler
from app.metrics import HttpMetrics, multiprocess
from app.middleware import BodyLimits, RequestId, RequestMetrics, RoutedAlike, StartupFailures
from app.open_files import few_open_files, raise_open_files_limit
from app.open_inference import HEADER_LENGTH
from app.routes import attention, demo, health, open_inference, predict
from app.routes import metrics as metrics_route
from app.service import ModelService, verify_checkpoint
from model.metadata import CheckpointError

logger = logging.getLogger("app")
TELEMETRY_OFF: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict]:
    settings: Settings = app.state.settings
    grpc_server = None
    if settings.grpc_port:  # an optional dependency, imported only when asked for; bound before the model loads
        from app.open_inference_grpc import bind_grpc, grpc_address

        grpc_server = bind_grpc(app, settings)
    service = await ModelService.start(settings, app.state.checkpoint_sha256)
    app.state.metrics.describe_model(service.model.description, service.checkpoint_sha256)
    app.state.service = service
    drain = SigtermDrain(service, settings.shutdown_grace_s)
    drain.install()
    logger.info(
        "serving %s from %s (sha256 %s) on %s in %s, %d worker%s",
        service.model.name,
        settings.checkpoint,
        service.checkpoint_sha256,
        service.model.description["device"],
        settings.precision if settings.quantize == "none" else f"{settings.precision} with int8 linear layers",
        settings.workers or 1,
        "" if settings.workers in (0, 1) else "s",
    )
    if service.model.description["training"].get("imported_from", {}).get("head") == "new":
        logger.warning(
            "%s has a head that no one trained (vit-import of weights without one): its answers are chance; "
            "fine-tune it with vit-train --init-from first",
            service.model.name,
        )
    try:
        if grpc_server is not None:
            await grpc_server.start()
            logger.info("serving the Open Inference Protocol over gRPC on %s", grpc_address(settings))
        with frozen_heap():
            yield {STATE_KEY: app.state.metrics}  # for the requests the HTTP protocol answers (app/http_protocol.py)
    finally:
        drain.uninstall()
        if grpc_server is not None:  # the drain has waited for its calls in flight too
            await grpc_server.stop(grace=1.0)
        await service.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app. An unusable checkpoint ends the process with one line saying why and uvicorn's start-up failure code."""
    try:
        settings = settings or get_settings()
        digest = verify_checkpoint(settings)
    except (ValidationError, CheckpointError) as error:
        problems = settings_problems(error) if isinstance(error, ValidationError) else [str(error)]
        print("\n".join(f"cannot start: {problem}" for problem in problems), file=sys.stderr)
        # uvicorn's status for a failed start: its supervisor stops instead of restarting the worker forever.
        raise SystemExit(STARTUP_FAILURE) from None
    share_uvicorns_handler()
    if warning := few_open_files(raise_open_files_limit()):
        logger.warning(warning)
    for line in unknown_variables(os.environ).values():  # under plain uvicorn; vit-serve named them already
        logger.warning(line)
    if settings.workers > 1 and not multiprocess():  # plain uvicorn's workers; vit-serve gives them the directory
        logger.warning(
            "one of %d processes (WEB_CONCURRENCY), each with its own metrics: /metrics and the v2 statistics count "
            "only the process that answers; serve with vit-serve, which sums them, or set PROMETHEUS_MULTIPROC_DIR to "
            "an empty folder",
            settings.workers,
        )
    # Swagger UI and ReDoc from the files that fastapi-offline ships, not from a CDN: /docs works offline.
    app = FastAPIOffline(
        title="ViT service",
        summary="Image classification and attention heatmaps from a Vision Transformer",
        version="0.1.0",
        lifespan=lifespan,
        redirect_slashes=False,  # RoutedAlike answers instead
        # Unless asked for, FastAPI's telemetry is off: it looks for a configured provider at every request.
        telemetry=None if settings.opentelemetry else TELEMETRY_OFF,
    )
    app.state.settings = settings
    app.state.checkpoint_sha256 = digest
    app.state.metrics = HttpMetrics()
    app.add_exception_handler(StarletteHTTPException, answer_http_error)
    app.add_exception_handler(RequestValidationError, answer_validation_error)
    app.add_middleware(StartupFailures)  # the lifespan's alone: requests pass through it untouched
    app.add_middleware(BodyLimits, max_bytes=settings.max_upload_bytes, timeout_s=settings.receive_timeout_s)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    app.add_middleware(RoutedAlike)  # the others see the path and method that are routed
    if settings.cors_origins:  # off by default: a browser page from another origin cannot call the API
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", HEADER_LENGTH],
            expose_headers=["X-Request-ID", "Retry-After"],
            max_age=600,
        )
    app.add_middleware(RequestId)  # the outermost: every answer made above, preflights and 413s too, has one
    for module in (predict, attention, health, metrics_route, open_inference, demo):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=demo.STATIC_DIR), name="static")
    open_inference.document(app)
    return app
