"""Prometheus metrics. One ``Metrics`` per app, on an injected registry (tests get a fresh one).

One process per container: the service scales by replicas, so every series is per process and exact, with
no multiprocess mode; Prometheus aggregates across pods (docs/observability.md says why).

Names carry base units (``_seconds``, ``_images``, ``_total``). Every label value known up front (routes,
methods and the statuses the service emits, drop reasons, queues, classes) is initialised at zero, so
``rate()`` and ratios return data from the first scrape instead of appearing on the first error.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from service.model import Model

# One image through the MLP takes a few microseconds and a single request ~0.2-1 ms end to end, so the
# buckets start at 50 us and are densest below 5 ms; the tail reaches 10 s (the default request timeout).
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096)
#: Why a request got no prediction: refused at admission (queue_full, deadline_unmeetable, draining,
#: not_ready, too_many_requests = over --max-inflight-requests), timed out in the queue, cancelled by its
#: caller (disconnected), or failed in the engine.
DROP_REASONS = (
    "queue_full", "deadline_unmeetable", "draining", "timeout", "cancelled", "engine_error", "not_ready",
    "too_many_requests",
)  # fmt: skip
ROUTES = (
    "/v1/predict", "/v1/predict/batch", "/v1/feedback", "/v1/models", "/healthz", "/readyz", "/metrics",
    "/v2/infer", "/v2/metadata", "/v2/health", "/admin", "/", "other",
)  # fmt: skip
QUEUES = ("interactive", "bulk")
#: Routes that take a body (POST); every other route is read with GET.
POST_ROUTES = frozenset({"/v1/predict", "/v1/predict/batch", "/v1/feedback", "/v2/infer", "/admin"})
#: Statuses the service answers, initialised per route so error ratios exist before the first error.
POST_STATUSES = ("200", "400", "404", "413", "415", "422", "500", "503", "504")
GET_STATUSES = ("200", "404", "503")


class NumpyHistogram:
    """A histogram that takes a whole array per call (one lock, one bincount) instead of one call per value.

    Same semantics as a Prometheus histogram: a value equal to a bound counts in that bound's bucket.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        if self.bounds.ndim != 1 or len(self.bounds) == 0 or np.any(np.diff(self.bounds) <= 0):
            raise ValueError("histogram bounds must be a non-empty, strictly increasing sequence")
        self._bounds = [float(b) for b in self.bounds]
        self._counts = np.zeros(len(bounds) + 1, dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: np.ndarray | Sequence[float]) -> None:
        if isinstance(values, list) and len(values) <= 16:  # a few values: cheaper without NumPy
            bounds = self._bounds
            with self._lock:
                for value in values:
                    self._counts[bisect.bisect_left(bounds, value)] += 1
                    self._sum += value
            return
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        idx = np.searchsorted(self.bounds, v, side="left")
        counts = np.bincount(idx, minlength=len(self._counts))
        total = float(v.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def snapshot(self) -> tuple[np.ndarray, float]:
        """(cumulative counts per bucket, last one = +Inf = the count; the sum)."""
        with self._lock:
            return np.cumsum(self._counts), self._sum

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cum, total = self.snapshot()
        buckets = [(repr(float(b)), int(c)) for b, c in zip(self.bounds, cum[:-1], strict=True)]
        buckets.append(("+Inf", int(cum[-1])))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


class _QueueWaitCollector(Collector):
    def __init__(self, hist: NumpyHistogram) -> None:
        self._hist = hist

    def collect(self) -> Iterable[Metric]:
        yield self._hist.family("mnist_queue_wait_seconds", "Time a request waited in the batch queue.")


class Metrics:
    """Every metric of the service except the quality ones (service/quality.py), on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # No ``*_created`` samples: in the text format each is one more stored series per counter and histogram
        # child (about 100 of the 730 lines of a scrape) that no query here uses.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = r = registry if registry is not None else CollectorRegistry()
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, process_max_fds,
        # process_start_time_seconds; python_info; python_gc_{objects_collected,collections,...}_total.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.started = time.time()

        # ---------------------------------------------------------------- HTTP (observed by app.Observability)
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
            method, statuses = ("POST", POST_STATUSES) if route in POST_ROUTES else ("GET", GET_STATUSES)
            for status in statuses:
                self.http_requests.labels(route, method, status)

        # ---------------------------------------------------------------- batching and engine (batcher.py)
        self.batch_size = Histogram(
            "mnist_batch_size_images", "Images per engine call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "mnist_inference_seconds", "Time of one engine call.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = NumpyHistogram(LATENCY_BUCKETS)
        r.register(_QueueWaitCollector(self.queue_wait))
        depth = Gauge("mnist_queue_depth_images", "Images waiting in the batch queue.", ["queue"], registry=r)
        self.queue_depth = tuple(depth.labels(q) for q in QUEUES)  # index 0 = interactive, 1 = bulk
        self.images = Counter(
            "mnist_images_processed", "Images run through the model.", ["model", "version"], registry=r
        )
        self.batches = Counter("mnist_batches", "Engine calls.", ["model", "version"], registry=r)
        self.inline_batches = Counter(
            "mnist_inline_batches", "Engine calls run on the event loop (measured cheaper than a thread hand-off).",
            registry=r,
        )  # fmt: skip
        self.inline_max = Gauge(
            "mnist_inline_batch_max_seconds", "Longest engine call run on the event loop: its worst stall.", registry=r
        )
        self.inference_requests = Counter(
            "mnist_inference_requests", "Inference requests admitted, by transport.", ["transport"], registry=r
        )
        dropped = Counter(
            "mnist_requests_dropped", "Requests refused, timed out or cancelled, by reason.", ["reason"], registry=r
        )
        self.dropped = {reason: dropped.labels(reason) for reason in DROP_REASONS}

        # ---------------------------------------------------------------- model and lifecycle
        self.model_info = Gauge(
            "mnist_model_info", "Loaded model versions (1 = serving by default, 0 = loaded).",
            ["name", "version", "sha256", "provider"], registry=r,
        )  # fmt: skip
        self.ready = Gauge(
            "mnist_ready", "1 when the model is loaded and warm and the service is not draining.", registry=r
        )
        self._per_model: dict[int, tuple[Any, Any]] = {}  # id(model) -> (images, batches) children
        uptime = Gauge("mnist_uptime_seconds", "Seconds since the service started.", registry=r)
        uptime.set_function(lambda: time.time() - self.started)

    def observe_batch(self, model: Model, n: int, seconds: float, waits: list[float]) -> None:
        """One engine call of ``n`` images that took ``seconds``; ``waits`` = each request's queue time."""
        self.batch_size.observe(n)
        self.inference.observe(seconds)
        self.queue_wait.observe_many(waits)
        children = self._per_model.get(id(model))
        if children is None:
            children = self._per_model[id(model)] = (
                self.images.labels(model.name, model.version), self.batches.labels(model.name, model.version)
            )  # fmt: skip
        children[0].inc(n)
        children[1].inc()

    def set_models(self, models: Iterable[Model], default: Model) -> None:
        """Publish the loaded versions (``mnist_model_info``) and initialise their per-model counters."""
        self._per_model.clear()  # ids of unloaded models may be reused
        self.model_info.clear()
        for m in models:
            self.model_info.labels(m.name, m.version, m.sha256, m.provider).set(1 if m is default else 0)
            self.images.labels(m.name, m.version)
            self.batches.labels(m.name, m.version)
