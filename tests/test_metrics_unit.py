"""Unit tests of service/metrics.py and service/quality.py: each test builds its own registry."""

from __future__ import annotations

import base64
import functools
import itertools
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.errors import TooManyRequests
from service.feedback import BYTES_PER_SLOT, Feedback, Remembered
from service.metrics import DROP_REASONS, LATENCY_BUCKETS, ROUTES, Metrics, NumpyHistogram, is_inference, route_label
from service.model import Model, load_model
from service.quality import CONFIDENCE_BUCKETS, MAX_IMAGES_PER_REQUEST, MIN_DRIFT_SAMPLES, Quality, psi
from service.repository import Reference
from service.settings import Settings
from tests.helpers import ROOT, SHARED_MNIST, write_model

FIXTURE = ROOT / "tests" / "fixtures" / "mnist_small.npz"
OBS = ROOT / "observability"

Samples = dict[str, list[tuple[dict[str, str], float]]]


def samples(registry: CollectorRegistry) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    repo = tmp_path_factory.mktemp("models")
    return load_model(write_model(repo, "tiny", "3", seed=1), Settings(provider="cpu"))


@functools.cache
def mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train images, test images, test labels) of real MNIST: ../shared when present, else the fixture."""
    path = SHARED_MNIST if SHARED_MNIST.exists() else FIXTURE
    with np.load(path) as d:
        return d["x_train"], d["x_test"], d["y_test"].astype(np.int64)


def reference_from(train: np.ndarray, labels: np.ndarray) -> Reference:
    from export.reference import reference_stats  # the exporter's own computation

    ref = reference_stats(train, labels)
    return Reference(*(np.asarray(ref[k], dtype=np.float64) for k in
                       ("mean_intensity_edges", "mean_intensity_fractions", "class_fractions")))  # fmt: skip


def one_hot(labels: np.ndarray, confidence: float = 0.9) -> np.ndarray:
    probs = np.full((len(labels), 10), (1 - confidence) / 9, dtype=np.float32)
    probs[np.arange(len(labels)), labels] = confidence
    return probs


def pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255


# ----------------------------------------------------------------------------------------- NumpyHistogram
@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(LATENCY_BUCKETS), st.floats(0, 20, allow_nan=False)), max_size=200))
def test_numpy_histogram_matches_prometheus_histogram(values: list[float]) -> None:
    """Same buckets (a value equal to a bound counts in it), same count and sum as prometheus_client's."""
    reg = CollectorRegistry()
    reference = Histogram("ref_seconds", "reference", buckets=LATENCY_BUCKETS, registry=reg)
    for v in values:
        reference.observe(v)
    ours = NumpyHistogram(LATENCY_BUCKETS)
    ours.observe_many(values[: len(values) // 2])
    ours.observe_many(np.asarray(values[len(values) // 2 :]))
    got = {(s.labels.get("le"), s.name.rsplit("_", 1)[-1]): s.value for s in ours.family("ref_seconds", "x").samples}
    want = {(s.labels.get("le"), s.name.rsplit("_", 1)[-1]): s.value
            for s in reg.collect().__next__().samples if not s.name.endswith("_created")}  # fmt: skip
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_numpy_histogram_rejects_bad_bounds_and_ignores_empty_batches() -> None:
    for bad in ([], [1.0, 1.0], [2.0, 1.0]):
        with pytest.raises(ValueError, match="strictly increasing"):
            NumpyHistogram(bad)
    h = NumpyHistogram((1.0, 2.0))
    h.observe_many([])
    cum, total = h.snapshot()
    assert cum.tolist() == [0, 0, 0]
    assert total == 0.0


# ----------------------------------------------------------------------------------------- Metrics
def test_http_stats_match_what_prometheus_client_would_expose() -> None:
    """The edge's plain-number HTTP series scrape exactly as prometheus_client's own counter, histogram and gauge
    would: same names, labels, cumulative buckets (a value on a bound counts in it) and sum."""
    m = Metrics()
    ref_registry = CollectorRegistry()
    reference = Histogram("ref", "ref", buckets=LATENCY_BUCKETS, registry=ref_registry)
    stats = m.stats.route("/v1/predict")
    for seconds, status in ((0.0001, 200), (0.0003, 200), (0.002, 422), (20.0, 504)):
        stats.in_progress += 1
        m.stats.finished(stats, "POST", status, seconds)
        reference.observe(seconds)
    stats.in_progress += 1  # one still being served
    late = m.stats.route("/not-a-known-route")
    late.in_progress += 1
    m.stats.finished(late, "PATCH", 405, 0.5)
    s = samples(m.registry)
    counts = {(lb["route"], lb["method"], lb["status"]): v for lb, v in s["http_requests_total"]}
    assert counts[("/v1/predict", "POST", "200")] == 2
    assert counts[("/v1/predict", "POST", "422")] == 1
    assert counts[("/v1/predict", "POST", "504")] == 1
    assert counts[("/v1/predict", "POST", "503")] == 0
    assert counts[("/not-a-known-route", "PATCH", "405")] == 1
    ours = {lb["le"]: v for lb, v in s["http_request_duration_seconds_bucket"] if lb["route"] == "/v1/predict"}
    theirs = {lb["le"]: v for lb, v in samples(ref_registry)["ref_bucket"]}
    assert ours == theirs
    assert ours["0.0001"] == 1
    assert ours["+Inf"] == 4
    total = {lb["route"]: v for lb, v in s["http_request_duration_seconds_sum"]}
    assert total["/v1/predict"] == pytest.approx(20.0024)
    progress = {lb["route"]: v for lb, v in s["http_requests_in_progress"]}
    assert progress == {**dict.fromkeys(ROUTES, 0), "/v1/predict": 1, "/not-a-known-route": 0}


def test_every_label_value_is_initialised_before_any_traffic() -> None:
    s = samples(Metrics().registry)
    http = {(lb["route"], lb["method"], lb["status"]) for lb, _ in s["http_requests_total"]}
    for route in ROUTES:
        assert any(r == route for r, _, _ in http), route
        assert {"route": route} in [lb for lb, _ in s["http_requests_in_progress"]]
        assert ({"route": route, "le": "+Inf"}, 0.0) in s["http_request_duration_seconds_bucket"]
    assert {("/v1/predict", "POST", "503"), ("/v1/predict", "POST", "422")} <= http
    assert ("/readyz", "GET", "503") in http
    assert {lb["reason"] for lb, _ in s["mnist_requests_dropped_total"]} == set(DROP_REASONS)
    assert {lb["queue"] for lb, _ in s["mnist_queue_depth_images"]} == {"interactive", "bulk"}
    assert all(v == 0 for name in ("http_requests_total", "mnist_requests_dropped_total") for _, v in s[name])
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "python_gc_collections_total", "python_info", "mnist_uptime_seconds", "mnist_ready"):  # fmt: skip
        assert name in s, name


def test_buckets_resolve_a_sub_millisecond_service() -> None:
    assert LATENCY_BUCKETS[0] <= 0.0001
    assert sum(b < 0.001 for b in LATENCY_BUCKETS) >= 4  # resolution where the service lives
    assert LATENCY_BUCKETS[-1] >= Settings().request_timeout_s


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.dropped["queue_full"].inc()
    values = {lb["reason"]: v for lb, v in samples(b.registry)["mnist_requests_dropped_total"]}
    assert values["queue_full"] == 0


def test_observe_batch_and_model_info(tiny_model: Model) -> None:
    m = Metrics()
    m.set_models([tiny_model], tiny_model)
    m.observe_batch(tiny_model, 8, 0.0004, [0.0001, 0.002, 0.002])
    m.observe_batch(tiny_model, 1, 0.00005, [0.0])
    s = samples(m.registry)
    assert s["mnist_images_processed_total"] == [({"model": "tiny", "version": "3"}, 9.0)]
    assert s["mnist_batches_total"] == [({"model": "tiny", "version": "3"}, 2.0)]
    assert dict((lb["le"], v) for lb, v in s["mnist_batch_size_images_bucket"])["1.0"] == 1
    assert s["mnist_batch_size_images_sum"][0][1] == 9
    waits = dict((lb["le"], v) for lb, v in s["mnist_queue_wait_seconds_bucket"])
    assert [waits[le] for le in ("5e-05", "0.0001", "0.002", "+Inf")] == [1, 2, 4, 4]
    assert s["mnist_queue_wait_seconds_sum"][0][1] == pytest.approx(0.0041)
    assert s["mnist_inference_seconds_count"][0][1] == 2
    ((labels, value),) = s["mnist_model_info"]
    assert labels == {
        "name": "tiny",
        "version": "3",
        "sha256": tiny_model.sha256,
        "provider": "CPUExecutionProvider",
        "precision": "float32",
    }
    assert value == 1


_REQUESTS = itertools.count(1_000_000)


def singles(labels: np.ndarray) -> list[tuple[int, int]]:
    """Each image its own request (the drift window takes at most 64 images of one request)."""
    return [(next(_REQUESTS), 1) for _ in range(len(labels))]


def test_design_doc_lists_the_exported_metrics() -> None:
    """docs/design.md's metric list and the exposition agree, both ways (process_* and python_* aside)."""
    m = Metrics()
    m.registry.register(Quality(10, 100))
    m.registry.register(Feedback(10, 1 << 20, 0))
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in m.registry.collect()}
    exported = {n for n in exported if n.startswith(("mnist_", "http_"))}
    section = (ROOT / "docs" / "design.md").read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"\b((?:mnist|http)_[a-z_]+)", section))
    assert listed - exported == set(), "listed in docs/design.md but not exported"
    assert exported - listed == set(), "exported but not listed in docs/design.md"


def test_dashboard_and_alerts_use_only_exported_metrics() -> None:
    """Static check of every metric name in the Grafana JSON and the alert rules (no Prometheus needed)."""
    m = Metrics()
    m.registry.register(Quality(10, 100))
    m.registry.register(Feedback(10, 1 << 20, 0))
    names = set()
    for family in m.registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    names |= {"up"}
    texts = [(OBS / "grafana" / "dashboards" / "mnist-service.json").read_text(),
             (OBS / "prometheus" / "rules" / "mnist-alerts.yml").read_text()]  # fmt: skip
    used = {n for text in texts for n in re.findall(r"\b((?:mnist|http|process|python)_[a-z_]+)\b(?=\s*[{\[)])", text)}
    used |= {n for text in texts for n in re.findall(r"\b(up)\{", text)}
    assert used, "no metric found"
    assert used <= names, f"not exported by the service: {used - names}"


# ----------------------------------------------------------------------------------------- PSI and drift
def test_psi_is_zero_for_the_same_distribution_and_grows_with_the_shift() -> None:
    e = np.array([0.1, 0.2, 0.4, 0.2, 0.1])
    assert psi(e, e) == pytest.approx(0.0, abs=1e-12)
    shifts = [psi(e, np.roll(e, k) * 0.5 + e * 0.5) for k in (0, 1, 2)]
    assert shifts[0] < shifts[1] < shifts[2]
    assert psi(e, np.array([0, 0, 0, 0, 1.0])) > 1  # an empty bin is finite, and large
    assert math.isfinite(psi(np.array([1.0, 0.0]), np.array([0.0, 1.0])))


def test_drift_is_nan_until_the_window_holds_enough_images(tiny_model: Model) -> None:
    _, x, y = mnist()
    q = Quality(10, window=2000)
    assert all(math.isnan(v) for v in q.drift().values())  # no reference
    q.set_reference(reference_from(x, y))
    q.record_batch(
        tiny_model,
        pixels(x[: MIN_DRIFT_SAMPLES - 1]),
        one_hot(y[: MIN_DRIFT_SAMPLES - 1]),
        singles(y[: MIN_DRIFT_SAMPLES - 1]),
    )
    assert all(math.isnan(v) for v in q.drift().values())
    q.record_batch(tiny_model, pixels(x[:1]), one_hot(y[:1]), singles(y[:1]))
    assert all(math.isfinite(v) for v in q.drift().values())
    small = Quality(10, window=50)  # a window below the minimum still scores when full
    small.set_reference(reference_from(x, y))
    small.record_batch(tiny_model, pixels(x[:50]), one_hot(y[:50]), singles(y[:50]))
    assert all(math.isfinite(v) for v in small.drift().values())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 700), min_size=1, max_size=8))
