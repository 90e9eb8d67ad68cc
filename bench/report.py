"""Points, the printed table, and the targets as ratios measured in one run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Point:
    design: str  # service, classic, careful, ceiling, asgi, service-uvloop, service-granian, asgi-granian, ...
    workload: str  # json, png, bulk-raw-1024, bulk-json-256, ...
    concurrency: int
    images_per_request: int
    rps: float  # answered without error, per second
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    p999_ms: float
    latency_mean_ms: float
    latency_max_ms: float
    requests: int
    errors: int
    errors_status: int
    errors_socket: int
    duration_s: float
    wrk_cpu_util: float
    server_cpu_util: float
    server_rss_peak_mb: float
    mean_batch: float | None
    engine_calls: int
    note: str = ""
    repeats_rps: list[float] = field(default_factory=list)  # every repeat's req/s; the best one is reported
    server_cpu_s: float = 0.0  # CPU-seconds of the server (all its threads and processes) over the point
    server_rss_tree_peak_mb: float = 0.0  # every process of the server together (granian: supervisor + worker)
    server_processes: int = 1
    inline_batches: int | None = None  # engine calls run on the event loop during the point (the service only)
    inline_max_ms: float | None = None  # the longest of them since the service started: the loop's worst stall
    loop_thread_cpu_util: float = 0.0  # the event loop thread's CPU in cores (1.0: that thread is saturated)
    loop: str = ""  # the event loop the server ran
    server: str = ""  # uvicorn, granian, or httptools (proto: no ASGI server)

    @property
    def req_per_cpu_s(self) -> float:
        """Requests per CPU-second of the server: the work per request, less sensitive to a shared machine."""
        return self.rps / self.server_cpu_util if self.server_cpu_util > 0 else 0.0

    @property
    def cpu_us_per_request(self) -> float:
        """Server CPU per answered request, in microseconds (CPU-seconds / requests)."""
        return 1e6 / self.req_per_cpu_s if self.req_per_cpu_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "req_per_cpu_s": self.req_per_cpu_s, "cpu_us_per_request": self.cpu_us_per_request}


def best_of_repeats(points: list[Point]) -> list[Point]:
    """One point per (design, workload, concurrency, note): the repeat with the highest req/s.

    On a shared machine noise only ever slows a run down, so the best repeat is the closest to what the
    design can do; every repeat's req/s stays in ``repeats_rps``."""
    groups: dict[tuple[str, str, int, str], list[Point]] = {}
    for p in points:
        groups.setdefault((p.design, p.workload, p.concurrency, p.note), []).append(p)
    out = []
    for group in groups.values():
        top = max(group, key=lambda p: p.rps)
        top.repeats_rps = [round(p.rps, 1) for p in group]
        out.append(top)
    return out


@dataclass
class Target:
    name: str
    measured: float | None
    goal: float
    unit: str
    higher_is_better: bool
    detail: str = ""

    @property
    def passed(self) -> bool:
        if self.measured is None:
            return False
        return self.measured >= self.goal if self.higher_is_better else self.measured <= self.goal

    @property
    def margin(self) -> str:
        """How far from the goal, as a percentage of the goal (+ = better than needed)."""
        if self.measured is None or self.goal == 0:
            return "n/a"
        rel = (self.measured - self.goal) / self.goal * (1 if self.higher_is_better else -1)
        return f"{rel * 100:+.0f}%"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "margin": self.margin}


