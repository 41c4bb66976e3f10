"""Prometheus metrics, in two registries: the HTTP side of a process, and the batchers wherever they run.

`HttpMetrics` counts and times requests in each process that answers HTTP. `BatchMetrics` lives
beside the batchers: in the same process, or in the model process when front ends feed one. The
batchers' counts are not kept twice: at each scrape they are read from each batcher's own
``BatchStats``, the record that /model shows too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from app.batcher import DynamicBatcher

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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
        self.model = Info("vit_model", "the served model", registry=self.registry)

    def describe_model(self, description: dict, sha256: str) -> None:
        labels = {"name": description["name"], "sha256": sha256, "device": description["device"]}
        self.model.info(
            labels | {"parameters": str(description["parameters"]), "classes": str(len(description["classes"]))}
        )


class BatchMetrics:
    """Queue and compute times, observed per batch, and the batchers' own statistics, read at each scrape.

    It is itself a collector on its registry: `collect` exports the batchers' statistics.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.batchers: Mapping[str, DynamicBatcher] = {}  # set once they exist: they report to observe_batch
        self.queue_time = Histogram(
            "vit_queue_seconds",
            "time from enqueue to the start of its batch",
            ["batcher"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_time = Histogram(
            "vit_compute_seconds", "time to run one batch", ["batcher"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.registry.register(self)

    def observe_batch(self, batcher: str, queue_seconds: list[float], compute_seconds: float) -> None:
        self.compute_time.labels(batcher).observe(compute_seconds)
        for seconds in queue_seconds:
            self.queue_time.labels(batcher).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        sizes = HistogramMetricFamily("vit_batch_size", "images per batch", labels=["batcher"])
        depth = GaugeMetricFamily("vit_queue_depth", "images waiting in the batcher queue", labels=["batcher"])
        dropped = CounterMetricFamily(
            "vit_dropped_requests",
            "requests dropped before running: client gone or deadline passed",
            labels=["batcher"],
        )
        failed = CounterMetricFamily(
            "vit_failed_batches", "batches that raised; their requests got 500", labels=["batcher"]
        )
        for name, batcher in self.batchers.items():
            stats = batcher.stats
            buckets = [(str(float(bound)), stats.batches_of_at_most(bound)) for bound in BATCH_BUCKETS]
            sizes.add_metric([name], [*buckets, ("+Inf", stats.batches)], sum_value=stats.requests)
            depth.add_metric([name], batcher.queue_depth)
            dropped.add_metric([name], stats.dropped)
            failed.add_metric([name], stats.failed_batches)
        yield from (sizes, depth, dropped, failed)
