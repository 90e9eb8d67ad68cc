"""The benchmark suite: a smoke run in a tiny configuration (it completes, writes a complete JSON with every
design, the gRPC points, the inline-batch figures, the plots and the targets, and stops every server it
started), and the fairness of its baselines (the careful design refuses exactly what the service refuses,
every design reports the event loop of the run, the engine sweep includes the service's session options).
No timing is asserted here: speed is what ``mnist-bench`` prints."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pytest

from bench import engine, report
from bench.servers import ServerProcess, start
from service.model import _session_options
from service.settings import settings_from_args
from tests.helpers import ROOT, complete, write_model

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
    "server_cpu_s",
    "cpu_us_per_request",
    "server_rss_peak_mb",
    "wrk_cpu_util",
    "inline_batches",
    "inline_max_ms",
    "loop",
    "server",
}
DESIGNS = (
    "service",
    "classic",
    "careful",
    "ceiling",
    "asgi",
    "lean",
    "service-uvloop",
    "service-granian",
    "asgi-granian",
    "proto",
)


@pytest.mark.slow
def test_bench_smoke_writes_a_complete_report(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "tiny", "1")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.run", "--model-repository", str(repo), "--out", str(out),
           "--duration", "1", "--repeat", "1", "--warmup", "0", "--concurrency", "8", "--extra-concurrency", "8",
           "--high", "8", "--bulk-sizes", "256", "--bulk-json-sizes", "64", "--bulk-json-over", "2048",
           "--bulk-concurrency", "2", "--mixed-bulk", "256", "--engine-seconds", "0.02"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    result = json.loads((out / "results.json").read_text())
    assert result["command"].startswith("mnist-bench --model-repository")
    for pid in (s["pid"] for s in result["servers"].values()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    points = result["points"]
    seen = {(p["design"], p["workload"]) for p in points}
    for design in (*DESIGNS, "service+accesslog"):
        assert (design, "json") in seen, design
    assert {("service", "png"), ("service", "bulk-raw-256"), ("service", "bulk-json-64")} <= seen
    assert {("service+grpc", "grpc"), ("service+grpc", "grpc-bulk-256")} <= seen
    assert {("service-uvloop", "bulk-raw-256"), ("service-granian", "bulk-raw-256")} <= seen
    loop = result["loop"]
    assert loop == settings_from_args([]).event_loop  # the service's default, for every design
    for p in points:
        assert p.keys() >= POINT_KEYS
        assert p["loop"] == ("uvloop" if p["design"] == "service-uvloop" else loop), p
        server = "granian" if p["design"].endswith("granian") else "httptools" if p["design"] == "proto" else "uvicorn"
        assert p["server"] == server, p
        assert p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"], p
    over = [p for p in points if "413 expected" in p["note"]]
    assert len(over) == 1
    assert over[0]["workload"] == "bulk-json-2048"
    assert over[0]["rps"] == 0  # nothing over the JSON cap is answered 200
    assert over[0]["errors"] > 0
    for p in points:
        if p in over:
            continue
        assert p["rps"] > 0, p
        if p["design"].startswith("service"):
            assert p["errors"] == 0, p  # good input must never fail
            assert p["mean_batch"] is not None, p  # read from the service's /metrics
            assert p["mean_batch"] >= 1, p
            assert p["inline_batches"] is not None, p
            assert p["server_rss_peak_mb"] > 10, p
    granian = next(p for p in points if p["design"] == "service-granian" and p["workload"] == "json")
    assert granian["server_processes"] == 2  # supervisor + worker, both measured
    assert granian["server_rss_tree_peak_mb"] > granian["server_rss_peak_mb"]
    bulk = next(p for p in points if p["design"] == "service" and p["workload"] == "bulk-raw-256")
    assert bulk["images_per_s"] == pytest.approx(bulk["rps"] * 256)
    grpc = next(p for p in points if p["workload"] == "grpc-bulk-256")
    assert grpc["images_per_s"] == pytest.approx(grpc["rps"] * 256)
    assert grpc["wrk_cpu_util"] > 0  # the gRPC generator's own CPU

    assert set(result["inline"]) >= {"service", "service-uvloop", "service-granian"}
    assert "inline batches on the event loop, service:" in proc.stdout
    assert [r["design"] for r in result["loops"]] == ["service", "service-uvloop"]
    assert {(r["app"], r["concurrency"]) for r in result["servers_compared"]} == {("service", 8), ("asgi", 8)}

    eng = result["engine"]
    assert eng["best"]["images_per_s"] > 0
    assert {e["config"] for e in eng["points"]} == set(engine.CONFIGS)
    assert result["mixed"]["bulk_images_per_s"] > 0
    assert result["mixed"]["p99_ms"] > 0

    names = [t["name"] for t in result["targets"]]
    assert len(names) == 10
    for t in result["targets"]:
        assert isinstance(t["passed"], bool)
        assert t["measured"] is not None, t
        assert ("PASS  " + t["name"] if t["passed"] else "MISS  " + t["name"]) in proc.stdout
    for png in ("throughput_vs_concurrency.png", "latency_vs_throughput.png", "bulk_vs_engine.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The plots are redrawn from the committed raw results alone.
    redrawn = tmp_path / "redrawn"
    redrawn.mkdir()
    subprocess.run([sys.executable, "-m", "bench.plots", str(out / "results.json"), str(redrawn)], cwd=ROOT,
                   check=True, timeout=120)  # fmt: skip
    assert (redrawn / "throughput_vs_concurrency.png").read_bytes()[:4] == b"\x89PNG"


def _post(url: str, body: bytes) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


BAD_BODIES = {
    "string pixels": json.dumps({"image": ["0.5"] * 784}).encode(),
    "boolean pixels": json.dumps({"image": [True] * 784}).encode(),
    "out of range": json.dumps({"image": [2.0] * 784}).encode(),
    "negative": json.dumps({"image": [-0.1] * 784}).encode(),
    "wrong length": json.dumps({"image": [0.5] * 783}).encode(),
    "ragged rows": json.dumps({"image": [[0.5] * 28] * 27 + [[0.5] * 27]}).encode(),
    "no image field": json.dumps({"images": [[0.5] * 784]}).encode(),
    "not JSON": b"{not json",
    "empty": b"",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["careful", "lean"])
def test_baselines_with_the_service_decoder_refuse_what_the_service_refuses(tmp_path: Path, kind: str) -> None:
    """The careful and lean designs validate with the service's own decoder: same status and error code for each
    bad body, and the same answer for good bodies (flat and 28x28; lean batches those sent at once)."""
    repo = tmp_path / "repo"
    folder = write_model(repo, "tiny", "1")
    env = {"MNIST_MODEL_REPOSITORY": str(repo), "MNIST_MODEL_VERSION": "1"}
    servers: list[ServerProcess] = [
        start("service", ["-m", "service.server", "--no-access-log"], tmp_path, env),
        start(kind, ["-m", "bench.baselines", "--kind", kind, "--model", str(folder)], tmp_path, env),
    ]
    try:
        for s in servers:
            s.wait_ready()
        svc, other = (s.url + "/v1/predict" for s in servers)
        for what, body in BAD_BODIES.items():
            a, b = _post(svc, body), _post(other, body)
            assert 400 <= a[0] < 500, (what, a)
            assert a[0] == b[0], (what, a, b)
            assert a[1]["error"]["code"] == b[1]["error"]["code"], (what, a, b)  # type: ignore[index]
        rng = np.random.default_rng(0)
        images = rng.random((8, 784))
        bodies = [json.dumps({"image": im.tolist() if i % 2 else im.reshape(28, 28).tolist()}).encode()
                  for i, im in enumerate(images)]  # fmt: skip
        with ThreadPoolExecutor(8) as pool:  # at once: the lean design answers them in shared engine calls
            theirs = list(pool.map(lambda body: _post(other, body), bodies))
        for body, b in zip(bodies, theirs, strict=True):
            a = _post(svc, body)
            assert a[0] == b[0] == 200
            assert a[1]["label"] == b[1]["label"]
            assert np.allclose(a[1]["probabilities"], b[1]["probabilities"], atol=1e-6)  # type: ignore[arg-type]
    finally:
        for s in servers:
            s.stop()


def _exchange(sock: socket.socket, request: bytes, responses: int = 1) -> bytes:
    """Send ``request`` and read ``responses`` whole responses."""
    sock.sendall(request)
    data = b""
    while not complete(data, responses):
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection before {responses} whole answer(s): {data[:80]!r}"
        data += chunk
    return data


@pytest.mark.slow
def test_proto_design_answers_like_the_asgi_one_over_kept_alive_connections(tmp_path: Path) -> None:
    """``proto`` (no ASGI server) gives the same canned answer and readiness as ``asgi``, several requests on one
    connection (pipelined too), and closes when the client asks to."""
    servers = [start(kind, ["-m", "bench.baselines", "--kind", kind], tmp_path, {}) for kind in ("proto", "asgi")]
    try:
        for s in servers:
            s.wait_ready()
        proto = servers[0]
        body = json.dumps({"image": [0.5] * 784}).encode()
        answers = [_post(s.url + "/v1/predict", body) for s in servers]
        assert answers[0] == answers[1]
        assert answers[0][0] == 200
        assert answers[0][1]["label"] == 7
        with socket.create_connection(("127.0.0.1", proto.port), timeout=5) as sock:
            post = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            answer = _exchange(sock, post)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
            assert _exchange(sock, post) == _exchange(sock, post) == answer
            assert _exchange(sock, post * 2, responses=2) == answer * 2  # pipelined: two whole answers, in order
            ready = _exchange(sock, b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert ready.endswith(b'{"status":"ready"}')
            assert b"connection: close" in ready.lower()
            assert sock.recv(1) == b""  # closed by the server
    finally:
        for s in servers:
            s.stop()


def test_runs_table_sets_runs_side_by_side() -> None:
    """``python -m bench.report A B``: one row per run, each target's measured value in its column, '-' where a
    run lacks a point or a target."""

    def run(started: str, commit: str, asgi_rps: float | None, vs_classic: float) -> dict[str, object]:
        point = {"workload": "json", "concurrency": 64}
        points = [{**point, "design": "service", "rps": 9001.0}]
        if asgi_rps is not None:
            points.append({**point, "design": "asgi", "rps": asgi_rps})
        return {"started_utc": started, "git": {"commit": commit + "0" * 33}, "options": {"high": 64},
                "points": points, "targets": [{"name": "json c=64: req/s vs classic", "measured": vs_classic}]}  # fmt: skip

    table = report.runs_table([("a.json", run("2026-12-01T21:20:00Z", "aaf01f7", 32448.0, 2.3833)),
                               ("b.json", run("2026-12-03T10:17:18Z", "ce0ed75", None, 2.66))])  # fmt: skip
    head, rule, first, second = table.splitlines()
    assert head.startswith("| run (UTC) | file | code | `asgi` req/s | service req/s | vs classic (5x) |")
    assert rule.count("|") == head.count("|")
    assert first.startswith("| 2026-12-01 21:20 | `a.json` | `aaf01f7` | 32448 | 9001 | 2.38 | - |")
    assert second.startswith("| 2026-12-03 10:17 | `b.json` | `ce0ed75` | - | 9001 | 2.66 | - |")


def test_engine_sweep_uses_the_service_session_options() -> None:
    settings = settings_from_args([])
    opts, threads, spinning = engine.options("service", settings)
    ref = _session_options(settings)
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (
        ref.intra_op_num_threads,
        ref.inter_op_num_threads,
    )
    assert opts.graph_optimization_level == ref.graph_optimization_level
    assert opts.execution_mode == ref.execution_mode
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert opts.get_session_config_entry(key) == ref.get_session_config_entry(key)
    assert (threads, spinning) == (settings.intra_op_threads, settings.allow_spinning)
    default, threads, _ = engine.options("ort-default", settings)
    assert default.intra_op_num_threads == ort.SessionOptions().intra_op_num_threads
    assert threads == 0
    with pytest.raises(ValueError, match="unknown engine configuration"):
        engine.options("fastest", settings)


@pytest.mark.slow
def test_guards_check_probes_both_servers(tmp_path: Path) -> None:
    """The guard probes run against the service under uvicorn and under granian; under uvicorn (the service's
    own guards, service/guards.py) every one holds, so the probes themselves are sound."""
    repo = tmp_path / "repo"
    write_model(repo, "tiny", "1")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.guards_check", "--model-repository", str(repo), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    probes = json.loads((out / "guards.json").read_text())["probes"]
    names = {"huge-headers", "slow-headers", "slow-body", "declared-too-large", "idle-connections"}
    for server in ("uvicorn", "granian"):
        mine = [p for p in probes if p["server"] == server]
        assert {p["probe"] for p in mine} == names
        assert all(isinstance(p["held"], bool) for p in mine)
    assert all(p["held"] for p in probes if p["server"] == "uvicorn"), probes


@pytest.mark.parametrize("shipped", [False, True])
def test_budget_writes_the_unavoidable_costs(tmp_path: Path, shipped: bool) -> None:
    """A version with an int8 variant (the shipped one) gets the engine figures of both files."""
    repo = ROOT / "models" if shipped else tmp_path / "repo"
    if not shipped:
        write_model(repo, "tiny", "1")
    cmd = [
        sys.executable,
        "-m",
        "bench.budget",
        "--model-repository",
        str(repo),
        "--out",
        str(tmp_path),
        "--repeat",
        "1",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    budget = json.loads((tmp_path / "budget.json").read_text())
    assert budget["command"].startswith("python -m bench.budget")
    assert budget["decode_validate_json_us"] > 0
    assert budget["encode_answer_json_us"] > 0
    assert set(budget["write_answer_us"]) == {"respond", "asgi_send"}
    assert budget["precision"] == "float32"
    engines = ["engine_us_per_image_by_batch", *(["engine_int8_us_per_image_by_batch"] if shipped else [])]
    assert [k for k in budget if k.startswith("engine_")] == engines
    for key in engines:
        assert set(budget[key]) == {"1", "8", "32", "128", "512"}
        assert all(v > 0 for v in budget[key].values())
    big = budget["json_bulk_decode"]["1024"]
    assert big["decode_peak_mb"] > big["pixels_mb"] > 0  # Python floats cost more than the float32 pixels


def test_profile_groups_the_event_loop_thread_by_area(tmp_path: Path) -> None:
    from bench import profile

    raw = tmp_path / "stacks.txt"
    raw.write_text(
        "thread (1): MainThread;run (service/server.py:10);EpollSelector.select (selectors.py:468) 5\n"
        "thread (1): MainThread;run (service/server.py:10);fast_json (service/decode.py:120) 3\n"
        "thread (1): MainThread;run (service/server.py:10);Session.run (onnxruntime/capi/x.py:401) 1\n"
        "thread (1): MainThread;_run_once (asyncio/base_events.py:1922) 1\n"
        "thread (2): engine-bulk;compute (service/engine.py:170) 7\n"  # another thread: not the loop's
    )
    loop = profile.thread_areas(raw)
    assert loop["samples"] == 10
    assert loop["idle"] == 0.5
    assert loop["busy_by_area"] == [("service/decode.py", 0.6), ("onnxruntime", 0.2), ("asyncio", 0.2)]
    assert profile.summarize(raw)["loop"] == loop


@pytest.mark.parametrize(("concurrency", "http"), [(1, False), (16, False), (1, True), (16, True)])
def test_inprocess_measures_each_checkout_in_turn(tmp_path: Path, concurrency: int, http: bool) -> None:
    """Two "checkouts" (the same tree twice) take turns; each round is a real request loop that answered 200,
    one request at a time or several clients at once, the app alone or behind the server's HTTP layer."""
    repo = tmp_path / "repo"
    write_model(repo, "tiny", "1")
    cmd = [sys.executable, "-m", "bench.inprocess", "--model-repository", str(repo), "--out", str(tmp_path),
           "--requests", "50", "--rounds", "2", "--source", str(ROOT), "--source", str(ROOT / "."),
           "--concurrency", str(concurrency), *(["--http"] if http else [])]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300).stdout
    name = "inprocess" + ("-http" if http else "") + ("" if concurrency == 1 else f"-c{concurrency}") + ".json"
    report = json.loads((tmp_path / name).read_text())
    assert report["command"].startswith("python -m bench.inprocess")
    assert report["requests_per_round"] == 50
    assert report["concurrency"] == concurrency
    assert report["http"] is http
    assert len(report["sources"]) == 2
    for source in report["sources"]:
        assert len(source["rounds_us_per_request"]) == 2
        assert source["best_us_per_request"] == min(source["rounds_us_per_request"]) > 0
        assert source["commit"] != "unknown"
    assert out.count("round ") == 4