def test_the_window_holds_exactly_the_most_recent_images(batch_sizes: list[int]) -> None:
    """Whatever the batch sizes (smaller or larger than the window), drift = PSI of the last ``window`` images."""
    window = 600
    _, x, y = mnist()
    ref = reference_from(x, y)
    q = Quality(10, window=window)
    q.set_reference(ref)
    rng = np.random.default_rng(len(batch_sizes))
    order = rng.integers(0, len(x), sum(batch_sizes))
    start = 0
    for n in batch_sizes:
        idx = order[start : start + n]
        q.record_batch(None, pixels(x[idx]), one_hot(y[idx]), singles(y[idx]))  # type: ignore[arg-type]
        start += n
    recent = order[-window:]
    drift = q.drift()
    if len(recent) < MIN_DRIFT_SAMPLES:
        assert math.isnan(drift["mean_intensity"])
        return
    means = pixels(x[recent]).mean(axis=1)
    hist, _ = np.histogram(means, bins=ref.mean_intensity_edges)
    classes = np.bincount(y[recent], minlength=10)
    assert drift["mean_intensity"] == pytest.approx(psi(ref.mean_intensity_fractions, hist / hist.sum()))
    assert drift["predicted_class"] == pytest.approx(psi(ref.class_fractions, classes / classes.sum()))


