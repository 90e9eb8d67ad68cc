"""Prometheus metrics. One ``Metrics`` per app, on an injected registry (tests get a fresh one).

One process per container: the service scales by replicas, so every series is per process and exact, with
no multiprocess mode; Prometheus aggregates across pods (docs/observability.md says why).

Names carry base units (``_seconds``, ``_images``, ``_total``). Every label value known up front (routes,
methods and the statuses the service emits, drop reasons, queues, classes) is initialised at zero, so
``rate()`` and ratios return data from the first scrape instead of appearing on the first error.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
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
#: Routes that run the model: the in-flight limit counts their requests (service/inflight.py).
INFERENCE_ROUTES = frozenset({"/v1/predict", "/v1/predict/batch", "/v2/infer"})
_STATIC_ROUTES = frozenset(r for r in ROUTES if not r.startswith("/v2") and r not in ("/admin", "other"))


def route_label(path: str) -> str:
    """The bounded ``route`` label of a request path (no raw paths in the metrics: they are unbounded), the one
    place that maps paths to routes."""
    if path in _STATIC_ROUTES:
        return path
    if path.startswith("/v2"):
        if path.endswith("/infer"):
            return "/v2/infer"
        return "/v2/health" if "/health" in path or path.endswith("/ready") else "/v2/metadata"
    if path.startswith("/admin"):
        return "/admin"
    if path.startswith(("/static", "/docs", "/openapi", "/redoc")):
        return "/"
    return "other"


def is_inference(method: str, path: str) -> bool:
    """Whether a request runs the model (a POST to an inference route)."""
    return method == "POST" and route_label(path) in INFERENCE_ROUTES


class NumpyHistogram:
    """A histogram that takes a whole array per call (one lock, one bincount) instead of one call per value.

    Same semantics as a Prometheus histogram: a value equal to a bound counts in that bound's bucket.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        if self.bounds.ndim != 1 or len(self.bounds) == 0 or np.any(np.diff(self.bounds) <= 0):
            raise ValueError("histogram bounds must be a non-empty, strictly increasing sequence")
        self._counts = np.zeros(len(bounds) + 1, dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: np.ndarray | Sequence[float]) -> None:
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


class PlainHistogram:
    """A histogram as plain numbers, for one writer thread (the event loop); ``add_to`` reads a copy.
    ``NumpyHistogram`` is the one for whole arrays written from any thread (the quality statistics)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = [float(b) for b in bounds]
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # a value on a bound counts in it
        self.sum += value

    def observe_many(self, values: Iterable[float]) -> None:
        for value in values:
            self.observe(value)

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        counts, total = list(self.counts), self.sum
        les = [*map(repr, self.bounds), "+Inf"]
        family.add_metric(labels, list(zip(les, itertools.accumulate(counts), strict=True)), sum_value=total)


class RouteStats:
    """One route's HTTP series: requests in progress, their duration, and how many ended with each status."""

    __slots__ = ("done", "duration", "in_progress")

    def __init__(self, method: str, statuses: Iterable[str]) -> None:
        self.in_progress = 0
        self.duration = PlainHistogram(LATENCY_BUCKETS)
        self.done: dict[tuple[str, str], int] = dict.fromkeys(((method, s) for s in statuses), 0)


