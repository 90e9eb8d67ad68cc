"""PNG plots of a run: throughput vs concurrency, latency percentiles vs throughput, bulk vs the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.report import Point, points_of

_DESIGNS = ("service", "lean", "careful", "classic", "ceiling", "asgi")
_EXTRA = ("service-uvloop", "service-granian", "asgi-granian", "proto")
_COLORS = {"service": "tab:blue", "lean": "tab:green", "careful": "tab:orange", "classic": "tab:red", "ceiling": "tab:gray", "asgi": "k",
           "service-uvloop": "tab:cyan", "service-granian": "tab:purple", "asgi-granian": "tab:brown", "proto": "tab:olive"}  # fmt: skip
_CANNED = ("ceiling", "asgi", "asgi-granian", "proto")


def title_of(result: dict[str, Any]) -> str:
    """The plots' title: model, cores, loop, and the load average the run started under."""
    m, mach = result["model"], result["machine"]
    load = mach.get("loadavg_start", [0.0])[0]
    return (f"{m['name']}/{m['version']}, {mach['cores']} cores, {result.get('loop', '?')} loop, "
            f"load avg {load:.1f} at start")  # fmt: skip


def _series(points: list[Point], design: str, workload: str) -> list[Point]:
    chosen = (p for p in points if p.design == design and p.workload == workload and not p.note)
    return sorted(chosen, key=lambda p: p.concurrency)


def throughput_vs_concurrency(points: list[Point], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for design in _DESIGNS + _EXTRA:
        s = _series(points, design, "json")
        if s:
            ax.plot(
                [p.concurrency for p in s],
                [p.rps for p in s],
                ("o--" if design in _CANNED else "o-") if design in _DESIGNS else "D:",
                color=_COLORS[design],
                label=f"{design} (JSON)",
            )
    s = _series(points, "service", "png")
    if s:
        ax.plot([p.concurrency for p in s], [p.rps for p in s], "s:", color=_COLORS["service"], label="service (PNG)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent connections")
    ax.set_ylabel("requests/s (single image, log)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_vs_throughput(points: list[Point], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for design in _DESIGNS[:4]:  # the bare-ASGI line would squash the others
        s = _series(points, design, "json")
        if not s:
            continue
        x = [p.rps for p in s]
        ax.plot(x, [p.p50_ms for p in s], "o-", color=_COLORS[design], label=f"{design} p50")
        ax.plot(x, [p.p99_ms for p in s], "^--", color=_COLORS[design], label=f"{design} p99", alpha=0.7)
        for p in s:
            ax.annotate(f"c{p.concurrency}", (p.rps, p.p99_ms), fontsize=7, alpha=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("requests/s (single-image JSON)")
    ax.set_ylabel("latency, ms (log)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bulk_vs_engine(points: list[Point], engine_best: float | None, path: Path, title: str) -> None:
    bulk = [p for p in points if p.design == "service" and p.workload.startswith("bulk-") and not p.note]
    if not bulk:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("bulk-raw", "o-"), ("bulk-json", "s--")):
        for c in sorted({p.concurrency for p in bulk}):
            s = sorted(
                (p for p in bulk if p.workload.startswith(kind) and p.concurrency == c),
                key=lambda p: p.images_per_request,
            )
            if s:
                ax.plot([p.images_per_request for p in s], [p.images_per_s for p in s], marker, label=f"{kind} c={c}")
    if engine_best:
        ax.axhline(engine_best, color="k", linestyle=":", label="best engine point (in-process ONNX Runtime)")
        ax.axhline(0.8 * engine_best, color="k", linestyle="-.", alpha=0.4, label="80% of it")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("images per request")
    ax.set_ylabel("images/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(points: list[Point], engine_best: float | None, out: Path, title: str) -> None:
    throughput_vs_concurrency(points, out / "throughput_vs_concurrency.png", title)
    latency_vs_throughput(points, out / "latency_vs_throughput.png", title)
    bulk_vs_engine(points, engine_best, out / "bulk_vs_engine.png", title)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.plots RESULTS_JSON [OUT_DIR]``: redraw the plots of an earlier run."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    results = Path(args[0])
    out = Path(args[1]) if len(args) > 1 else results.parent
    r = json.loads(results.read_text())
    points = points_of(r)
    best = r.get("engine", {}).get("best", {}).get("images_per_s")
    write_all(points, best, out, title_of(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
