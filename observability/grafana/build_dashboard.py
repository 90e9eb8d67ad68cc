"""Writes dashboards/mnist-service.json, the Grafana dashboard of the MNIST service, with Grafana's Foundation SDK.

    .venv/bin/python observability/grafana/build_dashboard.py          # rewrite the JSON
    .venv/bin/python observability/grafana/build_dashboard.py --check  # exit 1 if the JSON is stale

Panels, queries, units, thresholds and options are the SDK's typed builders and enums (grafana-foundation-sdk,
types generated from Grafana 11.6's schemas, in the ``dev`` extra); mypy checks this file like the rest. The
committed JSON is what Grafana's provisioning loads; tests/test_observability.py checks it equals this output
and runs every panel's query against a real Prometheus scraping the real service. Every query selects
``job="$job", instance=~"$instance"``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, common, heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models import prometheus as pm

OUT = Path(__file__).resolve().parent / "dashboards" / "mnist-service.json"
SEL = 'job="$job", instance=~"$instance"'
RI = "$__rate_interval"
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
#: The alert rules' quorums (observability/prometheus/rules/mnist-alerts.yml), drawn as threshold lines.
DRIFT_MIN_REQUESTS = 30
ACCURACY_MIN_SAMPLES = 200
ACCURACY_MIN_SOURCES = 5
DRIFT_MIN_IMAGES = 500  # below it the service reports the PSI as NaN

PanelBuilder = timeseries.Panel | stat.Panel | heatmap.Panel | bargauge.Panel


def q(
    expr: str, legend: str = "__auto", *, instant: bool = False, heatmap_format: bool = False
) -> prometheus.Dataquery:
    """One PromQL target (refId and datasource are set when the panel is placed)."""
    target = prometheus.Dataquery().expr(expr).legend_format(legend)
    target = target.instant() if instant else target.range()
    if heatmap_format:
        target = target.format(pm.PromQueryFormat.HEATMAP)
    return target


def quantile(p: str, metric: str, extra: str = "", by: str = "le") -> str:
    return f"histogram_quantile({p}, sum by ({by}) (rate({metric}_bucket{{{SEL}{extra}}}[{RI}])))"


def steps(*pairs: tuple[str, float | None]) -> gd.ThresholdsConfig:
    return gd.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps([dm.Threshold(v, c) for c, v in pairs])


def ts(title: str, description: str, targets: list[prometheus.Dataquery], unit: str = "short", *,
       thresholds: gd.ThresholdsConfig | None = None, min_: float | None = None, max_: float | None = None,
       stack: bool = False) -> timeseries.Panel:  # fmt: skip
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .targets(list(targets))
        .unit(unit)
        .draw_style(cm.GraphDrawStyle.LINE)
        .line_width(1)
        .fill_opacity(10)
        .show_points(cm.VisibilityMode.NEVER)
        .span_nulls(False)
        .stacking(common.StackingConfig().mode(cm.StackingMode.NORMAL if stack else cm.StackingMode.NONE).group("A"))
        .legend(common.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST).placement(cm.LegendPlacement.BOTTOM)
                .show_legend(True))
        .tooltip(common.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
    )  # fmt: skip
    if min_ is not None:
        panel = panel.min(min_)
    if max_ is not None:
        panel = panel.max(max_)
    if thresholds is not None:
        panel = panel.thresholds(thresholds).thresholds_style(
            common.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.LINE_AND_AREA)
        )
    return panel


def st(title: str, description: str, targets: list[prometheus.Dataquery], unit: str = "short", *,
       mappings: list[dm.ValueMapping] | None = None, thresholds: gd.ThresholdsConfig | None = None,
       text_mode: cm.BigValueTextMode = cm.BigValueTextMode.AUTO,
       color_mode: cm.BigValueColorMode = cm.BigValueColorMode.VALUE) -> stat.Panel:  # fmt: skip
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .targets(list(targets))
        .unit(unit)
        .mappings(mappings or [])
        .thresholds(thresholds or steps(("green", None)))
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .color_mode(color_mode)
        .graph_mode(cm.BigValueGraphMode.NONE)
        .text_mode(text_mode)
        .justify_mode(cm.BigValueJustifyMode.AUTO)
        .orientation(cm.VizOrientation.AUTO)
    )


class Layout:
    """Places panels left to right on Grafana's 24-column grid, in rows, with ids and refIds."""

    def __init__(self) -> None:
        self.board = (
            gd.Dashboard("MNIST inference service")
            .uid("mnist-service")
            .description("Performance, batching, infrastructure and production quality of the MNIST ONNX service "
                         "(docs/observability.md).")
            .tags(["mnist", "onnx", "inference"])
            .timezone("browser")
            .editable()
            .tooltip(dm.DashboardCursorSync.CROSSHAIR)
            .refresh("5s")
            .version(1)
            .time("now-15m", "now")
            .timepicker(gd.TimePicker().refresh_intervals(["5s", "10s", "30s", "1m", "5m"]))
        )  # fmt: skip
        self.next_id = 1
        self.x = self.y = self.row_h = 0

    def row(self, title: str) -> None:
        self.y += self.row_h
        self.x = self.row_h = 0
        self.board.with_row(
            gd.Row(title).id(self.next_id).collapsed(False).grid_pos(dm.GridPos(h=1, w=24, x=0, y=self.y))
        )
        self.next_id += 1
        self.y += 1

    def add(self, panel: PanelBuilder, w: int = 8, h: int = 8) -> None:
        if self.x + w > 24:
            self.y += self.row_h
            self.x = self.row_h = 0
        built = panel.id(self.next_id).datasource(DS).grid_pos(dm.GridPos(h=h, w=w, x=self.x, y=self.y)).build()
        for i, target in enumerate(built.targets or []):
            assert isinstance(target, pm.Dataquery)
            target.ref_id = chr(ord("A") + i)
            target.datasource = DS
        self.board.with_panel(_Built(built))
        self.next_id += 1
        self.x += w
        self.row_h = max(self.row_h, h)