class LoopStats(Collector):
    """The series every request or every batch updates: HTTP requests by route, method and status, their
    duration and how many are in progress; engine calls (size, time, inline or not, images and calls per model
    version); each request's wait in the queue; inference requests by transport. A prometheus_client counter, gauge or histogram takes a lock and
    checks its arguments on each update, about ten times per request here; these are plain numbers that the
    event loop alone writes and this collector reads at scrape time (a copy of a list or dict is atomic under
    the GIL)."""

    def __init__(self) -> None:
        self.routes: dict[str, RouteStats] = {}
        for route in ROUTES:
            method, statuses = ("POST", POST_STATUSES) if route in POST_ROUTES else ("GET", GET_STATUSES)
            self.routes[route] = RouteStats(method, statuses)
        self.batch_size = PlainHistogram(BATCH_BUCKETS)
        self.inference = PlainHistogram(LATENCY_BUCKETS)
        self.queue_wait = PlainHistogram(LATENCY_BUCKETS)  # one value per request
        self.inline_batches = 0
        self.requests = {"http": 0, "grpc": 0}  # inference requests admitted, by transport
        self.versions: dict[tuple[str, str], list[int]] = {}  # (model, version) -> [images, engine calls]

    def route(self, route: str) -> RouteStats:
        stats = self.routes.get(route)
        if stats is None:  # a label route_label adds later: no statuses known up front
            stats = self.routes[route] = RouteStats("GET", ())
        return stats

    def finished(self, stats: RouteStats, method: str, status: int, seconds: float) -> None:
        stats.in_progress -= 1
        stats.duration.observe(seconds)
        key = (method, str(status))
        stats.done[key] = stats.done.get(key, 0) + 1

    def version(self, name: str, version: str) -> list[int]:
        return self.versions.setdefault((name, version), [0, 0])

    def collect(self) -> Iterable[Metric]:
        labels = ["route", "method", "status"]
        requests = CounterMetricFamily(
            "http_requests", "HTTP requests by route, method and status code.", labels=labels
        )
        duration = HistogramMetricFamily(
            "http_request_duration_seconds", "HTTP request duration by route.", labels=["route"]
        )
        progress = GaugeMetricFamily(
            "http_requests_in_progress", "HTTP requests being served, by route.", labels=["route"]
        )
        for route, stats in list(self.routes.items()):
            for (method, status), n in list(stats.done.items()):
                requests.add_metric([route, method, status], n)
            stats.duration.add_to(duration, [route])
            progress.add_metric([route], stats.in_progress)
        yield from (requests, duration, progress)
        size = HistogramMetricFamily("mnist_batch_size_images", "Images per engine call.")
        self.batch_size.add_to(size, [])
        seconds = HistogramMetricFamily("mnist_inference_seconds", "Time of one engine call.")
        self.inference.add_to(seconds, [])
        wait = HistogramMetricFamily("mnist_queue_wait_seconds", "Time a request waited in the batch queue.")
        self.queue_wait.add_to(wait, [])
        yield from (size, seconds, wait)
        yield CounterMetricFamily("mnist_inline_batches", "Engine calls run on the event loop (measured cheaper "
                                  "than a thread hand-off).", value=self.inline_batches)  # fmt: skip
        transports = CounterMetricFamily("mnist_inference_requests", "Inference requests admitted, by transport.",
                                         labels=["transport"])  # fmt: skip
        for transport, n in list(self.requests.items()):
            transports.add_metric([transport], n)
        images = CounterMetricFamily(
            "mnist_images_processed", "Images run through the model.", labels=["model", "version"]
        )
        calls = CounterMetricFamily("mnist_batches", "Engine calls.", labels=["model", "version"])
        for key, (n_images, n_calls) in list(self.versions.items()):
            images.add_metric(list(key), n_images)
            calls.add_metric(list(key), n_calls)
        yield from (transports, images, calls)


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

        # ------------------------------------------ HTTP (asgi.Edge), batching and engine (batcher.py, inference.py)
        self.stats = LoopStats()
        r.register(self.stats)
        depth = Gauge("mnist_queue_depth_images", "Images waiting in the batch queue.", ["queue"], registry=r)
        self.queue_depth = tuple(depth.labels(q) for q in QUEUES)  # index 0 = interactive, 1 = bulk
        self.inline_max = Gauge(
            "mnist_inline_batch_max_seconds", "Longest engine call run on the event loop: its worst stall.", registry=r
        )
        dropped = Counter(
            "mnist_requests_dropped", "Requests refused, timed out or cancelled, by reason.", ["reason"], registry=r
        )
        self.dropped = {reason: dropped.labels(reason) for reason in DROP_REASONS}

        # ---------------------------------------------------------------- model and lifecycle
        self.model_info = Gauge(
            "mnist_model_info", "Loaded model versions (1 = serving by default, 0 = loaded).",
            ["name", "version", "sha256", "provider", "precision"], registry=r,
        )  # fmt: skip
        self.ready = Gauge(
            "mnist_ready", "1 when the model is loaded and warm and the service is not draining.", registry=r
        )
        self._per_model: dict[int, list[int]] = {}  # id(model) -> its version's [images, engine calls]
        uptime = Gauge("mnist_uptime_seconds", "Seconds since the service started.", registry=r)
        uptime.set_function(lambda: time.time() - self.started)

    def observe_batch(self, model: Model, n: int, seconds: float, waits: list[float]) -> None:
        """One engine call of ``n`` images that took ``seconds``; ``waits`` = each request's queue time."""
        self.stats.batch_size.observe(n)
        self.stats.inference.observe(seconds)
        self.stats.queue_wait.observe_many(waits)
        counts = self._per_model.get(id(model))
        if counts is None:
            counts = self._per_model[id(model)] = self.stats.version(model.name, model.version)
        counts[0] += n
        counts[1] += 1

    def set_models(self, models: Iterable[Model], default: Model) -> None:
        """Publish the loaded versions (``mnist_model_info``) and initialise their per-model counters."""
        self._per_model.clear()  # ids of unloaded models may be reused
        self.model_info.clear()
        for m in models:
            self.model_info.labels(m.name, m.version, m.sha256, m.provider, m.precision).set(1 if m is default else 0)
            self.stats.version(m.name, m.version)
