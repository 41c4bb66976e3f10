"""Prometheus metrics: the HTTP side of each process, and the batchers wherever they run.

`HttpMetrics` counts and times requests in each process that answers HTTP, and its gRPC calls. `BatchMetrics` lives
beside the batchers: in the same process, or in the model process when front ends feed one.

When vit-serve runs several processes, it gives them one fresh PROMETHEUS_MULTIPROC_DIR: each
process writes its counters and histograms there, and a scrape, whichever process answers it, sums
them all (prometheus-client's multiprocess mode). Two scrapes in a row then never go backwards.
The Open Inference Protocol's statistics (app/open_inference.py) are read from such a scrape.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    Summary,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from app.config import METRICS_DIRECTORY_VARIABLE

if TYPE_CHECKING:
    from app.service import ModelService

# Each counter and histogram also had a `_created` series, its creation time, which Prometheus's text format
# exposes as one more gauge per label set: twice the series to store, none of them of use. A scrape of several
# processes (multiprocess mode) never had them, so one process's scrape now names what theirs names.
disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def multiprocess() -> bool:
    """Whether this process is one of several that write to a shared metrics directory."""
    return bool(os.environ.get(METRICS_DIRECTORY_VARIABLE))


class HttpMetrics:
    """One registry per app, so that several apps in one process (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vit_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "vit_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.grpc_requests = Counter(  # the gRPC service's (app/open_inference_grpc.py), beside HTTP's
            "vit_grpc_requests",
            "gRPC calls by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.grpc_latency = Histogram(
            "vit_grpc_request_duration_seconds",
            "gRPC call latency, from the call's start to its last message",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.infer = Summary(  # a count and a sum, as Triton's statistics report them (app/open_inference.py)
            "vit_infer_seconds",
            "Open Inference Protocol infer requests for the served model, by outcome: from the route's start to "
            "its answer",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("success", "fail"):
            self.infer.labels(outcome)
        self.last_inference = Gauge(
            "vit_last_inference_timestamp_seconds",
            "when the last infer request for the served model arrived (Unix time)",
            multiprocess_mode="max",
            registry=self.registry,
        )
        self.info_registry = CollectorRegistry()  # an Info is not shared between processes: each has its own
        self.model = Info("vit_model", "the served model", registry=self.info_registry)

    def count_refused(self, status: int) -> None:
        """A request that the HTTP protocol answered before the app had it (app/http_protocol.py: 408, 431),
        under the labels of a request that no route matched, its method unread."""
        self.requests.labels("unmatched", "unknown", str(status)).inc()

    @contextmanager
    def timing_infer(self) -> Iterator[None]:
        """Time one infer request: a `fail` if it raises, a `success` if not."""
        self.last_inference.set(time.time())
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            self.infer.labels("fail").observe(time.perf_counter() - started)
            raise
        self.infer.labels("success").observe(time.perf_counter() - started)

    def describe_model(self, description: dict, sha256: str) -> None:
        labels = {"name": description["name"], "sha256": sha256, "device": description["device"]}
        self.model.info(
            labels | {"parameters": str(description["parameters"]), "classes": str(len(description["classes"]))}
        )

    def exposition(self) -> bytes:
        """The model's info, and this process's requests, or every process's where there are several."""
        if multiprocess():
            every_process = CollectorRegistry()
            MultiProcessCollector(every_process)
            return generate_latest(self.info_registry) + generate_latest(every_process)
        return generate_latest(self.info_registry) + generate_latest(self.registry)


class BatchMetrics:
    """What the batchers report (app.batcher.BatchObserver): batch sizes, queue and compute times, requests
    dropped, failed batches, and the queue depth after each batch."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["batcher"]
        self.batch_size = Histogram(
            "vit_batch_size", "images per batch", labels, buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queue_time = Histogram(
            "vit_queue_seconds",
            "time from enqueue to the start of its batch",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_time = Histogram(
            "vit_compute_seconds", "time to run one batch", labels, buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.image_compute_time = Summary(
            "vit_image_compute_seconds",
            "for each image, the time its batch took to run (vit_compute_seconds once per image of the batch)",
            labels,
            registry=self.registry,
        )
        self.dropped = Counter(
            "vit_dropped_requests",
            "requests dropped before running: client gone or deadline passed",
            labels,
            registry=self.registry,
        )
        self.failed = Counter(
            "vit_failed_batches", "batches that raised; their requests got 500", labels, registry=self.registry
        )
        self.queue_depth = Gauge(
            "vit_queue_depth",
            "images waiting in the batcher queue when its last batch finished",
            labels,
            multiprocess_mode="livesum",
            registry=self.registry,
        )

    def watch(self, batcher: str) -> None:
        """Export the batcher's series from the start, at zero."""
        for metric in (
            self.batch_size,
            self.queue_time,
            self.compute_time,
            self.image_compute_time,
            self.dropped,
            self.failed,
            self.queue_depth,
        ):
            metric.labels(batcher)

    def batch_ran(self, batcher: str, queue_seconds: list[float], compute_seconds: float, queue_depth: int) -> None:
        self.batch_size.labels(batcher).observe(len(queue_seconds))
        self.compute_time.labels(batcher).observe(compute_seconds)
        queue_time = self.queue_time.labels(batcher)  # looked up once a batch, not once an image
        image_compute_time = self.image_compute_time.labels(batcher)
        for seconds in queue_seconds:
            queue_time.observe(seconds)
            image_compute_time.observe(compute_seconds)
        self.queue_depth.labels(batcher).set(queue_depth)

    def requests_dropped(self, batcher: str, count: int) -> None:
        self.dropped.labels(batcher).inc(count)

    def batch_failed(self, batcher: str) -> None:
        self.failed.labels(batcher).inc()

    def exposition(self) -> bytes:
        """This process's batchers (where several processes share a directory, HttpMetrics exports them all)."""
        return generate_latest(self.registry)


async def scrape(metrics: HttpMetrics, service: ModelService | None) -> bytes:
    """What GET /metrics answers: this process's requests and the model's info, with the batchers wherever they
    run; under vit-serve with several processes, every process's, summed."""
    exposition = metrics.exposition()
    if service is not None and not multiprocess():  # else the batchers' files are in the sum already
        exposition += await service.backend.metrics()
    return exposition


class Samples:
    """The samples of a scrape by name and labels: what the Open Inference Protocol's statistics read."""

    def __init__(self, exposition: bytes) -> None:
        self.values: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(exposition.decode()):
            for sample in family.samples:
                self.values[sample.name, frozenset(sample.labels.items())] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; 0 for one not exported (yet)."""
        return self.values.get((name, frozenset(labels.items())), 0.0)
