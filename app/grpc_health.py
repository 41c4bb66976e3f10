"""gRPC's health checking protocol (`grpc.health.v1.Health`) on VIT_GRPC_PORT, beside the Open Inference Protocol:
what Kubernetes' `grpc:` probes, grpc_health_probe and Envoy's gRPC health checks ask.

The status is /health/ready's: SERVING once the model is loaded and warmed up (the port answers nothing before),
NOT_SERVING from the moment SIGTERM starts the drain, and once its model process has died; for the server as a
whole (the empty name) and for each service served beside it by name (`inference.GRPCInferenceService`). Any
other name is NOT_FOUND to Check and SERVICE_UNKNOWN to Watch, as the protocol says. The status is read from the
service when asked, not kept beside it, so it cannot go stale.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from fastapi import FastAPI
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from app.deps import service_of

SERVICE_NAME = health.SERVICE_NAME
WATCH_POLL_S = 0.25  # how soon a Watch hears of a change: readiness is read, nothing announces it
Status = health_pb2.HealthCheckResponse.ServingStatus


class ServingHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, app: FastAPI, services: tuple[str, ...]) -> None:
        self.app = app
        self.services = ("", *services)  # "": the server

    def status(self, service: str) -> Status:
        if service not in self.services:
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        ready = service_of(self.app.state) is not None
        return health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        status = self.status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no service {request.service!r} here: ask for '' (the server) or "
                + " or ".join(repr(name) for name in self.services[1:]),
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        """The status now, then each change, until the client leaves or the server stops."""
        sent = None
        while True:
            if (status := self.status(request.service)) != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            await asyncio.sleep(WATCH_POLL_S)


def add_health(app: FastAPI, server: grpc.aio.Server, services: tuple[str, ...]) -> None:
    """The health service on `server`, which serves `services`: each is SERVING while the model is."""
    health_pb2_grpc.add_HealthServicer_to_server(ServingHealth(app, services), server)