def find(points: list[Point], design: str, workload: str, concurrency: int, note: str = "") -> Point | None:
    """The point of the plain sweep (``note`` empty) unless a note is asked for."""
    for p in points:
        if (p.design, p.workload, p.concurrency, p.note) == (design, workload, concurrency, note):
            return p
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def targets(points: list[Point], engine_best_ips: float | None, c_high: int = 64, c_low: int = 1,
            bulk: int = 1024, mixed_p99_ms: float | None = None, design: str = "service") -> list[Target]:  # fmt: skip
    """The issue's targets for ``design`` (the service; ``lean`` for the reference of what the work alone does)."""
    svc, classic = find(points, design, "json", c_high), find(points, "classic", "json", c_high)
    ceiling, asgi = find(points, "ceiling", "json", c_high), find(points, "asgi", "json", c_high)
    svc1, classic1 = find(points, design, "json", c_low), find(points, "classic", "json", c_low)
    bulk_pt = find(points, design, f"bulk-raw-{bulk}", 2)
    service_points = [p for p in points if p.design == design and "py-spy" not in p.note]
    rss = max(service_points, key=lambda p: p.server_rss_peak_mb, default=None)

    def rps(p: Point | None) -> float | None:
        return p.rps if p else None

    def vs(a: Point | None, b: Point | None) -> str:
        return f"{rps(a) or 0:.0f} vs {rps(b) or 0:.0f} req/s"

    return [
        Target(f"json c={c_high}: req/s vs classic", _ratio(rps(svc), rps(classic)), 5.0, "x", True, vs(svc, classic)),
        Target(f"json c={c_high}: req/s vs FastAPI canned route", _ratio(rps(svc), rps(ceiling)), 1.2, "x", True,
               vs(svc, ceiling)),
        Target(f"json c={c_high}: req/s vs bare ASGI canned answer", _ratio(rps(svc), rps(asgi)), 0.4, "x", True,
               vs(svc, asgi)),
        Target(f"json c={c_high}: p99 latency", svc.p99_ms if svc else None, 20.0, "ms", False),
        Target(f"json c={c_high}: errors", float(svc.errors) if svc else None, 0.0, "", False,
               f"of {svc.requests if svc else 0} requests"),
        Target(
            f"json c={c_low}: p50 vs classic p50",
            _ratio(svc1.p50_ms if svc1 else None, classic1.p50_ms if classic1 else None),
            0.6,
            "x",
            False,
            f"{svc1.p50_ms if svc1 else 0:.3f} vs {classic1.p50_ms if classic1 else 0:.3f} ms",
        ),
        Target(
            f"bulk-raw-{bulk} c=2: share of the best engine point",
            _ratio(bulk_pt.images_per_s if bulk_pt else None, engine_best_ips),
            0.8,
            "x",
            True,
            f"{bulk_pt.images_per_s if bulk_pt else 0:.0f} vs {engine_best_ips or 0:.0f} images/s",
        ),
        Target("single image (json c=1) beside bulk: p99", mixed_p99_ms, 5.0, "ms", False,
               f"beside bulk-raw-{bulk} c=2"),
        Target(
            f"json c={c_high}: server CPU per request vs FastAPI canned route",
            _ratio(svc.cpu_us_per_request if svc else None, ceiling.cpu_us_per_request if ceiling else None),
            1.0,
            "x",
            False,
            f"{svc.cpu_us_per_request if svc else 0:.0f} vs {ceiling.cpu_us_per_request if ceiling else 0:.0f} us",
        ),
        Target("peak RSS, every service load", rss.server_rss_peak_mb if rss else None, 150.0, "MB", False,
               f"highest at {rss.workload} c={rss.concurrency} {rss.note}".rstrip() if rss else ""),
    ]  # fmt: skip


def reference_targets(points: list[Point], c_high: int = 64, c_low: int = 1) -> list[Target]:
    """The single-image targets met by ``lean`` (the least a batching server of this model can be, no features)
    in the same run: whether a target is within reach of the work itself on this machine."""
    return [t for t in targets(points, None, c_high, c_low, design="lean") if t.name.startswith("json")]


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(points: list[Point]) -> str:
    head = (
        f"{'design':<18} {'workload':<15} {'conc':>5} {'req/s':>9} {'images/s':>10} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'errors':>6} {'batch':>6} {'srv cpu':>7} {'us/req':>7} {'rss MB':>7} {'gen cpu':>7}"
    )
    lines = [head, "-" * len(head)]
    for p in points:
        lines.append(
            f"{p.design:<18} {p.workload:<15} {p.concurrency:>5} {p.rps:>9.0f} {p.images_per_s:>10.0f} "
            f"{p.p50_ms:>8.2f} {p.p95_ms:>8.2f} {p.p99_ms:>8.2f} {p.errors:>6} {_fmt(p.mean_batch, '6.1f'):>6} "
            f"{p.server_cpu_util:>7.2f} {p.cpu_us_per_request:>7.0f} {p.server_rss_peak_mb:>7.0f} {p.wrk_cpu_util:>7.2f}"
            + (f"  {p.note}" if p.note else "")
        )
    return "\n".join(lines)