def test_real_digits_stay_below_the_threshold_and_inverted_or_faded_ones_cross_it() -> None:
    train, x, y = mnist()
    ref = reference_from(train, y)
    rng = np.random.default_rng(3)

    def score(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        q = Quality(10, window=2000)
        q.set_reference(ref)
        q.record_batch(None, pixels(images), one_hot(labels), singles(labels))  # type: ignore[arg-type]
        return q.drift()

    idx = rng.choice(len(x), 2000, replace=len(x) < 2000)
    normal = score(x[idx], y[idx])
    assert max(normal.values()) < 0.25, normal  # the alert threshold (0.1 holds on the full set)
    assert score(255 - x[idx], y[idx])["mean_intensity"] > 0.25
    assert score((x[idx] * 0.5).astype(np.uint8), y[idx])["mean_intensity"] > 0.25
    assert score(x[idx], np.full(2000, 1))["predicted_class"] > 0.25  # the model predicting one class only


def test_a_new_reference_restarts_the_window(tiny_model: Model) -> None:
    _, x, y = mnist()
    q = Quality(10, window=1000)
    q.set_reference(reference_from(x, y))
    q.record_batch(tiny_model, pixels(x[:1000]), one_hot(y[:1000]), singles(y[:1000]))
    assert math.isfinite(q.drift()["mean_intensity"])
    q.set_reference(reference_from(x, y))
    assert math.isnan(q.drift()["mean_intensity"])


# ----------------------------------------------------------------------------------------- feedback
def test_feedback_scores_remembered_predictions_once() -> None:
    fb = Feedback(window=3, max_bytes=2 * BYTES_PER_SLOT, rate_per_s=0)  # two slots
    a = fb.remember(np.array([7]))
    b = fb.remember(np.array([1, 2, 3]))
    assert a != b
    assert fb.score(a, 7, 0, "x") is True
    assert fb.score(a, 7, 0, "x") is True  # a retry: same verdict, counted as a duplicate
    assert fb.score(b, 9, 2, "x") is False
    assert fb.score(b, 2, 1, "y") is True
    assert fb.score(b, 2, 5, "x") is None  # no such image in that request
    assert fb.score("nope", 1, 0, "x") is None
    fb.remember(np.array([4]))
    d = fb.remember(np.array([4]))  # the store is bounded by bytes: the oldest are forgotten
    assert fb.score(b, 1, 0, "x") is None
    assert fb.score(d, 4, 0, "z") is True
    assert fb.remembered_bytes <= fb.max_bytes
    reg = CollectorRegistry()
    reg.register(fb)
    s = samples(reg)
    counts = {lb["outcome"]: v for lb, v in s["mnist_feedback_total"]}
    assert counts == {"correct": 3, "incorrect": 1, "duplicate": 1, "unknown_request": 3, "rate_limited": 0}
    # Rolling over the last 3 scored: False, True, True, from 3 distinct sources.
    assert s["mnist_production_accuracy"][0][1] == pytest.approx(2 / 3)
    assert s["mnist_production_accuracy_samples"][0][1] == 3
    assert s["mnist_feedback_sources"][0][1] == 3
    assert s["mnist_feedback_top_source_share"][0][1] == pytest.approx(1 / 3)


def test_remembered_labels_are_bounded_and_ids_cannot_be_forged() -> None:
    store = Remembered(64 * BYTES_PER_SLOT)  # 64 slots, 2,304 label bytes
    assert store.used_bytes <= 64 * BYTES_PER_SLOT
    ids = [store.add(np.full(1000, i % 10, np.uint8)) for i in range(3)]  # 3,000 labels: the ring wraps
    assert store.get(ids[0], 0) is None  # its labels were overwritten
    assert store.get(ids[1], 999) == 1
    assert store.get(ids[2], 0) == 2
    assert store.get(ids[1], 1000) is None  # no such image
    assert store.get(store.add(np.zeros(5000, np.uint8)), 0) is None  # larger than the whole ring: never kept
    assert store.get(ids[2], 0) == 2  # ... and it took nothing from the others
    assert store.used_bytes <= 64 * BYTES_PER_SLOT
    pid = store.add(np.array([7], np.uint8))
    raw = bytearray(base64.urlsafe_b64decode(pid + "=="))
    raw[-1] ^= 1  # the right slot with a tag one bit off
    forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    for bad in [forged, "", "x", "é", pid[:-2], pid + "AAAA", "A" * 27, "_" * 64]:
        assert store.get(bad, 0) is None, bad
    assert store.get(pid, 0) == 7
    for _ in range(64):  # every slot reused: the oldest id is forgotten, the newest found
        last = store.add(np.array([3], np.uint8))
    assert store.get(pid, 0) is None
    assert store.get(last, 0) == 3


def test_feedback_is_rate_limited_per_client() -> None:
    fb = Feedback(window=100, max_bytes=1 << 20, rate_per_s=2)
    pid = fb.remember(np.zeros(100, np.uint8))
    results = []
    for i in range(10):
        try:
            results.append(fb.score(pid, 0, i, "attacker"))
        except TooManyRequests:
            results.append("429")
    assert results.count("429") >= 5  # a burst of 4 at most, then about 2 per second
    assert fb.score(pid, 0, 50, "someone-else") is True  # other clients are not affected


def test_one_big_request_adds_a_bounded_share_of_the_drift_window(tiny_model: Model) -> None:
    q = Quality(10, window=1000)
    reg = CollectorRegistry()
    reg.register(q)
    q.record_batch(tiny_model, np.zeros((4096, 784), np.float32), one_hot(np.zeros(4096, np.int64)), [(1, 4096)])
    s = samples(reg)
    assert s["mnist_drift_window_images"][0][1] == MAX_IMAGES_PER_REQUEST
    assert s["mnist_drift_window_requests"][0][1] == 1
    assert s["mnist_predictions_total"][0][1] == 4096  # every image still counts in the class statistics
    q.record_batch(tiny_model, np.zeros((5, 784), np.float32), one_hot(np.zeros(5, np.int64)), [(2, 1), (3, 1), (4, 3)])
    assert samples(reg)["mnist_drift_window_requests"][0][1] == 4
    # The chunks of one bulk request (engine calls of 1,024) share its number: 64 images in all, one request.
    for _ in range(3):
        q.record_batch(tiny_model, np.zeros((1024, 784), np.float32), one_hot(np.zeros(1024, np.int64)), [(9, 1024)])
    s = samples(reg)
    assert s["mnist_drift_window_images"][0][1] == MAX_IMAGES_PER_REQUEST + 5 + MAX_IMAGES_PER_REQUEST
    assert s["mnist_drift_window_requests"][0][1] == 5
    # A one-image chunk of a bulk request, finished before its sibling, still counts toward that request's 64.
    q.record_batch(tiny_model, np.zeros((1, 784), np.float32), one_hot(np.zeros(1, np.int64)), [(11, 1)])
    q.record_batch(tiny_model, np.zeros((512, 784), np.float32), one_hot(np.zeros(512, np.int64)), [(11, 512)])
    s = samples(reg)
    assert s["mnist_drift_window_images"][0][1] == 2 * MAX_IMAGES_PER_REQUEST + 5 + MAX_IMAGES_PER_REQUEST
    # Whole requests (interactive batches) need no tally: one image each, or their first 64.
    q.record_batch(tiny_model, np.zeros((3, 784), np.float32), one_hot(np.zeros(3, np.int64)), [(20, 1), (21, 1), (22, 1)],
                   whole=True)  # fmt: skip
    q.record_batch(tiny_model, np.zeros((101, 784), np.float32), one_hot(np.zeros(101, np.int64)), [(23, 1), (24, 100)],
                   whole=True)  # fmt: skip
    s = samples(reg)
    assert s["mnist_drift_window_images"][0][1] == 3 * MAX_IMAGES_PER_REQUEST + 5 + 3 + 1 + MAX_IMAGES_PER_REQUEST
    assert s["mnist_drift_window_requests"][0][1] == 11


def test_quality_exposition_before_and_after_traffic(tiny_model: Model) -> None:
    reg = CollectorRegistry()
    q = Quality(10, window=100)
    reg.register(q)
    s = samples(reg)
    assert [lb["class"] for lb, _ in s["mnist_predictions_total"]] == [str(c) for c in range(10)]
    assert {lb["feature"] for lb, _ in s["mnist_drift_score"]} == {"mean_intensity", "predicted_class"}
    probs = one_hot(np.array([3, 3, 5]), confidence=0.95)
    probs[2] = one_hot(np.array([5]), confidence=0.45)[0]
    q.record_batch(tiny_model, np.zeros((3, 784), np.float32), probs, [(5, 1), (6, 1), (7, 1)])
    s = samples(reg)
    preds = {lb["class"]: v for lb, v in s["mnist_predictions_total"]}
    assert preds == {str(c): {3: 2, 5: 1}.get(c, 0) for c in range(10)}
    conf = {lb["le"]: v for lb, v in s["mnist_prediction_confidence_bucket"]}
    assert [conf["0.4"], conf["0.5"], conf["0.95"], conf["+Inf"]] == [0, 1, 3, 3]
    assert len(conf) == len(CONFIDENCE_BUCKETS) + 1
    assert s["mnist_drift_window_images"][0][1] == 3


@pytest.mark.parametrize(
    ("method", "path", "label", "inference"),
    [
        ("POST", "/v1/predict", "/v1/predict", True),
        ("POST", "/v1/predict/batch", "/v1/predict/batch", True),
        ("GET", "/v1/predict", "/v1/predict", False),  # a 405: no engine work
        ("POST", "/v1/feedback", "/v1/feedback", False),
        ("POST", "/v2/models/mnist-mlp/infer", "/v2/infer", True),
        ("POST", "/v2/models/mnist-mlp/versions/1/infer", "/v2/infer", True),
        ("GET", "/v2/health/ready", "/v2/health", False),
        ("GET", "/v2/models/mnist-mlp/ready", "/v2/health", False),
        ("GET", "/v2/models/mnist-mlp", "/v2/metadata", False),
        ("POST", "/admin/models/reload", "/admin", False),
        ("GET", "/docs", "/", False),
        ("POST", "/v1/predictions", "other", False),  # a 404, not a prediction
        ("POST", "/anything/infer", "other", False),
    ],
)
def test_every_path_maps_to_one_bounded_route_and_only_inference_routes_count_as_inference(
    method: str, path: str, label: str, inference: bool
) -> None:
    assert route_label(path) == label
    assert label in ROUTES
    assert is_inference(method, path) is inference
