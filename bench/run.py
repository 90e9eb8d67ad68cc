"""``mnist-bench``: the benchmark suite. Starts the real service and the comparison designs on 127.0.0.1,
drives each with wrk (HTTP) or bench/grpc_load.py (gRPC) from separate processes, and prints a table and the
targets (PASS/MISS), and writes ``results.json`` and PNG plots to the output folder.

Every design runs on the service's event loop (``MNIST_EVENT_LOOP``, or ``--loop``) with the service's ONNX
Runtime session options, in the same run. Designs: ``service`` (mnist-serve: uvicorn + httptools),
``classic``, ``careful``, ``ceiling`` (FastAPI canned answer), ``asgi`` (bare ASGI canned answer), ``lean``
(the least a batching server of this model can be: the work without the service's features) (see
bench/baselines.py); ``service-uvloop`` (the service on the other loop); ``service-granian`` and
``asgi-granian`` (the same apps under granian, bench/granian_serve.py); ``proto`` (the canned answer from a plain
asyncio protocol with httptools: the floor under every ASGI server).

Order of a run: the engine ceiling (in-process ONNX Runtime, nothing else running); then every server is
started at once (idle ones cost nothing) and the single-image JSON points are interleaved design by
design at each concurrency, so the ratios compare figures taken seconds apart on a shared machine;
then PNG, the bulk endpoint, the access-log cost, a single-image run beside a bulk load, the gRPC points,
and optionally a py-spy profile of the service.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench import engine, grpc_load, plots, profile
from bench.loadgen import Workload, WrkResult, WrkRun, run_wrk, wrk_binary
from bench.models import DEFAULT_REPOSITORY, ROOT, ModelUnderTest, find_model, real_digits, write_standin
from bench.report import Point, best_of_repeats, find, reference_targets, table, targets, targets_table
from bench.servers import ProcSampler, ServerProcess, free_port, mean_batch, scrape, start
from bench.workloads import bulk_json, bulk_raw, single_json, single_png
from service.settings import Settings, settings_from_args

#: The designs of the single-image sweep: the first six at every concurrency, the others at ``--extra-concurrency``.
MAIN_DESIGNS = ("service", "classic", "careful", "ceiling", "asgi", "lean")
EXTRA_DESIGNS = ("service-uvloop", "service-granian", "asgi-granian", "proto")
DESIGNS = MAIN_DESIGNS + EXTRA_DESIGNS
SERVICES = ("service", "service-uvloop", "service-granian")  # designs that are the service (they have /metrics)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mnist-bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        help="Model repository to serve (default: ./models; a stand-in MLP of the same shape is "
        "written to the output folder when it holds no model).",
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="Output folder (default bench-results).")
    p.add_argument("--duration", type=float, default=4.0, help="Seconds per measured point, whole (default 4).")
    p.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="Rounds of the single-image JSON sweep and the engine sweep; the best is kept (default 2).",
    )
    p.add_argument("--warmup", type=float, default=1.0, help="Seconds of unmeasured load per server (default 1).")
    p.add_argument(
        "--concurrency",
        type=_ints,
        default=[1, 8, 64, 256],
        help="Connections for the single-image sweep (default 1,8,64,256).",
    )
    p.add_argument(
        "--extra-concurrency",
        type=_ints,
        default=[1, 64],
        help=f"Connections for {', '.join(EXTRA_DESIGNS)} (default 1,64: both ends).",
    )
    p.add_argument("--designs", default=",".join(DESIGNS), help="Designs to run (default: all nine).")
    p.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default=None,
        help="Event loop of every design (default: the service's, MNIST_EVENT_LOOP or its default asyncio).",
    )
    p.add_argument(
        "--bulk-sizes",
        type=_ints,
        default=[256, 1024, 4096],
        help="Images per request for the binary bulk points (default 256,1024,4096).",
    )
    p.add_argument(
        "--bulk-json-sizes",
        type=_ints,
        default=[256],
        help="Images per request for the JSON bulk points (default 256: 256 real digits are ~1.3 MB of JSON, under "
        "the 2 MiB JSON cap).",
    )
    p.add_argument(
        "--bulk-json-over",
        type=_ints,
        default=[1024],
        help="JSON bulk sizes over the JSON cap (MNIST_MAX_JSON_BYTES), sent anyway: 413 expected; shows the "
        "memory under refused bodies (default 1024, ~5.3 MB).",
    )
    p.add_argument(
        "--bulk-concurrency", type=_ints, default=[1, 2], help="Connections for the bulk points (default 1,2)."
    )
    p.add_argument("--high", type=int, default=64, help="The concurrency the targets are read at (default 64).")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1: wrk is not the limit).")
    p.add_argument("--png", action=argparse.BooleanOptionalAction, default=True, help="PNG points.")
    p.add_argument("--engine", action=argparse.BooleanOptionalAction, default=True, help="Engine ceiling sweep.")
    p.add_argument("--engine-seconds", type=float, default=0.4, help="Seconds per engine point (default 0.4).")
    p.add_argument(
        "--access-log-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also measure the service with its access log on (JSON, high concurrency).",
    )
    p.add_argument(
        "--mixed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Single-image JSON at concurrency 1 while a bulk load runs (two wrk at once).",
    )
    p.add_argument(
        "--mixed-bulk",
        type=int,
        default=1024,
        help="Images per bulk request in the mixed run and the target's bulk point (default 1024, 2 connections).",
    )
    p.add_argument(
        "--grpc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gRPC points (bench/grpc_load.py): single image at 1 and --high connections, bulk at 2.",
    )
    p.add_argument("--grpc-processes", type=int, default=1, help="gRPC load generator processes (default 1).")
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="py-spy the service during extra JSON (one connection, high concurrency) and bulk points (not counted).",
    )
    p.add_argument(
        "--service-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="Extra mnist-serve flag, repeatable, e.g. --service-arg=--max-batch-size=512.",
    )
    p.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="K=V",
        help="Extra environment for the service and the baselines (their session options follow it), "
        "repeatable, e.g. MNIST_INTRA_OP_THREADS=2.",
    )
    p.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Access log of the service in the comparison (default off: the baselines have none).",
    )
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="Write PNG plots.")
    return p


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk_version = subprocess.run([wrk_binary(), "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    versions: dict[str, str | None] = {}
    for pkg in ("uvicorn", "granian", "fastapi", "starlette", "uvloop", "httptools", "grpcio"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": ort.__version__,
        "wrk": wrk_version.strip(),
        "packages": versions,
    }


def git_state() -> dict[str, Any]:
    """The commit the run measured, and whether the service or the bench differed from it (uncommitted edits)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "uncommitted": git("status", "--porcelain", "--", "service", "bench").splitlines()}  # fmt: skip


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    env = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        env[k] = v
    return env


