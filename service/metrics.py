"""Prometheus metrics. One ``Metrics`` per app, on an injected registry (tests get a fresh one).

One process per container: the service scales by replicas, so every series is per process and
Prometheus aggregates across pods (docs/observability.md says why).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from service.model import Model

# The model answers in tens of microseconds: buckets start at 50 us.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096)
DROP_REASONS = (
    "queue_full", "deadline_unmeetable", "draining", "timeout", "cancelled", "engine_error", "not_ready",
)  # fmt: skip
ROUTES = (
    "/v1/predict", "/v1/predict/batch", "/v1/feedback", "/v1/models", "/healthz", "/readyz", "/metrics",
    "/v2/infer", "/v2/metadata", "/v2/health", "/admin", "/", "other",
)  # fmt: skip


class NumpyHistogram:
    """A histogram that takes a whole array per call (one lock, one bincount) instead of one call per value."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self._counts = np.zeros(len(bounds) + 1, dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: np.ndarray | Sequence[float]) -> None:
        v = np.asarray(values, dtype=np.float64)
        idx = np.searchsorted(self.bounds, v, side="left")
        counts = np.bincount(idx, minlength=len(self._counts))
        with self._lock:
            self._counts += counts
            self._sum += float(v.sum())

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        with self._lock:
            cum = np.cumsum(self._counts)
            total = self._sum
        buckets = [(repr(float(b)), int(c)) for b, c in zip(self.bounds, cum[:-1], strict=True)]
        buckets.append(("+Inf", int(cum[-1])))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


class _QueueWaitCollector(Collector):
    def __init__(self, hist: NumpyHistogram) -> None:
        self._hist = hist

    def collect(self) -> Iterable[Metric]:
        yield self._hist.family("mnist_queue_wait_seconds", "Time a request waited in the batch queue.")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.started = time.time()

        self.http_requests = Counter(
            "http_requests", "HTTP requests by route, method and status code.", ["route", "method", "status"],
            registry=r,
        )  # fmt: skip
        self.http_duration = Histogram(
            "http_request_duration_seconds", "HTTP request duration by route.", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.http_in_progress = Gauge(
            "http_requests_in_progress", "HTTP requests being served, by route.", ["route"], registry=r
        )
        for route in ROUTES:
            self.http_duration.labels(route)
            self.http_in_progress.labels(route)
            for method, status in (("POST", "200"), ("POST", "422"), ("POST", "503"), ("GET", "200")):
                self.http_requests.labels(route, method, status)

        self.batch_size = Histogram(
            "mnist_batch_size_images", "Images per engine call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "mnist_inference_seconds", "Time of one engine call.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = NumpyHistogram(LATENCY_BUCKETS)
        r.register(_QueueWaitCollector(self.queue_wait))
        depth = Gauge("mnist_queue_depth_images", "Images waiting in the batch queue.", ["queue"], registry=r)
        self.queue_depth = (depth.labels("interactive"), depth.labels("bulk"))
        self.images = Counter(
            "mnist_images_processed", "Images run through the model.", ["model", "version"], registry=r
        )
        self.batches = Counter("mnist_batches", "Engine calls.", ["model", "version"], registry=r)
        dropped = Counter(
            "mnist_requests_dropped", "Requests refused, timed out or cancelled, by reason.", ["reason"], registry=r
        )
        self.dropped = {reason: dropped.labels(reason) for reason in DROP_REASONS}
        self.model_info = Gauge(
            "mnist_model_info", "Loaded model versions (1 = serving by default, 0 = loaded).",
            ["name", "version", "sha256", "provider"], registry=r,
        )  # fmt: skip
        self.ready = Gauge("mnist_ready", "1 when the model is loaded and warm and the service is not draining.",
                           registry=r)  # fmt: skip
        uptime = Gauge("mnist_uptime_seconds", "Seconds since the service started.", registry=r)
        uptime.set_function(lambda: time.time() - self.started)

    def observe_batch(self, model: Model, n: int, seconds: float, waits: list[float]) -> None:
        self.batch_size.observe(n)
        self.inference.observe(seconds)
        self.queue_wait.observe_many(waits)
        self.images.labels(model.name, model.version).inc(n)
        self.batches.labels(model.name, model.version).inc()

    def set_models(self, models: Iterable[Model], default: Model) -> None:
        self.model_info.clear()
        for m in models:
            self.model_info.labels(m.name, m.version, m.sha256, m.provider).set(1 if m is default else 0)
            self.images.labels(m.name, m.version)
            self.batches.labels(m.name, m.version)