class _Built(gd.Panel):
    """A panel already built (and placed): hands it to the dashboard as it is."""

    def __init__(self, panel: dm.Panel) -> None:
        self._internal = panel


def panels(g: Layout) -> None:
    predict = ', route="/v1/predict"'
    # The in-flight limit's 503s are answered before the HTTP metrics see the request (service/server.py).
    refused = f'sum(rate(mnist_requests_dropped_total{{{SEL}, reason="too_many_requests"}}[{RI}]))'
    api = 'route!~"/metrics|/healthz|/readyz"'

    g.row("Overview")
    g.add(st("Readiness", "mnist_ready: 1 when the model is loaded and warm and the service is not draining "
             "(the minimum over the selected instances, so one unready instance shows).",
             [q(f"min(mnist_ready{{{SEL}}})", "ready", instant=True)],
             mappings=[dm.ValueMap({"0": dm.ValueMappingResult(text="NOT READY", color="red"),
                                    "1": dm.ValueMappingResult(text="READY", color="green")})],
             thresholds=steps(("red", None), ("green", 1)), color_mode=cm.BigValueColorMode.BACKGROUND), 4, 4)  # fmt: skip
    g.add(st("Targets up", "Scrape targets answering /metrics (Prometheus's up).",
             [q(f"sum(up{{{SEL}}})", "up", instant=True)],
             thresholds=steps(("red", None), ("green", 1)), color_mode=cm.BigValueColorMode.BACKGROUND), 4, 4)  # fmt: skip
    g.add(st("Serving model and provider", "mnist_model_info == 1: the model version answering by default, its "
             "precision (float32, or the int8 variant) and the active ONNX Runtime execution provider.",
             [q(f"max by (name, version, precision, provider) (mnist_model_info{{{SEL}}} == 1)",
                "{{name}} v{{version}} {{precision}} on {{provider}}", instant=True)],
             text_mode=cm.BigValueTextMode.NAME, color_mode=cm.BigValueColorMode.NONE), 8, 4)  # fmt: skip
    g.add(st("Uptime", "Seconds since the youngest selected process started.",
             [q(f"min(mnist_uptime_seconds{{{SEL}}})", "uptime", instant=True)], unit="s"), 4, 4)  # fmt: skip
    g.add(st("Requests/s", "API requests per second (every route but /metrics).",
             [q(f'sum(rate(http_requests_total{{{SEL}, route!="/metrics"}}[{RI}]))', "req/s", instant=True)],
             unit="reqps"), 4, 4)  # fmt: skip

    g.row("Traffic and latency")
    g.add(ts("Request throughput by route", "HTTP requests per second by route (scrapes of /metrics left out).",
             [q(f'sum by (route) (rate(http_requests_total{{{SEL}, route!="/metrics"}}[{RI}]))', "{{route}}")],
             unit="reqps"))  # fmt: skip
    g.add(ts("Image throughput", "Images run through the model per second, and engine calls (batches) per second.",
             [q(f"sum(rate(mnist_images_processed_total{{{SEL}}}[{RI}]))", "images/s"),
              q(f"sum(rate(mnist_batches_total{{{SEL}}}[{RI}]))", "batches/s")]))  # fmt: skip
    g.add(ts("Latency of /v1/predict (p50, p95, p99)", "Server-side duration of single-image predictions, from the "
             "request duration histogram (buckets from 50 us). MnistHighLatencyP99 fires at p99 > 50 ms.",
             [q(quantile("0.5", "http_request_duration_seconds", predict), "p50"),
              q(quantile("0.95", "http_request_duration_seconds", predict), "p95"),
              q(quantile("0.99", "http_request_duration_seconds", predict), "p99")],
             unit="s", thresholds=steps(("transparent", None), ("red", 0.05))))  # fmt: skip
    g.add(ts("p99 latency by route", "99th percentile duration of every /v1 route (batch requests carry many images).",
             [q(quantile("0.99", "http_request_duration_seconds", ', route=~"/v1/.*"', by="route, le"), "{{route}}")],
             unit="s"))  # fmt: skip
    g.add(ts("Errors by status", "4xx and 5xx answers per second, by status code.",
             [q(f'sum by (status) (rate(http_requests_total{{{SEL}, status=~"[45].."}}[{RI}]))', "{{status}}")],
             unit="reqps", stack=True))  # fmt: skip
    g.add(ts("5xx error ratio", "Share of API requests answered 5xx, the in-flight limit's 503s included "
             "(MnistHighErrorRatio fires above 1 % for 5 minutes).",
             [q(f'(sum(rate(http_requests_total{{{SEL}, status=~"5.."}}[{RI}])) + {refused}) / '
                f"(sum(rate(http_requests_total{{{SEL}, {api}}}[{RI}])) + {refused})", "5xx ratio")],
             unit="percentunit", min_=0, thresholds=steps(("transparent", None), ("red", 0.01))))  # fmt: skip
    g.add(ts("Requests dropped by reason", "Requests refused (queue_full, deadline_unmeetable, too_many_requests, "
             "draining, not_ready), timed out in the queue, cancelled by their caller, or failed in the engine.",
             [q(f"sum by (reason) (rate(mnist_requests_dropped_total{{{SEL}}}[{RI}]))", "{{reason}}")],
             unit="reqps", stack=True))  # fmt: skip
    g.add(ts("Requests in progress", "Requests being served right now, by route.",
             [q(f"sum by (route) (http_requests_in_progress{{{SEL}}})", "{{route}}")]))  # fmt: skip

    g.row("Batching and engine")
    g.add(
        heatmap.Panel()
        .title("Batch size distribution")
        .description("Images per engine call, per interval: how well concurrent requests are batched together.")
        .targets([q(f"sum by (le) (increase(mnist_batch_size_images_bucket{{{SEL}}}[{RI}]))", "{{le}}",
                    heatmap_format=True)])
        .calculate(False)
        .scale_distribution(common.ScaleDistributionConfig().type(cm.ScaleDistribution.LINEAR))
        .y_axis(heatmap.YAxisConfig().axis_placement(cm.AxisPlacement.LEFT).unit("short"))
        .cell_gap(1)
        .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme("Oranges")
               .scale(hm.HeatmapColorScale.EXPONENTIAL).exponent(0.5))
        .mode(cm.TooltipDisplayMode.SINGLE)
        .hide_y_histogram()
        .show_legend()
        .rows_frame(heatmap.RowsHeatmapOptions().layout(cm.HeatmapCellLayout.AUTO))
    )  # fmt: skip
    g.add(ts("Batch size (mean, p50, p99)", "Images per engine call.",
             [q(f"sum(rate(mnist_batch_size_images_sum{{{SEL}}}[{RI}])) / "
                f"sum(rate(mnist_batch_size_images_count{{{SEL}}}[{RI}]))", "mean"),
              q(quantile("0.5", "mnist_batch_size_images"), "p50"),
              q(quantile("0.99", "mnist_batch_size_images"), "p99")]))  # fmt: skip
    g.add(ts("Queue depth", "Images waiting in the batch queue (interactive single images before bulk chunks).",
             [q(f"sum by (queue) (mnist_queue_depth_images{{{SEL}}})", "{{queue}}")], stack=True))  # fmt: skip
    g.add(ts("Queue wait (p50, p99)", "Time from enqueue to the start of the request's engine call "
             "(MnistQueueWaitHigh fires at p99 > 20 ms).",
             [q(quantile("0.5", "mnist_queue_wait_seconds"), "p50"),
              q(quantile("0.99", "mnist_queue_wait_seconds"), "p99")],
             unit="s", thresholds=steps(("transparent", None), ("orange", 0.02))))  # fmt: skip
    g.add(ts("Inference time per engine call (p50, p99)", "Duration of one ONNX Runtime call (a whole batch).",
             [q(quantile("0.5", "mnist_inference_seconds"), "p50"),
              q(quantile("0.99", "mnist_inference_seconds"), "p99")], unit="s"))  # fmt: skip
    g.add(ts("Engine time per image", "Engine seconds per image: the cost that batching amortizes.",
             [q(f"sum(rate(mnist_inference_seconds_sum{{{SEL}}}[{RI}])) / "
                f"sum(rate(mnist_images_processed_total{{{SEL}}}[{RI}]))", "seconds/image")], unit="s"))  # fmt: skip

    g.row("Infrastructure")
    g.add(ts("CPU", "CPU used by each process, in cores.",
             [q(f"sum by (instance) (rate(process_cpu_seconds_total{{{SEL}}}[{RI}]))", "{{instance}}")]), 6)  # fmt: skip
    g.add(ts("Resident memory", "Resident set size of each process.",
             [q(f"sum by (instance) (process_resident_memory_bytes{{{SEL}}})", "{{instance}}")], unit="bytes"), 6)  # fmt: skip
    g.add(ts("Open file descriptors", "Open file descriptors (sockets included) of each process.",
             [q(f"sum by (instance) (process_open_fds{{{SEL}}})", "{{instance}}")]), 6)  # fmt: skip
    g.add(ts("Python GC", "Garbage collections per second, by generation.",
             [q(f"sum by (generation) (rate(python_gc_collections_total{{{SEL}}}[{RI}]))", "gen {{generation}}")]),
          6)  # fmt: skip

    g.row("Model quality")
    g.add(
        bargauge.Panel()
        .title("Predicted class distribution")
        .description("Share of predictions per class over the dashboard's time range (about 10 % each on the test "
                     "set; the drift score's predicted_class feature compares it with the reference).")
        .targets([q(f"sum by (class) (increase(mnist_predictions_total{{{SEL}}}[$__range])) / ignoring(class) "
                    f"group_left sum(increase(mnist_predictions_total{{{SEL}}}[$__range]))", "{{class}}", instant=True)])
        .unit("percentunit")
        .min(0)
        .max(0.3)
        .thresholds(steps(("blue", None)))
        .orientation(cm.VizOrientation.VERTICAL)
        .display_mode(cm.BarGaugeDisplayMode.BASIC)
        .show_unfilled(True)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
    )  # fmt: skip
    g.add(ts("Confidence", "Top-class probability of the predictions: p10 and median, and the share below 0.5 "
             "(uncertain predictions).",
             [q(quantile("0.1", "mnist_prediction_confidence"), "p10"),
              q(quantile("0.5", "mnist_prediction_confidence"), "p50"),
              q(f'sum(rate(mnist_prediction_confidence_bucket{{{SEL}, le="0.5"}}[{RI}])) / '
                f"sum(rate(mnist_prediction_confidence_count{{{SEL}}}[{RI}]))", "share < 0.5")],
             unit="percentunit", min_=0, max_=1))  # fmt: skip
    g.add(ts("Drift score (PSI)", "Population stability index of the recent window vs the training data: per-image "
             "mean intensity, and predicted classes. Below 0.1 stable, 0.1-0.25 moderate, above 0.25 major "
             f"(MnistInputDrift fires after 10 minutes when the window holds {DRIFT_MIN_REQUESTS}+ requests). NaN "
             f"until the window holds {DRIFT_MIN_IMAGES} images.",
             [q(f"max by (feature) (mnist_drift_score{{{SEL}}})", "{{feature}}")], min_=0,
             thresholds=steps(("transparent", None), ("orange", 0.1), ("red", 0.25))))  # fmt: skip
    g.add(ts("Production accuracy", "Accuracy reported through POST /v1/feedback: the rolling window of each process "
             f"(MnistAccuracyDrop fires below 95 % with {ACCURACY_MIN_SAMPLES}+ samples from "
             f"{ACCURACY_MIN_SOURCES}+ distinct clients), and all replicas over the last hour from the counters.",
             [q(f"min by (instance) (mnist_production_accuracy{{{SEL}}})", "rolling {{instance}}"),
              q(f'sum(increase(mnist_feedback_total{{{SEL}, outcome="correct"}}[1h])) / '
                f'sum(increase(mnist_feedback_total{{{SEL}, outcome=~"correct|incorrect"}}[1h]))', "all replicas, 1 h")],
             unit="percentunit", max_=1, thresholds=steps(("red", None), ("transparent", 0.95))), 12)  # fmt: skip
    g.add(ts("Labelled feedback", "Feedback received per second, by outcome (duplicate = a retried feedback; "
             "unknown_request = the prediction is no longer remembered, or another replica served it; rate_limited "
             "= over the per-client feedback rate).",
             [q(f"sum by (outcome) (rate(mnist_feedback_total{{{SEL}}}[{RI}]))", "{{outcome}}")],
             unit="reqps", stack=True), 12)  # fmt: skip

    g.row("Who the quality signals rest on (alert quorums)")
    g.add(ts("Drift window: images and distinct requests", "Images in the drift window of each process and the "
             "distinct requests they came from (one request adds at most 64 images). The PSI is NaN below "
             f"{DRIFT_MIN_IMAGES} images; MnistInputDrift needs {DRIFT_MIN_REQUESTS}+ requests, so one big batch "
             "cannot raise it.",
             [q(f"sum by (instance) (mnist_drift_window_images{{{SEL}}})", "images {{instance}}"),
              q(f"sum by (instance) (mnist_drift_window_requests{{{SEL}}})", "requests {{instance}}")],
             min_=0, thresholds=steps(("transparent", None), ("green", DRIFT_MIN_REQUESTS))), 12)  # fmt: skip
    g.add(ts("Accuracy window: samples and distinct clients", "Feedback samples in the rolling accuracy of each "
             "process and the distinct clients (feedback sources) they came from. MnistAccuracyDrop needs "
             f"{ACCURACY_MIN_SAMPLES}+ samples from {ACCURACY_MIN_SOURCES}+ clients, so one client cannot page.",
             [q(f"sum by (instance) (mnist_production_accuracy_samples{{{SEL}}})", "samples {{instance}}"),
              q(f"sum by (instance) (mnist_feedback_sources{{{SEL}}})", "clients {{instance}}")],
             min_=0, thresholds=steps(("transparent", None), ("green", ACCURACY_MIN_SOURCES))), 12)  # fmt: skip


