"""Production quality: prediction distribution, confidence, input drift and accuracy from feedback.

``record_batch`` runs in the inference thread once per batch (vectorized); the Prometheus collector reads
the state at scrape time, so drift scores are computed per scrape over a sliding window, not per request.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterable

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.metrics import NumpyHistogram
from service.model import Model, Reference

CONFIDENCE_BUCKETS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
_EPS = 1e-4
#: Fewer live images than this and the drift score stays 0 (too noisy to mean anything).
MIN_DRIFT_SAMPLES = 100


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index between two distributions (fractions); 0.25+ is a major shift."""
    e = np.clip(expected, _EPS, None)
    a = np.clip(actual, _EPS, None)
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


class Quality(Collector):
    def __init__(self, n_classes: int, window: int, feedback_window: int, remembered: int = 50_000) -> None:
        self._lock = threading.Lock()
        self.n_classes = n_classes
        self._class_counts = np.zeros(n_classes, dtype=np.int64)
        self._confidence = NumpyHistogram(CONFIDENCE_BUCKETS)
        self._window = window
        self._means = np.zeros(window, dtype=np.float32)
        self._classes = np.zeros(window, dtype=np.int64)
        self._filled = 0
        self._pos = 0
        self._reference: Reference | None = None
        self._feedback: deque[bool] = deque(maxlen=feedback_window)
        self._feedback_counts = {"correct": 0, "incorrect": 0, "unknown_request": 0}
        self._predictions: OrderedDict[str, np.ndarray] = OrderedDict()
        self._remembered = remembered

    def set_reference(self, reference: Reference | None) -> None:
        with self._lock:
            self._reference = reference

    # ---------------------------------------------------------------- hot path (inference thread)
    def record_batch(self, model: Model, x: np.ndarray, probs: np.ndarray) -> None:
        means = x.mean(axis=1)
        labels = probs.argmax(axis=1)
        self._confidence.observe_many(probs.max(axis=1))
        counts = np.bincount(labels, minlength=self.n_classes)[: self.n_classes]
        n = min(len(labels), self._window)
        with self._lock:
            self._class_counts += counts
            idx = (self._pos + np.arange(n)) % self._window
            self._means[idx] = means[-n:]
            self._classes[idx] = labels[-n:]
            self._pos = (self._pos + n) % self._window
            self._filled = min(self._filled + n, self._window)

    # ---------------------------------------------------------------- feedback
    def remember(self, request_id: str, labels: np.ndarray) -> None:
        """Keep the labels we answered, so a later feedback call can be scored (bounded memory)."""
        preds = self._predictions
        preds[request_id] = labels
        if len(preds) > self._remembered:
            preds.popitem(last=False)

    def feedback(self, request_id: str, true_label: int, index: int) -> bool | None:
        """Score one labelled feedback. Returns whether the prediction was right, None if unknown."""
        labels = self._predictions.get(request_id)
        if labels is None or not 0 <= index < len(labels):
            with self._lock:
                self._feedback_counts["unknown_request"] += 1
            return None
        correct = int(labels[index]) == true_label
        with self._lock:
            self._feedback.append(correct)
            self._feedback_counts["correct" if correct else "incorrect"] += 1
        return correct

    # ---------------------------------------------------------------- scrape
    def drift(self) -> dict[str, float]:
        with self._lock:
            ref, filled = self._reference, self._filled
            means, classes = self._means[:filled].copy(), self._classes[:filled].copy()
        if ref is None or filled < MIN_DRIFT_SAMPLES:
            return {"mean_intensity": 0.0, "predicted_class": 0.0}
        hist, _ = np.histogram(np.clip(means, 0.0, 1.0), bins=ref.mean_intensity_edges)
        cls = np.bincount(classes, minlength=len(ref.class_fractions))[: len(ref.class_fractions)]
        return {
            "mean_intensity": psi(ref.mean_intensity_fractions, hist / max(hist.sum(), 1)),
            "predicted_class": psi(ref.class_fractions, cls / max(cls.sum(), 1)),
        }

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            counts = self._class_counts.copy()
            fb = list(self._feedback)
            fb_counts = dict(self._feedback_counts)
            filled = self._filled
        preds = CounterMetricFamily("mnist_predictions", "Predictions by predicted class.", labels=["class"])
        for c, v in enumerate(counts):
            preds.add_metric([str(c)], float(v))
        yield preds
        yield self._confidence.family("mnist_prediction_confidence", "Top-class probability of each prediction.")
        drift = GaugeMetricFamily(
            "mnist_drift_score", "Population stability index of live inputs vs training data.", labels=["feature"]
        )
        for feature, value in self.drift().items():
            drift.add_metric([feature], value)
        yield drift
        yield GaugeMetricFamily("mnist_drift_window_images", "Images in the drift window.", value=filled)
        feedback = CounterMetricFamily("mnist_feedback", "Labelled feedback received, by outcome.", labels=["outcome"])
        for outcome, v in fb_counts.items():
            feedback.add_metric([outcome], float(v))
        yield feedback
        acc = GaugeMetricFamily(
            "mnist_production_accuracy", "Accuracy over the most recent labelled feedback (NaN before any)."
        )
        acc.add_metric([], float(np.mean(fb)) if fb else float("nan"))
        yield acc
        yield GaugeMetricFamily("mnist_production_accuracy_samples", "Feedback samples in the accuracy.", value=len(fb))
