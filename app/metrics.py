"""Prometheus metrics: requests by route and status, latency, queue and compute time, batch sizes."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """One registry per app, so that several apps in one process (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("vit_requests", "HTTP requests by route, method and status", ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("vit_request_duration_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_time = Histogram("vit_queue_seconds", "time from enqueue to the start of its batch", ["batcher"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.compute_time = Histogram("vit_compute_seconds", "time to run one batch", ["batcher"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("vit_batch_size", "images per batch", ["batcher"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("vit_queue_depth", "images waiting in the batcher queue", ["batcher"], registry=self.registry)
        self.model = Info("vit_model", "the served model", registry=self.registry)

    def observe_batch(self, batcher: str, size: int, queue_seconds: list[float], compute_seconds: float) -> None:
        self.batch_size.labels(batcher).observe(size)
        self.compute_time.labels(batcher).observe(compute_seconds)
        for seconds in queue_seconds:
            self.queue_time.labels(batcher).observe(seconds)


class RequestMetrics:
    """ASGI middleware: count every HTTP request by its route template and status, and time it."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app raises before answering, the server answers 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the template, so labels stay few
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
