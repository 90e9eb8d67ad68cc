"""mnist-loadtest end to end: locust headless against a real server, its CSV/HTML, and its SLO exit code."""

from __future__ import annotations

import csv
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.profiles import MIXED_THINK_S, PROFILES
from loadtest.run import is_loopback
from tests.helpers import ROOT, assert_clean_shutdown, free_port, running_server, write_model


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
        # The mixed profile's think time caps what it offers: 20 users / 1.75 s mean think time.
        assert "offered load: closed loop, 20 users each thinking 0.5-3 s (mean 1.75 s)" in ok.stdout
        assert "about 11.4 req/s in steady state" in ok.stdout

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
        assert_clean_shutdown(server)


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


def test_mixed_profile_offers_users_over_mean_think_time() -> None:
    assert MIXED_THINK_S == (0.5, 3.0)
    assert PROFILES["mixed"].offered_rps(20) == pytest.approx(20 / 1.75)
    assert PROFILES["json"].offered_rps(20) is None
    assert "no think time" in PROFILES["bulk"].describe(4)


def test_loadtest_against_a_dead_port_sends_no_load(tmp_path: Path) -> None:
    """Nothing listens: the run ends before locust starts, instead of timing connection errors for 10 minutes."""
    port = free_port()  # bound and released: nothing listens on it
    r = _loadtest("--host", f"http://127.0.0.1:{port}", "--run-time", "10m", "--out", str(tmp_path), timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "target not usable, no load sent" in r.stderr
    assert f"127.0.0.1:{port}/readyz is unreachable" in r.stderr
    assert "PASS" not in r.stdout
    assert not (tmp_path / "locust_stats.csv").exists()


class _NotReady(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"error": {"code": "not_ready", "message": "draining", "request_id": "x"}}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def not_ready_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotReady)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_loadtest_against_a_target_that_is_not_ready_sends_no_load(tmp_path: Path, not_ready_server: str) -> None:
    r = _loadtest("--host", not_ready_server, "--run-time", "10m", "--out", str(tmp_path), timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "/readyz answered 503" in r.stderr
    assert not (tmp_path / "locust_stats.csv").exists()


@pytest.mark.slow
def test_error_ratio_over_its_limit_misses_every_slo(tmp_path: Path) -> None:
    """Every answer counts as a failure (the client expects labels the model does not give): a generous p99 SLO
    must not PASS."""
    repo = tmp_path / "repo"
    folder = write_model(repo, "tiny", "1")
    meta = json.loads((folder / "metadata.json").read_text())
    meta["golden"]["labels"] = [(label + 1) % 10 for label in meta["golden"]["labels"]]
    wrong = tmp_path / "wrong-labels.json"
    wrong.write_text(json.dumps(meta))
    with running_server(repo, tmp_path, "--no-access-log") as server:
        out = tmp_path / "wrong"
        r = _loadtest("--host", server.url, "--profile", "json", "--users", "2", "--run-time", "2s",
                      "--out", str(out), "--p99-ms", "60000", "--max-error-ratio", "0.01",
                      digits=wrong)  # fmt: skip
        assert r.returncode == 1, r.stdout + r.stderr
        n, failures = _requests(out / "locust_stats.csv")
        assert n > 0
        assert failures == n
        assert "MISS  error ratio 100.0000%" in r.stdout
        assert "MISS  p99" in r.stdout
        assert "not judged: the error ratio is over its limit" in r.stdout
        assert "PASS" not in r.stdout