def service_settings(env: dict[str, str]) -> Settings:
    """The service's settings as its process will read them: this environment plus ``env`` on top."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return settings_from_args([])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Bench:
    def __init__(self, args: argparse.Namespace, model: ModelUnderTest, out: Path, body_dir: Path) -> None:
        self.args = args
        self.model = model
        self.out = out
        self.body_dir = body_dir
        self.points: list[Point] = []
        self.servers: dict[str, ServerProcess] = {}
        self._prefixes: dict[str, str] = {}
        self.loop: str = ""
        self.loop = getattr(args, "loop", None) or service_settings(self.service_env()).event_loop
        self.grpc_port: int | None = None

    # --------------------------------------------------------------- servers
    def service_env(self) -> dict[str, str]:
        """The environment of every design: the ``--service-env`` pairs and the event loop of the run."""
        env = _env_pairs(self.args.service_env)
        loop = getattr(self, "loop", None)
        if loop:
            env["MNIST_EVENT_LOOP"] = loop
        return env

    def start_service(self, name: str, flags: list[str], env: dict[str, str]) -> None:
        """Start one service process (not yet waited for) with the model under test and ``flags``."""
        args = ["-m", "service.server", "--model-repository", str(self.model.repository),
                "--model-name", self.model.name, "--model-version", self.model.version, *flags]  # fmt: skip
        self.servers[name] = start(name, args, self.out / "logs", env)

    def start_servers(self, designs: list[str]) -> None:
        base_env = self.service_env()
        model_env = {
            "MNIST_MODEL_REPOSITORY": str(self.model.repository),
            "MNIST_MODEL_NAME": self.model.name,
            "MNIST_MODEL_VERSION": self.model.version,
        }
        log_flag = "--access-log" if self.args.access_log else "--no-access-log"
        for d in designs:
            if d in ("service", "service+accesslog"):
                flag = "--access-log" if d == "service+accesslog" else log_flag
                self.start_service(d, [flag, *self.args.service_arg], base_env)
            elif d == "service-uvloop":
                self.start_service(d, [log_flag, *self.args.service_arg], {**base_env, "MNIST_EVENT_LOOP": "uvloop"})
            elif d == "service+grpc":
                self.grpc_port = free_port()
                self.start_service(d, [log_flag, "--grpc-port", str(self.grpc_port), *self.args.service_arg], base_env)
            elif d == "service-granian":
                env = {**base_env, **model_env, "MNIST_ACCESS_LOG": str(self.args.access_log).lower()}
                self.servers[d] = start(d, ["-m", "bench.granian_serve", "--app", "service"], self.out / "logs", env)
            elif d == "asgi-granian":
                self.servers[d] = start(d, ["-m", "bench.granian_serve", "--app", "asgi"], self.out / "logs", base_env)
            else:
                args = ["-m", "bench.baselines", "--kind", d, "--model", str(self.model.folder)]
                self.servers[d] = start(d, args, self.out / "logs", base_env)
        for s in self.servers.values():
            s.wait_ready()

    def stop_servers(self) -> None:
        for s in self.servers.values():
            s.stop()
        self.servers.clear()

    # --------------------------------------------------------------- points
    def prefix(self, w: Workload) -> str:
        if w.name not in self._prefixes:
            self._prefixes[w.name] = w.write(self.body_dir)
        return self._prefixes[w.name]

    def warm(self, design: str, w: Workload, c: int = 16) -> None:
        if self.args.warmup > 0:
            run_wrk(self.servers[design].url, w, self.prefix(w), c, self.args.warmup, self.args.wrk_threads)

    def _record(self, design: str, workload: str, c: int, images: int, r: WrkResult | grpc_load.GrpcResult,
                sampler: ProcSampler, before: dict[str, float], after: dict[str, float], note: str,
                loadgen_cpu: float) -> Point:  # fmt: skip
        mb, calls = mean_batch(before, after)
        s = sampler.sample
        inline_key, max_key = "mnist_inline_batches_total", "mnist_inline_batch_max_seconds"
        inline = int(after[inline_key] - before[inline_key]) if inline_key in after and inline_key in before else None
        errors_status = r.errors_status if isinstance(r, WrkResult) else r.errors
        errors_socket = r.errors_socket if isinstance(r, WrkResult) else 0
        good_rps = r.good_rps
        pt = Point(
            design,
            workload,
            c,
            images,
            good_rps,
            good_rps * images,
            r.p50_ms,
            r.p90_ms,
            r.p95_ms,
            r.p99_ms,
            r.p999_ms,
            r.latency_mean_ms,
            r.latency_max_ms,
            r.requests,
            r.errors,
            errors_status,
            errors_socket,
            r.duration_s,
            loadgen_cpu,
            s.cpu_util,
            s.rss_peak_mb,
            mb,
            calls,
            note,
            server_cpu_s=s.cpu_s,
            server_rss_tree_peak_mb=s.rss_tree_peak_mb,
            server_processes=s.processes,
            inline_batches=inline,
            inline_max_ms=after[max_key] * 1000 if max_key in after else None,
            loop_thread_cpu_util=s.main_thread_util,
            loop=self.design_loop(design),
            server=self.design_server(design),
        )
        self.points.append(pt)
        print(
            f"  {design:<18} {workload:<15} c={c:<4} {pt.rps:>9.0f} req/s {pt.images_per_s:>10.0f} img/s "
            f"p50 {pt.p50_ms:7.2f} p99 {pt.p99_ms:7.2f} ms err {pt.errors} batch {mb or 0:.1f} "
            f"cpu {s.cpu_util:.2f} (loop {s.main_thread_util:.2f}; {pt.cpu_us_per_request:.0f} us/req) "
            f"rss {s.rss_peak_mb:.0f} MB "
            f"loadgen-cpu {loadgen_cpu:.2f}{f' inline {inline}' if inline is not None else ''} {note}",
            flush=True,
        )
        return pt

    def design_loop(self, design: str) -> str:
        return "uvloop" if design == "service-uvloop" else self.loop

    @staticmethod
    def design_server(design: str) -> str:
        return "granian" if design.endswith("granian") else "httptools" if design == "proto" else "uvicorn"

    def point(
        self, design: str, w: Workload, c: int, note: str = "", beside: Callable[[], WrkRun] | None = None
    ) -> tuple[Point, WrkResult | None]:
        server = self.servers[design]
        before = scrape(server.url)
        with ProcSampler(server.pid) as sampler:
            other = beside() if beside is not None else None
            r = run_wrk(server.url, w, self.prefix(w), c, self.args.duration, self.args.wrk_threads)
            other_r = other.result() if other is not None else None
        after = scrape(server.url)
        pt = self._record(design, w.name, c, w.images_per_request, r, sampler, before, after, note, r.wrk_cpu_util)
        return pt, other_r

    def grpc_point(self, design: str, bodies: list[bytes], images: int, c: int, workload: str) -> Point:
        server = self.servers[design]
        target = f"127.0.0.1:{self.grpc_port}"
        before = scrape(server.url)
        procs = max(1, min(self.args.grpc_processes, c))
        with ProcSampler(server.pid) as sampler:
            r = grpc_load.run(target, bodies, concurrency=c, duration_s=self.args.duration,
                              warmup_s=self.args.warmup, processes=procs, images_per_request=images)  # fmt: skip
        after = scrape(server.url)
        # The sampler's window includes the generator's warm-up: CPU and batch figures cover it too; the
        # request counts and latencies are of the measured window only.
        return self._record(design, workload, c, images, r, sampler, before, after,
                            f"gRPC, {procs} load process{'es' if procs > 1 else ''}", r.loadgen_cpu_util)  # fmt: skip


def _resolve_model(args: argparse.Namespace, out: Path) -> ModelUnderTest:
    repo = args.model_repository
    if repo is None:
        try:
            return find_model(DEFAULT_REPOSITORY)
        except (FileNotFoundError, OSError):
            print(
                f"note: no model in {DEFAULT_REPOSITORY}; writing a stand-in MLP (784-512-10, random weights)",
                file=sys.stderr,
            )
            return write_standin(out / "standin-models")
    return find_model(repo)


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = _resolve_model(args, out)
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    unknown = set(designs) - set(DESIGNS)
    if unknown:
        raise SystemExit(f"mnist-bench: unknown designs {sorted(unknown)}; choose from {', '.join(DESIGNS)}")
    digits = real_digits(4096, model)
    started = time.time()
    argv = getattr(args, "argv", None)
    settings = service_settings(_env_pairs(args.service_env))
    model = model.serving(settings.model_precision)  # every design and the engine sweep run the served file
    loop = args.loop or settings.event_loop
    result: dict[str, Any] = {
        "command": "mnist-bench" + ("" if argv is None else "".join(f" {a}" for a in argv)),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "git": git_state(),
        "machine": machine(),
        "model": {
            "name": model.name,
            "version": model.version,
            "standin": model.standin,
            "path": str(model.onnx_path),
            "precision": settings.model_precision,
        },
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "access_log_in_comparison": bool(args.access_log),
        "loop": loop,
        "session_options": {
            "intra_op_threads": settings.intra_op_threads,
            "inter_op_threads": settings.inter_op_threads,
            "allow_spinning": settings.allow_spinning,
            "graph_optimization": settings.graph_optimization,
            "built_by": "service.model._session_options (service, classic, careful, engine 'service')",
        },
        "service_settings": settings.model_dump(mode="json", exclude={"admin_token", "feedback_token"}),
    }
    print(
        f"model {model.name}/{model.version}{' (stand-in)' if model.standin else ''}; "
        f"machine {result['machine']['cpu']} x{result['machine']['cores']}; load average "
        f"{result['machine']['loadavg_start'][0]:.2f}; event loop {loop} for every design",
        flush=True,
    )

    engine_best = None
    if args.engine:
        print("engine ceiling (in-process ONNX Runtime):", flush=True)
        eps = engine.sweep(model.onnx_path, digits, seconds=args.engine_seconds, repeat=args.repeat, settings=settings)
        for e in eps:
            print(
                f"  {e.config:<12} batch {e.batch:>5}: {e.images_per_s:>10.0f} images/s ({e.ms_per_batch:.3f} ms/call)"
            )
        b = engine.best(eps)
        engine_best = b.images_per_s
        result["engine"] = {"points": [e.to_dict() for e in eps], "best": b.to_dict()}

    json_w, png_w = single_json(digits), single_png(digits)
    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as tmp:
        bench = Bench(args, model, out, Path(tmp))
        bench.loop = loop
        server_designs = list(designs)
        if args.access_log_check and "service" in designs:
            server_designs.append("service+accesslog")
        if args.grpc and "service" in designs:
            server_designs.append("service+grpc")
        try:
            bench.start_servers(server_designs)
            result["servers"] = {d: {"pid": s.pid, "port": s.port} for d, s in bench.servers.items()}
            for d in server_designs:
                if d != "service+grpc":
                    bench.warm(d, json_w)
            for r in range(args.repeat):
                print(f"single-image JSON, round {r + 1} of {args.repeat}:", flush=True)
                for c in sorted(set(args.concurrency) | set(args.extra_concurrency)):
                    for d in designs:
                        in_main = d in MAIN_DESIGNS and c in args.concurrency
                        if in_main or (d in EXTRA_DESIGNS and c in args.extra_concurrency):
                            bench.point(d, json_w, c)
                    if c == args.high and "service+accesslog" in bench.servers:
                        bench.point("service+accesslog", json_w, c, note="access log on")
            bench.points = best_of_repeats(bench.points)
            if "service" in designs:
                _service_only(bench, args, digits, png_w, json_w, designs)
            result["rss_hwm_mb"] = {d: _vm_hwm(s.pid) for d, s in bench.servers.items()}
            result["inline"] = {
                d: {k: scrape(s.url).get(k) for k in ("mnist_inline_batches_total", "mnist_inline_batch_max_seconds")}
                for d, s in bench.servers.items()
                if d.startswith("service")
            }
        finally:
            bench.stop_servers()
    points = bench.points
    again = getattr(bench, "engine_again", None)
    if again:
        result["engine"]["beside_bulk"] = again
        top = max(again, key=lambda e: e["images_per_s"])
        if engine_best is None or top["images_per_s"] > engine_best:
            engine_best = top["images_per_s"]
            result["engine"]["best"] = top
    mixed = getattr(bench, "mixed", None)
    ts = targets(points, engine_best, c_high=args.high, c_low=min(args.concurrency), bulk=args.mixed_bulk,
                 mixed_p99_ms=mixed["p99_ms"] if mixed else None)  # fmt: skip
    result["points"] = [p.to_dict() for p in points]
    result["cpu_normalised"] = _cpu_normalised(points, args.high)
    result["loops"] = _loops(points, args.high, args.mixed_bulk)
    result["servers_compared"] = _servers(points, args.extra_concurrency)
    result["targets"] = [t.to_dict() for t in ts]
    lean = reference_targets(points, c_high=args.high, c_low=min(args.concurrency)) if "lean" in designs else []
    result["lean_targets"] = [t.to_dict() for t in lean]
    result["mixed"] = mixed
    result["profile"] = getattr(bench, "profile", None)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["elapsed_s"] = round(time.time() - started, 1)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    if args.plots:
        plots.write_all(points, engine_best, out, plots.title_of(result))
    print()
    print(table(points))
    print()
    if mixed:
        print(
            f"single-image JSON c=1 beside a bulk load ({mixed['bulk_workload']} c={mixed['bulk_concurrency']}): "
            f"p50 {mixed['p50_ms']:.2f} ms, p99 {mixed['p99_ms']:.2f} ms (alone: p99 {mixed['alone_p99_ms']:.2f} ms); "
            f"bulk {mixed['bulk_images_per_s']:.0f} images/s"
        )
    if engine_best:
        print(f"engine ceiling: {engine_best:.0f} images/s ({result['engine']['best']})")
    for d, v in result.get("inline", {}).items():
        n, mx = v.get("mnist_inline_batches_total"), v.get("mnist_inline_batch_max_seconds")
        if n is not None and mx is not None:
            print(f"inline batches on the event loop, {d}: {n:.0f} in the run, worst stall {mx * 1e6:.0f} us")
    for row in result["loops"]:
        print(f"event loop: {row}")
    for row in result["servers_compared"]:
        print(f"HTTP server: {row}")
    print(targets_table(ts))
    if lean:
        print("the same single-image targets for lean (the work alone, none of the service's features; a reference):")
        print(targets_table(lean))
    cn = result["cpu_normalised"]
    if cn:
        print(
            f"server CPU per request, JSON c={args.high}: "
            + ", ".join(f"{k} {v:.0f} us" for k, v in cn["cpu_us_per_request"].items())
        )
    print(f"\nwrote {out / 'results.json'} ({result['elapsed_s']} s; load average at the end "
          f"{result['machine']['loadavg_end'][0]:.2f})")  # fmt: skip
    return result


def _service_only(bench: Bench, args: argparse.Namespace, digits: np.ndarray, png_w: Workload, json_w: Workload,
                  designs: list[str]) -> None:  # fmt: skip
    if args.png:
        print("single-image PNG:", flush=True)
        bench.warm("service", png_w)
        for c in args.concurrency:
            bench.point("service", png_w, c)
        if "ceiling" in bench.servers:
            bench.point("ceiling", png_w, args.high, note="canned answer, PNG body")
    if args.engine:
        # The engine again, right beside the bulk points: the machine's other load moves within a run.
        eps = engine.sweep(bench.model.onnx_path, digits, batches=(256, 1024),
                           configs=("service", "service-x2", "intra2"), seconds=args.engine_seconds,
                           settings=service_settings(bench.service_env()))  # fmt: skip
        bench.engine_again = [e.to_dict() for e in eps]  # type: ignore[attr-defined]
        b = engine.best(eps)
        print(f"engine ceiling again, beside the bulk points: {b.images_per_s:.0f} images/s (batch {b.batch}, "
              f"{b.config})", flush=True)  # fmt: skip
    print("bulk endpoint:", flush=True)
    for n in args.bulk_sizes:
        w = bulk_raw(digits, n)
        bench.warm("service", w, c=1)
        for c in args.bulk_concurrency:
            bench.point("service", w, c)
    for n in args.bulk_json_sizes:
        w = bulk_json(digits, n)
        bench.warm("service", w, c=1)
        for c in args.bulk_concurrency:
            bench.point("service", w, c)
    for n in args.bulk_json_over:
        w = bulk_json(digits, n)
        bench.point("service", w, max(args.bulk_concurrency), note="over the JSON cap: 413 expected")
    bw = bulk_raw(digits, args.mixed_bulk)
    for d in designs:
        if d in ("service-uvloop", "service-granian"):
            bench.warm(d, bw, c=1)
            bench.point(d, bw, 2)
    if args.mixed:
        print("single image beside a bulk load:", flush=True)
        alone = find(bench.points, "service", "json", 1)
        if alone is None:
            alone, _ = bench.point("service", json_w, 1, note="alone")
        server = bench.servers["service"]
        prefix = bench.prefix(bw)

        def bulk_load() -> WrkRun:
            return WrkRun(server.url, bw, prefix, 2, args.duration, 1)

        pt, bulk_r = bench.point("service", json_w, 1, note=f"beside {bw.name} c=2", beside=bulk_load)
        assert bulk_r is not None
        bench.mixed = {  # type: ignore[attr-defined]
            "p50_ms": pt.p50_ms,
            "p95_ms": pt.p95_ms,
            "p99_ms": pt.p99_ms,
            "rps": pt.rps,
            "errors": pt.errors,
            "alone_p99_ms": alone.p99_ms,
            "alone_p50_ms": alone.p50_ms,
            "bulk_workload": bw.name,
            "bulk_concurrency": 2,
            "bulk_images_per_s": bulk_r.good_rps * bw.images_per_request,
            "bulk_p99_ms": bulk_r.p99_ms,
            "bulk_errors": bulk_r.errors,
        }
    if args.grpc and "service+grpc" in bench.servers:
        print("gRPC (Open Inference Protocol ModelInfer, bench/grpc_load.py):", flush=True)
        spec = bench.model.metadata.get("input")
        input_name = str(spec.get("name", "pixels")) if isinstance(spec, dict) else "pixels"
        one = [grpc_load.request_body(d.reshape(1, -1), bench.model.name, input_name) for d in digits[:64]]
        many = [grpc_load.request_body(digits[(np.arange(args.mixed_bulk) + k * 97) % len(digits)], bench.model.name,
                                       input_name) for k in range(4)]  # fmt: skip
        for c in sorted({1, args.high}):
            bench.grpc_point("service+grpc", one, 1, c, "grpc")
        bench.grpc_point("service+grpc", many, args.mixed_bulk, 2, f"grpc-bulk-{args.mixed_bulk}")
    if args.profile:
        bench.profile = {  # type: ignore[attr-defined]
            "json-c1": _profiled(bench, json_w, 1, "profile-json-c1.txt"),
            "json": _profiled(bench, json_w, args.high, "profile-json.txt"),
            "bulk": _profiled(bench, bw, 2, "profile-bulk.txt"),
        }


def _profiled(bench: Bench, w: Workload, c: int, name: str) -> dict[str, object] | None:
    """py-spy the service during one extra point (dropped from the results: the sampler costs CPU)."""
    print(f"profile of {w.name} c={c} (py-spy, not counted):", flush=True)
    path = bench.out / name
    spy = profile.record(bench.servers["service"].pid, bench.args.duration, path)
    time.sleep(0.3)
    bench.point("service", w, c, note="under py-spy (not a result)")
    bench.points.pop()
    _, err = spy.communicate(timeout=60)
    if not path.exists():
        print(f"py-spy wrote nothing: {err.decode(errors='replace')[-2000:]}")
        return None
    summary = profile.summarize(path)
    print(profile.format_summary(summary))
    return summary


def _cpu_normalised(points: list[Point], high: int) -> dict[str, Any]:
    chosen = {d: p for d in DESIGNS if (p := find(points, d, "json", high)) is not None}
    if "service" not in chosen:
        return {}
    per = {d: p.req_per_cpu_s for d, p in chosen.items()}
    ratios = {d: per["service"] / v for d, v in per.items() if d != "service" and v > 0}
    return {
        "req_per_cpu_s": per,
        "cpu_us_per_request": {d: p.cpu_us_per_request for d, p in chosen.items()},
        "service_ratio": ratios,
    }


def _loops(points: list[Point], high: int, bulk: int) -> list[dict[str, Any]]:
    """The service on both event loops, measured in this run: c=1 p50, c=high req/s and p99, bulk images/s."""
    rows = []
    for d in ("service", "service-uvloop"):
        lo, hi = find(points, d, "json", 1), find(points, d, "json", high)
        bk = find(points, d, f"bulk-raw-{bulk}", 2)
        any_point = lo or hi
        if any_point is None:
            continue
        rows.append({
            "design": d,
            "loop": any_point.loop,
            "c1_p50_ms": lo.p50_ms if lo else None,
            f"c{high}_rps": hi.rps if hi else None,
            f"c{high}_p99_ms": hi.p99_ms if hi else None,
            f"c{high}_cpu_us_per_request": hi.cpu_us_per_request if hi else None,
            f"bulk_raw_{bulk}_c2_images_per_s": bk.images_per_s if bk else None,
        })  # fmt: skip
    return rows


def _servers(points: list[Point], concurrency: list[int]) -> list[dict[str, Any]]:
    """uvicorn vs granian, for the service and for the bare ASGI canned answer, at each end."""
    rows = []
    for app, pair in (("service", ("service", "service-granian")), ("asgi", ("asgi", "asgi-granian"))):
        for c in concurrency:
            a, b = find(points, pair[0], "json", c), find(points, pair[1], "json", c)
            if a is None or b is None:
                continue
            rows.append({
                "app": app, "concurrency": c,
                "uvicorn_rps": a.rps, "granian_rps": b.rps,
                "uvicorn_p50_ms": a.p50_ms, "granian_p50_ms": b.p50_ms,
                "uvicorn_p99_ms": a.p99_ms, "granian_p99_ms": b.p99_ms,
                "uvicorn_cpu_us_per_request": a.cpu_us_per_request, "granian_cpu_us_per_request": b.cpu_us_per_request,
                "uvicorn_rss_mb": a.server_rss_peak_mb, "granian_rss_mb": b.server_rss_peak_mb,
                "granian_rss_tree_mb": b.server_rss_tree_peak_mb,
            })  # fmt: skip
    return rows


def _vm_hwm(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(raw)
    args.argv = list(raw)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
