"""Prometheus metrics of one server, in a registry of its own (never prometheus_client's global one)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Queue depth, images, latency, batch sizes, errors and steps; `text()` is the exposition format."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ready = Gauge("bonsai_model_ready", "1 once the model is loaded", registry=r)
        self.queue_depth = Gauge("bonsai_queue_depth", "requests waiting for a batch", registry=r)
        self.running_images = Gauge("bonsai_running_images", "images in the batch being rendered", registry=r)
        self.requests = Counter("bonsai_requests", "generation requests answered, by HTTP status", ["status"],
                                registry=r)
        self.images = Counter("bonsai_images", "images returned to clients", registry=r)
        self.errors = Counter("bonsai_errors", "error responses, by error code", ["code"], registry=r)
        self.cancelled = Counter("bonsai_cancelled", "requests cancelled because their client disconnected",
                                 registry=r)
        self.steps = Counter("bonsai_denoise_steps", "denoise steps run (one per batched forward)", registry=r)
        self.latency = Histogram("bonsai_request_seconds", "generation request latency, arrival to answer",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("bonsai_queue_seconds", "time a request waited before its batch started",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("bonsai_batch_images", "images per batched denoise forward",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("bonsai_batch_requests", "requests per pipeline call",
                                        buckets=BATCH_BUCKETS, registry=r)

    def track(self, depth: Callable[[], int], running: Callable[[], int]) -> None:
        """Read the gauges from the engine at scrape time."""
        self.queue_depth.set_function(depth)
        self.running_images.set_function(running)

    def observe_batch(self, chunks: list[int], requests: int) -> None:
        for images in chunks:
            self.batch_images.observe(images)
        self.batch_requests.observe(requests)

    def text(self) -> bytes:
        return generate_latest(self.registry)
