"""Feedback: remembered predictions, scored against the true labels clients report later.

Every prediction gets a server-issued id (128 random bits): unguessable, unrelated to the caller's
``X-Request-ID`` (which is only echoed), so one client cannot score or pre-empt another's predictions. The
labels answered are kept as uint8 bytes in a store bounded by bytes (oldest first out). Feedback is rate limited
per client (a token bucket per source address) and may be restricted to holders of a token (the transport checks
it). The rolling accuracy reports how many samples and how many distinct sources it rests on, so alerts can
demand a quorum (docs/observability.md).
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.errors import TooManyRequests

OUTCOMES = ("correct", "incorrect", "duplicate", "unknown_request", "rate_limited")
#: Bookkeeping bytes of one remembered prediction besides its labels (dict entry, key string, bytes object).
ENTRY_OVERHEAD = 200
#: Most clients tracked by the rate limiter; the least recently seen is forgotten beyond it.
MAX_CLIENTS = 10_000


class PredictionIds:
    """128-bit random ids from the OS's CSPRNG, drawn 256 at a time (one system call per 256 predictions)."""

    def __init__(self) -> None:
        self._pool = b""
        self._pos = 0

    def __call__(self) -> str:
        if self._pos >= len(self._pool):
            self._pool, self._pos = secrets.token_bytes(16 * 256), 0
        raw = self._pool[self._pos : self._pos + 16]
        self._pos += 16
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Feedback(Collector):
    def __init__(self, window: int, max_bytes: int, rate_per_s: float) -> None:
        self._lock = threading.Lock()  # the collector reads from the scrape thread
        self._new_id = PredictionIds()
        self._predictions: OrderedDict[str, bytes] = OrderedDict()  # event loop only
        self._bytes = 0
        self.max_bytes = max_bytes
        self._scored: OrderedDict[tuple[str, int], bool] = OrderedDict()
        self._window: deque[tuple[bool, str]] = deque(maxlen=window)
        self._sources: Counter[str] = Counter()
        self._counts = dict.fromkeys(OUTCOMES, 0)
        self._rate = rate_per_s
        self._burst = max(1.0, 2 * rate_per_s)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # source -> (tokens, last time)

    @property
    def remembered_bytes(self) -> int:
        return self._bytes

    def remember(self, labels: np.ndarray) -> str:
        """Keep the labels answered (uint8) under a new prediction id; returns the id."""
        pid = self._new_id()
        data = labels.astype(np.uint8, copy=False).tobytes()
        self._predictions[pid] = data
        self._bytes += len(data) + ENTRY_OVERHEAD
        while self._bytes > self.max_bytes and self._predictions:
            _, old = self._predictions.popitem(last=False)
            self._bytes -= len(old) + ENTRY_OVERHEAD
        return pid

    def _allow(self, source: str) -> bool:
        if self._rate <= 0:
            return True
        now = time.monotonic()
        tokens, last = self._buckets.pop(source, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        allowed = tokens >= 1.0
        self._buckets[source] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return allowed

    def score(self, prediction_id: str, true_label: int, index: int, source: str) -> bool | None:
        """Score one feedback: whether the prediction was right; None if the prediction is unknown.

        A repeated feedback for the same (prediction, index), a client's retry, answers the first verdict again
        and counts as ``duplicate``, so retries do not weigh twice. Raises TooManyRequests over the rate.
        """
        if not self._allow(source):
            self._count("rate_limited")
            raise TooManyRequests(f"feedback is limited to {self._rate:g} per second per client",
                                  retry_after_s=1.0 / self._rate)  # fmt: skip
        key = (prediction_id, index)
        earlier = self._scored.get(key)
        if earlier is not None:
            self._count("duplicate")
            return earlier
        labels = self._predictions.get(prediction_id)
        if labels is None or not 0 <= index < len(labels):
            self._count("unknown_request")
            return None
        correct = labels[index] == true_label
        self._scored[key] = correct
        if len(self._scored) * ENTRY_OVERHEAD > self.max_bytes:
            self._scored.popitem(last=False)
        with self._lock:
            if len(self._window) == self._window.maxlen:
                _, old = self._window[0]
                self._sources[old] -= 1
                if not self._sources[old]:
                    del self._sources[old]
            self._window.append((correct, source))
            self._sources[source] += 1
            self._counts["correct" if correct else "incorrect"] += 1
        return correct

    def _count(self, outcome: str) -> None:
        with self._lock:
            self._counts[outcome] += 1

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            outcomes = np.fromiter((c for c, _ in self._window), dtype=bool, count=len(self._window))
            counts = dict(self._counts)
            sources = len(self._sources)
            top = max(self._sources.values(), default=0)
        family = CounterMetricFamily("mnist_feedback", "Labelled feedback received, by outcome.", labels=["outcome"])
        for outcome, count in counts.items():
            family.add_metric([outcome], float(count))
        yield family
        yield GaugeMetricFamily(
            "mnist_production_accuracy",
            "Accuracy over the most recent labelled feedback (NaN before any).",
            value=float(outcomes.mean()) if len(outcomes) else float("nan"),
        )
        yield GaugeMetricFamily("mnist_production_accuracy_samples", "Feedback samples in the accuracy.",
                                value=len(outcomes))  # fmt: skip
        yield GaugeMetricFamily("mnist_feedback_sources", "Distinct clients among the feedback samples in the accuracy.",
                                value=sources)  # fmt: skip
        yield GaugeMetricFamily(
            "mnist_feedback_top_source_share",
            "Share of the accuracy's feedback samples that the busiest client sent (0 before any).",
            value=top / len(outcomes) if len(outcomes) else 0.0,
        )
        yield GaugeMetricFamily("mnist_feedback_remembered_bytes", "Bytes held by remembered predictions.",
                                value=self._bytes)  # fmt: skip
