"""Read the service's own Prometheus counters: the authoritative count of what it answered."""

from __future__ import annotations

import urllib.request
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of ``url``/metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def statuses(before: Samples, after: Samples, route: str) -> Counter[int]:
    """HTTP statuses answered on ``route`` between two scrapes."""
    counts: Counter[int] = Counter()
    for (name, labels), value in after.items():
        if name == "http_requests_total":
            d = dict(labels)
            if d.get("route") == route:
                delta = value - before.get((name, labels), 0.0)
                if delta:
                    counts[int(d["status"])] += int(delta)
    return counts


def dropped(before: Samples, after: Samples) -> Counter[str]:
    """``mnist_requests_dropped_total`` by reason between two scrapes."""
    counts: Counter[str] = Counter()
    for (name, labels), value in after.items():
        if name == "mnist_requests_dropped_total":
            delta = value - before.get((name, labels), 0.0)
            if delta:
                counts[dict(labels)["reason"]] += int(delta)
    return counts


def value(sample: Samples, name: str, **labels: str) -> float:
    return float(sample.get((name, tuple(sorted(labels.items()))), 0.0))
