"""The FastAPI application: ``uvicorn app.main:create_app --factory``, or the ``vit-serve`` command (app/cli.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import CapacityLimiter
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.batcher import DynamicBatcher
from app.config import Settings, get_settings
from app.drain import SigtermDrain
from app.inference import InferenceEngine, inference_thread
from app.metrics import RequestMetrics, ServiceMetrics
from app.routes import attention, demo, health, predict, v2
from app.routes import metrics as metrics_route
from app.state import ServiceState
from app.uploads import BodyTooLargeError
from model.checkpoint import CheckpointError, file_sha256, read_metadata
from model.cpu import cpu_quota
from model.vit import count_parameters

logger = logging.getLogger("app")


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413, counting while they stream in.

    A declared Content-Length is refused before reading; a chunked body is cut off as soon as it
    passes the limit, so an oversized upload never sits whole in memory.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLargeError(self.max_bytes)  # an HTTPException: FastAPI answers 413
            return message

        await self.app(scope, counting_receive, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": BodyTooLargeError(self.max_bytes).detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    executor = inference_thread()
    engine = await asyncio.get_running_loop().run_in_executor(executor, InferenceEngine, settings)
    metrics: ServiceMetrics = app.state.metrics
    batchers = {
        name: DynamicBatcher(
            run, settings.max_batch_size, settings.max_wait_ms, settings.queue_size, executor, name, metrics.observe_batch
        )
        for name, run in (("predict", engine.predict_batch), ("attention", engine.explain_batch))
    }
    for name, batcher in batchers.items():
        metrics.queue_depth.labels(name).set_function(lambda batcher=batcher: batcher.queue_depth)
    metrics.model.info({"name": engine.checkpoint.name, "sha256": app.state.checkpoint_sha256, "device": str(engine.device),
                        "parameters": str(count_parameters(engine.model)), "classes": str(len(engine.classes))})
    for batcher in batchers.values():
        batcher.start()
    limiter = CapacityLimiter(settings.decode_workers or cpu_quota())
    service = ServiceState(settings, engine, batchers["predict"], batchers["attention"], limiter, ready=True)
    app.state.service = service
    drain = SigtermDrain(service, settings.shutdown_grace_s)
    drain.install()
    logger.info("serving %s on %s", engine.checkpoint.name, engine.device)
    try:
        yield
    finally:
        service.ready = False
        drain.uninstall()
        for batcher in batchers.values():
            await batcher.stop()
        executor.shutdown(wait=True)


def verify_checkpoint(settings: Settings) -> str:
    """The checkpoint's sha256; fails with one message naming the file if it is unusable or not the expected one."""
    read_metadata(settings.checkpoint)
    digest = file_sha256(settings.checkpoint)
    if settings.checkpoint_sha256 and digest != settings.checkpoint_sha256.lower():
        raise CheckpointError(f"{settings.checkpoint}: sha256 differs from VIT_CHECKPOINT_SHA256={settings.checkpoint_sha256}")
    return digest


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app. An unusable checkpoint ends the process with status 1 and one line saying why."""
    settings = settings or get_settings()
    try:
        digest = verify_checkpoint(settings)  # the only read of the whole file besides loading it
    except CheckpointError as error:
        raise SystemExit(f"cannot start: {error}") from None
    app = FastAPI(
        title="ViT service",
        summary="Image classification and attention heatmaps from a Vision Transformer",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.checkpoint_sha256 = digest
    app.state.metrics = ServiceMetrics()
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    for module in (predict, attention, health, metrics_route, v2, demo):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=demo.STATIC_DIR), name="static")
    return app

