"""A smoke run of the benchmark suite in a tiny configuration: it completes, writes a complete JSON, the
plots and the targets, and stops every server it started. No timing is asserted here: speed is what
``mnist-bench`` prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers import ROOT, write_model

POINT_KEYS = {
    "design",
    "workload",
    "concurrency",
    "images_per_request",
    "rps",
    "images_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "errors",
    "mean_batch",
    "server_cpu_util",
    "server_rss_peak_mb",
    "wrk_cpu_util",
}


@pytest.mark.slow
def test_bench_smoke_writes_a_complete_report(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "tiny", "1")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "bench.run",
        "--model-repository",
        str(repo),
        "--out",
        str(out),
        "--duration",
        "1",
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--concurrency",
        "8",
        "--high",
        "8",
        "--bulk-sizes",
        "256",
        "--bulk-json-sizes",
        "64",
        "--bulk-concurrency",
        "1",
        "--mixed-bulk",
        "256",
        "--engine-seconds",
        "0.02",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    result = json.loads((out / "results.json").read_text())
    for pid in (s["pid"] for s in result["servers"].values()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    points = result["points"]
    seen = {(p["design"], p["workload"]) for p in points}
    for design in ("service", "classic", "careful", "ceiling", "asgi", "service+accesslog"):
        assert (design, "json") in seen, design
    assert {("service", "png"), ("service", "bulk-raw-256"), ("service", "bulk-json-64")} <= seen
    for p in points:
        assert p.keys() >= POINT_KEYS
        assert p["rps"] > 0, p
        assert p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"], p
    for p in points:
        if p["design"].startswith("service"):
            assert p["errors"] == 0, p  # good input must never fail
            assert p["mean_batch"] is not None, p  # read from the service's /metrics
            assert p["mean_batch"] >= 1, p
            assert p["server_rss_peak_mb"] > 10, p
    bulk = next(p for p in points if p["workload"] == "bulk-raw-256")
    assert bulk["images_per_s"] == pytest.approx(bulk["rps"] * 256)

    engine = result["engine"]
    assert engine["best"]["images_per_s"] > 0
    assert {(e["intra_op_threads"], e["spinning"]) for e in engine["points"]} == {(1, False), (2, False), (2, True)}
    assert result["mixed"]["bulk_images_per_s"] > 0
    assert result["mixed"]["p99_ms"] > 0

    names = [t["name"] for t in result["targets"]]
    assert len(names) == 9
    for t in result["targets"]:
        assert isinstance(t["passed"], bool)
        assert t["measured"] is not None, t
        assert ("PASS  " + t["name"] if t["passed"] else "MISS  " + t["name"]) in proc.stdout
    for png in ("throughput_vs_concurrency.png", "latency_vs_throughput.png", "bulk_vs_engine.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
