"""mnist-loadtest end to end: locust headless against a real server, its CSV/HTML, and its SLO exit code."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.run import is_loopback
from tests.helpers import ROOT, running_server, write_model


def _loadtest(*args: str, digits: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    if digits is not None:
        env["MNIST_LOADTEST_DIGITS"] = str(digits)
    return subprocess.run(
        [sys.executable, "-m", "loadtest.run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _requests(stats_csv: Path) -> tuple[int, int]:
    with stats_csv.open(newline="") as f:
        agg = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    return int(agg["Request Count"]), int(agg["Failure Count"])


@pytest.mark.slow
def test_loadtest_meets_a_loose_slo_and_misses_an_impossible_one(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    folder = write_model(repo, "tiny", "1")
    with running_server(repo, tmp_path, "--no-access-log") as server:
        ok_dir = tmp_path / "ok"
        ok = _loadtest(
            "--host",
            server.url,
            "--profile",
            "mixed",
            "--users",
            "20",
            "--spawn-rate",
            "20",
            "--run-time",
            "4s",
            "--out",
            str(ok_dir),
            "--p99-ms",
            "5000",
            "--max-error-ratio",
            "0",
            digits=folder / "metadata.json",
        )
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert (ok_dir / "report.html").stat().st_size > 1000
        n, failures = _requests(ok_dir / "locust_stats.csv")
        assert n > 0
        assert failures == 0
        assert "PASS  p99" in ok.stdout

        bad_dir = tmp_path / "impossible"
        bad = _loadtest(
            "--host",
            server.url,
            "--profile",
            "json",
            "--users",
            "4",
            "--run-time",
            "3s",
            "--out",
            str(bad_dir),
            "--p99-ms",
            "0.001",
            digits=folder / "metadata.json",
        )
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert "MISS  p99" in bad.stdout
        assert (bad_dir / "locust_stats.csv").exists()
        assert (bad_dir / "report.html").exists()
        assert _requests(bad_dir / "locust_stats.csv")[0] > 0
        assert server.terminate() == 0


def test_loadtest_refuses_a_remote_target(tmp_path: Path) -> None:
    r = _loadtest("--host", "http://192.0.2.10:8000", "--run-time", "1s", "--out", str(tmp_path), timeout=30)
    assert r.returncode == 2
    assert "refusing non-loopback" in r.stderr
    assert not (tmp_path / "locust_stats.csv").exists()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000", True),
        ("http://localhost:8000", True),
        ("http://[::1]:8000", True),
        ("http://127.3.4.5", True),
        ("http://10.0.0.1:8000", False),
        ("https://example.com", False),
        ("not a url", False),
    ],
)
def test_is_loopback(url: str, expected: bool) -> None:
    assert is_loopback(url) is expected