def targets_table(ts: list[Target]) -> str:
    lines = []
    for t in ts:
        op = ">=" if t.higher_is_better else "<="
        value = "-" if t.measured is None else f"{t.measured:.3g}{t.unit}"
        status = "PASS" if t.passed else "MISS"
        lines.append(f"{status}  {t.name:<44} {value:>10} (goal {op} {t.goal:g}{t.unit}, {t.margin:>5})  {t.detail}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- markdown
def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _n(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def _v(v: object) -> str:
    """A figure in running text: whole numbers from 100 up, three significant digits below."""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def _targets_md(targets: list[dict[str, Any]], head: str, words: tuple[str, str]) -> list[str]:
    """A markdown table of targets (``Target.to_dict()``); ``words``: what a met and a missed target read."""
    rows = [
        _md_row([head, "measured", "goal", "", "margin", "detail"]),
        _md_row(["---", "---:", "---:", "---", "---:", "---"]),
    ]
    for t in targets:
        op = ">=" if t["higher_is_better"] else "<="
        value = "-" if t["measured"] is None else f"{t['measured']:.3g}{t['unit']}"
        rows.append(_md_row([t["name"], value, f"{op} {t['goal']:g}{t['unit']}", words[0] if t["passed"] else words[1],
                             t["margin"], t["detail"]]))  # fmt: skip
    return rows


def points_of(result: dict[str, Any]) -> list[Point]:
    """The points of a results.json (fields a later version added are left out)."""
    fields = set(Point.__dataclass_fields__)
    return [Point(**{k: v for k, v in p.items() if k in fields}) for p in result["points"]]


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/performance.md, from one run's results.json (``python -m bench.report FILE``; with
    several files, the table of those runs side by side instead)."""
    points = points_of(result)
    out: list[str] = []
    mach = result["machine"]
    out.append(
        f"Run: `{result.get('command', 'mnist-bench')}`, started {result.get('started_utc', '?')}, "
        f"{result.get('elapsed_s', 0):.0f} s; load average {mach['loadavg_start'][0]:.2f} at the start, "
        f"{mach.get('loadavg_end', [0])[0]:.2f} at the end; event loop `{result.get('loop')}` for every design "
        f"unless named; ONNX Runtime {mach['onnxruntime']}, Python {mach['python']}, {mach['cores']} cores."
    )
    git = result.get("git") or {}
    if git.get("commit"):
        dirty = git.get("uncommitted") or []
        out[-1] += f" Code: commit `{git['commit'][:12]}`" + (
            f", with uncommitted changes to {', '.join(dirty)}."
            if dirty
            else ", no uncommitted change to `service/` or `bench/`."
        )
    out.append("")
    head = ["design", "server", "loop", "workload", "conc", "req/s", "images/s", "p50 ms", "p95 ms", "p99 ms",
            "errors", "batch", "srv cpu", "loop thread", "CPU us/req", "rss MB", "gen cpu"]  # fmt: skip
    out.append(_md_row(head))
    out.append(_md_row(["---"] * 4 + ["---:"] * (len(head) - 4)))
    for p in points:
        name = p.design + (f" ({p.note})" if p.note else "")
        out.append(_md_row([
            name, p.server, p.loop, p.workload, str(p.concurrency), _n(p.rps), _n(p.images_per_s),
            _n(p.p50_ms, ".2f"), _n(p.p95_ms, ".2f"), _n(p.p99_ms, ".2f"), str(p.errors),
            _n(p.mean_batch, ".1f"), _n(p.server_cpu_util, ".2f"), _n(p.loop_thread_cpu_util, ".2f"),
            _n(p.cpu_us_per_request), _n(p.server_rss_peak_mb), _n(p.wrk_cpu_util, ".2f"),
        ]))  # fmt: skip
    out.append("")
    out += _targets_md(result["targets"], "target", ("PASS", "**MISS**"))
    if result.get("lean_targets"):
        out.append("")
        out.append(
            "The same single-image targets for `lean` (the work alone, none of the service's features; a "
            "reference, not a result of the service):"
        )
        out.append("")
        out += _targets_md(result["lean_targets"], "target (lean)", ("met", "missed"))
    eng = result.get("engine")
    if eng:
        out.append("")
        out.append("Engine sweep (in-process ONNX Runtime, images/s; best of the rounds):")
        out.append("")
        batches = sorted({e["batch"] for e in eng["points"]})
        out.append(_md_row(["config", "threads", "spin", "callers", *[str(b) for b in batches]]))
        out.append(_md_row(["---", "---:", "---", "---:", *["---:"] * len(batches)]))
        for cfg in dict.fromkeys(e["config"] for e in eng["points"]):
            row = {e["batch"]: e for e in eng["points"] if e["config"] == cfg}
            first = next(iter(row.values()))
            out.append(_md_row([cfg, str(first["intra_op_threads"] or "ORT default"), str(first["spinning"]),
                                str(first["callers"]), *[_n(row[b]["images_per_s"]) if b in row else "-"
                                                         for b in batches]]))  # fmt: skip
        out.append("")
        for e in eng.get("beside_bulk", []):
            out.append(f"- beside the bulk points: {e['config']} batch {e['batch']}: {e['images_per_s']:.0f} images/s")
        b = eng["best"]
        out.append(f"- best: **{b['images_per_s']:.0f} images/s** ({b['config']}, batch {b['batch']})")
    out.append("")
    for row in result.get("loops", []):
        out.append(f"- loop `{row['loop']}` ({row['design']}): " + ", ".join(
            f"{k} {_v(v)}" for k, v in row.items() if k not in ("design", "loop")))  # fmt: skip
    for row in result.get("servers_compared", []):
        out.append(f"- {row['app']} c={row['concurrency']}: " + ", ".join(
            f"{k} {_v(v)}" for k, v in row.items() if k not in ("app", "concurrency")))  # fmt: skip
    for d, v in result.get("inline", {}).items():
        n, mx = v.get("mnist_inline_batches_total"), v.get("mnist_inline_batch_max_seconds")
        if n is not None and mx is not None:
            out.append(f"- inline batches, {d}: {n:.0f} in the run, worst event-loop stall {mx * 1e6:.0f} us")
    m = result.get("mixed")
    if m:
        out.append(f"- single image c=1 beside {m['bulk_workload']} c={m['bulk_concurrency']}: p50 {m['p50_ms']:.2f} ms, "
                   f"p95 {m['p95_ms']:.2f}, p99 {m['p99_ms']:.2f} ms, errors {m['errors']} (alone: p50 "
                   f"{m['alone_p50_ms']:.2f}, p99 {m['alone_p99_ms']:.2f} ms); bulk {m['bulk_images_per_s']:.0f} "
                   f"images/s, its p99 {m['bulk_p99_ms']:.1f} ms, errors {m['bulk_errors']}")  # fmt: skip
    prof = result.get("profile") or {}
    for name, summary in prof.items():
        if not summary:
            continue
        out.append("")
        out.append(f"Profile `{name}` ({summary['samples']} samples): threads {summary['threads']}")
        out.append("- own: " + "; ".join(f"{k} {v * 100:.1f}%" for k, v in summary["own"]))
        out.append("- inclusive: " + "; ".join(f"{k} {v * 100:.1f}%" for k, v in summary["inclusive"]))
        loop = summary.get("loop") or {}
        if loop.get("busy_by_area"):
            out.append(f"- event-loop thread ({loop['samples']} samples, idle {loop['idle'] * 100:.1f}%), busy by "
                       "area: " + "; ".join(f"{k} {v * 100:.1f}%" for k, v in loop["busy_by_area"]))  # fmt: skip
        bulk = summary.get("bulk_threads") or {}
        if bulk.get("busy_by_area"):
            out.append(f"- bulk engine threads ({bulk['samples']} samples; `concurrent` = waiting for work), by "
                       "area: " + "; ".join(f"{k} {v * 100:.1f}%" for k, v in bulk["busy_by_area"]))  # fmt: skip
    return "\n".join(out)


#: Column heads of the runs table, by target name (the goal in brackets); the errors target is left out.
_RUN_COLUMNS = {
    "req/s vs classic": "vs classic (5x)",
    "req/s vs FastAPI canned route": "vs canned (1.2x)",
    "req/s vs bare ASGI canned answer": "vs asgi (0.4x)",
    "p99 latency": "p99 ms (20)",
    "p50 vs classic p50": "c=1 p50 ratio (0.6x)",
    "share of the best engine point": "bulk share (0.8x)",
    "beside bulk: p99": "beside bulk p99 ms (5)",
    "server CPU per request vs FastAPI canned route": "CPU/req ratio (1x)",
    "peak RSS, every service load": "peak RSS MB (150)",
}


def runs_table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """One row per run of ``mnist-bench`` (file name, results), in the order given: when it started, its code, the
    bare ASGI answer's and the service's req/s at its high concurrency, and each target's measured value."""
    heads = list(_RUN_COLUMNS.values())
    out = [_md_row(["run (UTC)", "file", "code", "`asgi` req/s", "service req/s", *heads]),
           _md_row(["---", "---", "---", *["---:"] * (2 + len(heads))])]  # fmt: skip
    for name, result in runs:
        high = result.get("options", {}).get("high", 64)
        measured = {}
        for t in result.get("targets", []):
            key = next((k for k in _RUN_COLUMNS if t["name"].endswith(k)), None)
            if key is not None:
                measured[_RUN_COLUMNS[key]] = f"{t['measured']:.3g}"
        rps = {p["design"]: p["rps"] for p in result.get("points", [])
               if (p["workload"], p["concurrency"], p.get("note", "")) == ("json", high, "")}  # fmt: skip
        git = result.get("git") or {}
        out.append(_md_row([result.get("started_utc", "?")[:16].replace("T", " "), f"`{name}`",
                            f"`{str(git.get('commit', '?'))[:7]}`", *[_n(rps.get(d)) for d in ("asgi", "service")],
                            *[measured.get(h, "-") for h in heads]]))  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    if len(sys.argv) == 2:
        print(markdown(json.loads(Path(sys.argv[1]).read_text())))
    else:  # several runs: the table that sets them side by side
        print(runs_table([(Path(a).name, json.loads(Path(a).read_text())) for a in sys.argv[1:]]))