def variables() -> list[gd.QueryVariable | gd.DatasourceVariable]:
    return [
        gd.DatasourceVariable("datasource").label("Data source").type("prometheus")
        .current(dm.VariableOption(text="Prometheus", value="prometheus")).hide(dm.VariableHide.DONT_HIDE),
        gd.QueryVariable("job").label("Job").datasource(DS)
        .query("label_values(mnist_ready, job)")
        .current(dm.VariableOption(text="mnist-serving", value="mnist-serving"))
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).hide(dm.VariableHide.DONT_HIDE)
        .multi(False).include_all(False).sort(dm.VariableSort.ALPHABETICAL_ASC),
        gd.QueryVariable("instance").label("Instance").datasource(DS)
        .query('label_values(mnist_ready{job="$job"}, instance)')
        .current(dm.VariableOption(text="All", value="$__all"))
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).hide(dm.VariableHide.DONT_HIDE)
        .multi(True).include_all(True).all_value(".*").sort(dm.VariableSort.ALPHABETICAL_ASC),
    ]  # fmt: skip


def build() -> dm.Dashboard:
    g = Layout()
    for variable in variables():
        g.board.with_variable(variable)
    g.board.annotation(
        gd.AnnotationQuery().name("Annotations & Alerts").datasource(dm.DataSourceRef(type_val="grafana",
                                                                                       uid="-- Grafana --"))
        .enable(True).hide(True).icon_color("rgba(0, 211, 255, 1)").type("dashboard").built_in(1)
    )  # fmt: skip
    panels(g)
    return g.board.build()


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (a plain dict)."""
    data: dict[str, Any] = json.loads(json.dumps(build(), cls=JSONEncoder))
    return data


def render() -> str:
    return json.dumps(build(), cls=JSONEncoder, indent=2) + "\n"


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
