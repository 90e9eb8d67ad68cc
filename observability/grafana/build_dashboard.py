"""Writes dashboards/mnist-service.json, the Grafana dashboard of the MNIST service.

    .venv/bin/python observability/grafana/build_dashboard.py          # rewrite the JSON
    .venv/bin/python observability/grafana/build_dashboard.py --check  # exit 1 if the JSON is stale

The panels are written here in Python (short, reviewable) rather than by hand in 1,500 lines of JSON; the
committed JSON is what Grafana's provisioning loads, and tests/test_metrics_unit.py checks the two agree.
Every query selects ``job="$job", instance=~"$instance"``; tests/test_observability.py runs each one against
a real Prometheus scraping the real service.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "mnist-service.json"
SEL = 'job="$job", instance=~"$instance"'
RI = "$__rate_interval"
DS = {"type": "prometheus", "uid": "${datasource}"}
Panel = dict[str, Any]


def target(expr: str, legend: str = "__auto", *, instant: bool = False, fmt: str | None = None) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "legendFormat": legend, "range": not instant,
                         "instant": instant}  # fmt: skip
    if fmt:
        t["format"] = fmt
    return t


def quantile(q: str, metric: str, extra: str = "", by: str = "le") -> str:
    return f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{SEL}{extra}}}[{RI}])))"


def steps(*pairs: tuple[str, float | None]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in pairs]}


class Layout:
    """Places panels left to right on Grafana's 24-column grid, in rows."""

    def __init__(self) -> None:
        self.panels: list[Panel] = []
        self.y = 0
        self.x = 0
        self.row_h = 0

    def _id(self) -> int:
        return len(self.panels) + 1

    def row(self, title: str) -> None:
        self.y += self.row_h
        self.x = self.row_h = 0
        self.panels.append({"type": "row", "id": self._id(), "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})  # fmt: skip
        self.y += 1

    def add(self, panel: Panel, w: int, h: int) -> None:
        if self.x + w > 24:
            self.y += self.row_h
            self.x = self.row_h = 0
        targets = panel.pop("targets")
        panel = {"id": self._id(), **panel, "datasource": DS, "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
                 "targets": [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)]}  # fmt: skip
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def timeseries(self, title: str, description: str, targets: list[dict[str, Any]], unit: str = "short", *,
                   w: int = 8, h: int = 8, thresholds: dict[str, Any] | None = None, min_: float | None = None,
                   max_: float | None = None, stack: bool = False) -> None:  # fmt: skip
        custom: dict[str, Any] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                                  "spanNulls": False, "stacking": {"mode": "normal" if stack else "none", "group": "A"}}  # fmt: skip
        defaults: dict[str, Any] = {"unit": unit, "custom": custom}
        if min_ is not None:
            defaults["min"] = min_
        if max_ is not None:
            defaults["max"] = max_
        if thresholds:
            defaults["thresholds"] = thresholds
            custom["thresholdsStyle"] = {"mode": "line+area"}
        self.add({"type": "timeseries", "title": title, "description": description, "targets": targets,
                  "fieldConfig": {"defaults": defaults, "overrides": []},
                  "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                              "tooltip": {"mode": "multi", "sort": "desc"}}}, w, h)  # fmt: skip

    def stat(self, title: str, description: str, targets: list[dict[str, Any]], unit: str = "short", *,
             w: int = 4, h: int = 4, mappings: list[dict[str, Any]] | None = None,
             thresholds: dict[str, Any] | None = None, text_mode: str = "auto", color_mode: str = "value") -> None:  # fmt: skip
        self.add({"type": "stat", "title": title, "description": description, "targets": targets,
                  "fieldConfig": {"defaults": {"unit": unit, "mappings": mappings or [],
                                               "thresholds": thresholds or steps(("green", None))}, "overrides": []},
                  "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                              "colorMode": color_mode, "graphMode": "none", "textMode": text_mode,
                              "justifyMode": "auto", "orientation": "auto"}}, w, h)  # fmt: skip


def panels() -> list[Panel]:
    g = Layout()
    predict = ', route="/v1/predict"'
    # The in-flight limit's 503s are answered before the HTTP metrics see the request (service/server.py).
    refused = f'sum(rate(mnist_requests_dropped_total{{{SEL}, reason="too_many_requests"}}[{RI}]))'
    api = 'route!~"/metrics|/healthz|/readyz"'

    g.row("Overview")
    g.stat("Readiness", "mnist_ready: 1 when the model is loaded and warm and the service is not draining "
           "(the minimum over the selected instances, so one unready instance shows).",
           [target(f"min(mnist_ready{{{SEL}}})", "ready", instant=True)],
           mappings=[{"type": "value", "options": {"0": {"text": "NOT READY", "color": "red"},
                                                   "1": {"text": "READY", "color": "green"}}}],
           thresholds=steps(("red", None), ("green", 1)), color_mode="background")  # fmt: skip
    g.stat("Targets up", "Scrape targets answering /metrics (Prometheus's up).",
           [target(f"sum(up{{{SEL}}})", "up", instant=True)],
           thresholds=steps(("red", None), ("green", 1)), color_mode="background")  # fmt: skip
    g.stat("Serving model and provider", "mnist_model_info == 1: the model version answering by default and the "
           "active ONNX Runtime execution provider.",
           [target(f"max by (name, version, provider) (mnist_model_info{{{SEL}}} == 1)",
                   "{{name}} v{{version}} on {{provider}}", instant=True)],
           w=8, text_mode="name", color_mode="none")  # fmt: skip
    g.stat(
        "Uptime",
        "Seconds since the youngest selected process started.",
        [target(f"min(mnist_uptime_seconds{{{SEL}}})", "uptime", instant=True)],
        unit="s",
    )
    g.stat("Requests/s", "API requests per second (every route but /metrics).",
           [target(f'sum(rate(http_requests_total{{{SEL}, route!="/metrics"}}[{RI}]))', "req/s", instant=True)],
           unit="reqps")  # fmt: skip

    g.row("Traffic and latency")
    g.timeseries("Request throughput by route", "HTTP requests per second by route (scrapes of /metrics left out).",
                 [target(f'sum by (route) (rate(http_requests_total{{{SEL}, route!="/metrics"}}[{RI}]))', "{{route}}")],
                 unit="reqps")  # fmt: skip
    g.timeseries("Image throughput", "Images run through the model per second, and engine calls (batches) per second.",
                 [target(f"sum(rate(mnist_images_processed_total{{{SEL}}}[{RI}]))", "images/s"),
                  target(f"sum(rate(mnist_batches_total{{{SEL}}}[{RI}]))", "batches/s")])  # fmt: skip
    g.timeseries("Latency of /v1/predict (p50, p95, p99)", "Server-side duration of single-image predictions, "
                 "from the request duration histogram (buckets from 50 us). MnistHighLatencyP99 fires at p99 > 50 ms.",
                 [target(quantile("0.5", "http_request_duration_seconds", predict), "p50"),
                  target(quantile("0.95", "http_request_duration_seconds", predict), "p95"),
                  target(quantile("0.99", "http_request_duration_seconds", predict), "p99")],
                 unit="s", thresholds=steps(("transparent", None), ("red", 0.05)))  # fmt: skip
    g.timeseries("p99 latency by route", "99th percentile duration of every /v1 route (batch requests carry many images).",
                 [target(quantile("0.99", "http_request_duration_seconds", ', route=~"/v1/.*"', by="route, le"),
                         "{{route}}")], unit="s")  # fmt: skip
    g.timeseries("Errors by status", "4xx and 5xx answers per second, by status code.",
                 [target(f'sum by (status) (rate(http_requests_total{{{SEL}, status=~"[45].."}}[{RI}]))', "{{status}}")],
                 unit="reqps", stack=True)  # fmt: skip
    g.timeseries("5xx error ratio", "Share of API requests answered 5xx, the in-flight limit's 503s included "
                 "(MnistHighErrorRatio fires above 1 % for 5 minutes).",
                 [target(f'(sum(rate(http_requests_total{{{SEL}, status=~"5.."}}[{RI}])) + {refused}) / '
                         f"(sum(rate(http_requests_total{{{SEL}, {api}}}[{RI}])) + {refused})", "5xx ratio")],
                 unit="percentunit", min_=0, thresholds=steps(("transparent", None), ("red", 0.01)))  # fmt: skip
    g.timeseries("Requests dropped by reason", "Requests refused (queue_full, deadline_unmeetable, too_many_requests, "
                 "draining, not_ready), timed out in the queue, cancelled by their caller, or failed in the engine.",
                 [target(f"sum by (reason) (rate(mnist_requests_dropped_total{{{SEL}}}[{RI}]))", "{{reason}}")],
                 unit="reqps", stack=True)  # fmt: skip
    g.timeseries(
        "Requests in progress",
        "Requests being served right now, by route.",
        [target(f"sum by (route) (http_requests_in_progress{{{SEL}}})", "{{route}}")],
    )

    g.row("Batching and engine")
    g.add({"type": "heatmap", "title": "Batch size distribution",
           "description": "Images per engine call, per interval: how well concurrent requests are batched together.",
           "targets": [target(f"sum by (le) (increase(mnist_batch_size_images_bucket{{{SEL}}}[{RI}]))", "{{le}}",
                              fmt="heatmap")],
           "fieldConfig": {"defaults": {"custom": {"scaleDistribution": {"type": "linear"}}}, "overrides": []},
           "options": {"calculate": False, "yAxis": {"axisPlacement": "left", "unit": "short"}, "cellGap": 1,
                       "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5},
                       "tooltip": {"mode": "single", "yHistogram": False}, "legend": {"show": True},
                       "rowsFrame": {"layout": "auto"}}}, 8, 8)  # fmt: skip
    g.timeseries("Batch size (mean, p50, p99)", "Images per engine call.",
                 [target(f"sum(rate(mnist_batch_size_images_sum{{{SEL}}}[{RI}])) / "
                         f"sum(rate(mnist_batch_size_images_count{{{SEL}}}[{RI}]))", "mean"),
                  target(quantile("0.5", "mnist_batch_size_images"), "p50"),
                  target(quantile("0.99", "mnist_batch_size_images"), "p99")])  # fmt: skip
    g.timeseries(
        "Queue depth",
        "Images waiting in the batch queue (interactive single images before bulk chunks).",
        [target(f"sum by (queue) (mnist_queue_depth_images{{{SEL}}})", "{{queue}}")],
        stack=True,
    )
    g.timeseries("Queue wait (p50, p99)", "Time from enqueue to the start of the request's engine call "
                 "(MnistQueueWaitHigh fires at p99 > 20 ms).",
                 [target(quantile("0.5", "mnist_queue_wait_seconds"), "p50"),
                  target(quantile("0.99", "mnist_queue_wait_seconds"), "p99")],
                 unit="s", thresholds=steps(("transparent", None), ("orange", 0.02)))  # fmt: skip
    g.timeseries("Inference time per engine call (p50, p99)", "Duration of one ONNX Runtime call (a whole batch).",
                 [target(quantile("0.5", "mnist_inference_seconds"), "p50"),
                  target(quantile("0.99", "mnist_inference_seconds"), "p99")], unit="s")  # fmt: skip
    g.timeseries("Engine time per image", "Engine seconds per image: the cost that batching amortizes.",
                 [target(f"sum(rate(mnist_inference_seconds_sum{{{SEL}}}[{RI}])) / "
                         f"sum(rate(mnist_images_processed_total{{{SEL}}}[{RI}]))", "seconds/image")], unit="s")  # fmt: skip

    g.row("Infrastructure")
    g.timeseries(
        "CPU",
        "CPU used by each process, in cores.",
        [target(f"sum by (instance) (rate(process_cpu_seconds_total{{{SEL}}}[{RI}]))", "{{instance}}")],
        w=6,
    )
    g.timeseries("Resident memory", "Resident set size of each process.",
                 [target(f"sum by (instance) (process_resident_memory_bytes{{{SEL}}})", "{{instance}}")],
                 unit="bytes", w=6)  # fmt: skip
    g.timeseries(
        "Open file descriptors",
        "Open file descriptors (sockets included) of each process.",
        [target(f"sum by (instance) (process_open_fds{{{SEL}}})", "{{instance}}")],
        w=6,
    )
    g.timeseries("Python GC", "Garbage collections per second, by generation.",
                 [target(f"sum by (generation) (rate(python_gc_collections_total{{{SEL}}}[{RI}]))",
                         "gen {{generation}}")], w=6)  # fmt: skip

    g.row("Model quality")
    g.add({"type": "bargauge", "title": "Predicted class distribution",
           "description": "Share of predictions per class over the dashboard's time range (about 10 % each on the "
                          "test set; the drift score's predicted_class feature compares it with the reference).",
           "targets": [target(f"sum by (class) (increase(mnist_predictions_total{{{SEL}}}[$__range])) / ignoring(class) "
                              f"group_left sum(increase(mnist_predictions_total{{{SEL}}}[$__range]))", "{{class}}",
                              instant=True)],
           "fieldConfig": {"defaults": {"unit": "percentunit", "min": 0, "max": 0.3, "thresholds": steps(("blue", None))},
                           "overrides": []},
           "options": {"orientation": "vertical", "displayMode": "basic", "showUnfilled": True,
                       "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}}, 8, 8)  # fmt: skip
    g.timeseries("Confidence", "Top-class probability of the predictions: p10 and median, and the share below 0.5 "
                 "(uncertain predictions).",
                 [target(quantile("0.1", "mnist_prediction_confidence"), "p10"),
                  target(quantile("0.5", "mnist_prediction_confidence"), "p50"),
                  target(f'sum(rate(mnist_prediction_confidence_bucket{{{SEL}, le="0.5"}}[{RI}])) / '
                         f"sum(rate(mnist_prediction_confidence_count{{{SEL}}}[{RI}]))", "share < 0.5")],
                 unit="percentunit", min_=0, max_=1)  # fmt: skip
    g.timeseries("Drift score (PSI)", "Population stability index of the recent window vs the training data: "
                 "per-image mean intensity, and predicted classes. Below 0.1 stable, 0.1-0.25 moderate, above 0.25 "
                 "major (MnistInputDrift fires after 10 minutes). NaN until the window holds 500 images.",
                 [target(f"max by (feature) (mnist_drift_score{{{SEL}}})", "{{feature}}")], min_=0,
                 thresholds=steps(("transparent", None), ("orange", 0.1), ("red", 0.25)))  # fmt: skip
    g.timeseries("Production accuracy", "Accuracy reported through POST /v1/feedback: the rolling window of each "
                 "process, and all replicas over the last hour (MnistAccuracyDrop fires below 95 % with 200+ samples).",
                 [target(f"min by (instance) (mnist_production_accuracy{{{SEL}}})", "rolling {{instance}}"),
                  target(f'sum(increase(mnist_feedback_total{{{SEL}, outcome="correct"}}[1h])) / '
                         f'sum(increase(mnist_feedback_total{{{SEL}, outcome=~"correct|incorrect"}}[1h]))',
                         "all replicas, 1 h")],
                 unit="percentunit", max_=1, thresholds=steps(("red", None), ("transparent", 0.95)))  # fmt: skip
    g.timeseries("Labelled feedback", "Feedback received per second, by outcome (duplicate = a retried feedback; "
                 "unknown_request = the prediction is no longer remembered, or another replica served it).",
                 [target(f"sum by (outcome) (rate(mnist_feedback_total{{{SEL}}}[{RI}]))", "{{outcome}}")],
                 unit="reqps", stack=True)  # fmt: skip
    g.stat("Drift window", "Images in the drift window of each process (the score is NaN below 500).",
           [target(f"sum by (instance) (mnist_drift_window_images{{{SEL}}})", "{{instance}}", instant=True)],
           w=8, h=8)  # fmt: skip
    return g.panels


ANNOTATIONS = {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
               "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}  # fmt: skip


def dashboard() -> dict[str, Any]:
    variables = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {"text": "Prometheus", "value": "prometheus"}, "hide": 0, "refresh": 1, "options": []},
        {"name": "job", "label": "Job", "type": "query", "datasource": DS,
         "definition": "label_values(mnist_ready, job)",
         "query": {"query": "label_values(mnist_ready, job)", "refId": "job"},
         "current": {"text": "mnist-serving", "value": "mnist-serving"}, "refresh": 2, "hide": 0,
         "multi": False, "includeAll": False, "sort": 1, "options": []},
        {"name": "instance", "label": "Instance", "type": "query", "datasource": DS,
         "definition": 'label_values(mnist_ready{job="$job"}, instance)',
         "query": {"query": 'label_values(mnist_ready{job="$job"}, instance)', "refId": "instance"},
         "current": {"text": "All", "value": "$__all"}, "refresh": 2, "hide": 0, "multi": True,
         "includeAll": True, "allValue": ".*", "sort": 1, "options": []},
    ]  # fmt: skip
    return {
        "uid": "mnist-service",
        "title": "MNIST inference service",
        "description": "Performance, batching, infrastructure and production quality of the MNIST ONNX service "
        "(docs/observability.md).",
        "tags": ["mnist", "onnx", "inference"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "5s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-15m", "to": "now"},
        "timepicker": {"refresh_intervals": ["5s", "10s", "30s", "1m", "5m"]},
        "annotations": {"list": [ANNOTATIONS]},
        "links": [],
        "templating": {"list": variables},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="Write (or --check) the Grafana dashboard JSON.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run {Path(__file__).name}", file=sys.stderr)
            sys.exit(1)
        return
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(dashboard()['panels'])} panels)")


if __name__ == "__main__":
    main()
