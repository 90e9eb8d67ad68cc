"""Feedback: remembered predictions, scored against the true labels clients report later.

Every prediction gets a server-issued id (a slot number and 128 random bits): unguessable, unrelated to the
caller's ``X-Request-ID`` (which is only echoed), so one client cannot score or pre-empt another's predictions.
The labels answered are kept as uint8 in a fixed-size ring (``Remembered``): no Python object per prediction,
29 bytes for a single-image one, oldest first out. Feedback is rate limited
per client (a token bucket per source address) and may be restricted to holders of a token (the transport checks
it). The rolling accuracy reports how many samples and how many distinct sources it rests on, so alerts can
demand a quorum (docs/observability.md).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import struct
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.errors import TooManyRequests

OUTCOMES = ("correct", "incorrect", "duplicate", "unknown_request", "rate_limited")
#: Bytes of one remembered prediction besides its labels: a 16-byte tag, an 8-byte offset, a 4-byte length.
SLOT_BYTES = 28
#: The memory bound buys one slot per this many bytes; the rest holds labels (a single image needs 1 byte).
BYTES_PER_SLOT = 64
#: Most clients tracked by the rate limiter; the least recently seen is forgotten beyond it.
MAX_CLIENTS = 10_000
_URLSAFE = bytes.maketrans(b"+/", b"-_")


class Remembered:
    """The labels of recent predictions in two rings sized once from ``max_bytes``: slots (one per prediction:
    its random tag, where its labels start, how many) and the labels themselves (uint8). A prediction id names
    its slot and carries its tag; it is found while the slot still holds that tag and its labels have not been
    overwritten. Remembering is O(1) and allocates nothing: memory never grows past the bound."""

    def __init__(self, max_bytes: int) -> None:
        self.slots = max(1, max_bytes // BYTES_PER_SLOT)
        self.capacity = max(1, max_bytes - self.slots * SLOT_BYTES)  # label bytes
        self._tags = np.zeros((self.slots, 16), np.uint8)
        self._tag_bytes = self._tags.data.cast("B")  # the same memory, written without NumPy
        self._ends = np.zeros(self.slots, np.int64)  # absolute offset after its labels; 0 = empty (pages stay lazy)
        self._lengths = np.zeros(self.slots, np.uint32)
        self._labels = np.zeros(self.capacity, np.uint8)
        self._next = 0  # predictions remembered so far
        self._written = 0  # label bytes written so far
        self._pool = b""
        self._pos = 0

    @property
    def used_bytes(self) -> int:
        return min(self._next, self.slots) * SLOT_BYTES + min(self._written, self.capacity)

    def _tag(self) -> bytes:
        if self._pos >= len(self._pool):  # the OS's CSPRNG, 256 tags per system call
            self._pool, self._pos = secrets.token_bytes(16 * 256), 0
        self._pos += 16
        return self._pool[self._pos - 16 : self._pos]

    def add(self, labels: np.ndarray) -> str:
        slot = self._next % self.slots
        self._next += 1
        tag, n, start = self._tag(), len(labels), self._written
        self._tag_bytes[16 * slot : 16 * slot + 16] = tag
        self._lengths[slot] = n
        if n > self.capacity:  # cannot be kept: the id is issued, feedback on it finds nothing
            self._ends[slot] = 0
        else:
            self._ends[slot] = start + n
            at = start % self.capacity
            if n == 1:
                self._labels[at] = labels[0]
            else:
                first = min(n, self.capacity - at)
                self._labels[at : at + first] = labels[:first]
                self._labels[: n - first] = labels[first:]
            self._written += n
        # base64url of slot and tag (20 bytes: 27 characters once the one "=" of padding is dropped)
        return binascii.b2a_base64(slot.to_bytes(4, "little") + tag, newline=False)[:27].translate(_URLSAFE).decode()

    def get(self, prediction_id: str, index: int) -> int | None:
        """The label answered for image ``index`` of that prediction; None if unknown or forgotten."""
        try:
            raw = base64.urlsafe_b64decode(prediction_id + "=" * (-len(prediction_id) % 4))
        except ValueError:
            return None
        if len(raw) != 20:
            return None
        (slot,) = struct.unpack_from("<I", raw)
        if slot >= self.slots or not hmac.compare_digest(self._tags[slot].tobytes(), raw[4:]):
            return None
        n = int(self._lengths[slot])
        start = int(self._ends[slot]) - n
        if self._ends[slot] == 0 or start < self._written - self.capacity or not 0 <= index < n:
            return None
        return int(self._labels[(start + index) % self.capacity])


class Feedback(Collector):
    def __init__(self, window: int, max_bytes: int, rate_per_s: float) -> None:
        self._lock = threading.Lock()  # the collector reads from the scrape thread
        self._store = Remembered(max_bytes)  # event loop only
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
        return self._store.used_bytes

    def remember(self, labels: np.ndarray) -> str:
        """Keep the labels answered (as uint8) under a new prediction id; returns the id."""
        return self._store.add(labels)

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
        answered = self._store.get(prediction_id, index)
        if answered is None:
            self._count("unknown_request")
            return None
        correct = answered == true_label
        self._scored[key] = correct
        if len(self._scored) > self._store.slots:
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
                                value=self._store.used_bytes)  # fmt: skip
