"""``mnist-bench``: the benchmark suite. Starts the real service and the comparison designs on 127.0.0.1,
drives each with wrk from a separate process, and prints a table, the issue's targets (PASS/MISS), and
writes ``results.json`` and PNG plots to the output folder.

Order of a run: the engine ceiling (in-process ONNX Runtime, nothing else running); then every server is
started at once (idle ones cost nothing) and the single-image JSON points are interleaved design by
design at each concurrency, so the ratios compare figures taken seconds apart on this shared machine;
then PNG, the bulk endpoint, the access-log cost, a single-image run beside a bulk load, and optionally a
py-spy profile of the service at the high concurrency.
"""

from __future__ import annotations

import argparse
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

from bench import engine, plots, profile
from bench.loadgen import Workload, WrkResult, WrkRun, run_wrk, wrk_binary
from bench.models import DEFAULT_REPOSITORY, ModelUnderTest, find_model, real_digits, write_standin
from bench.report import Point, best_of_repeats, find, table, targets, targets_table
from bench.servers import ProcSampler, ServerProc, mean_batch, scrape, start
from bench.workloads import bulk_json, bulk_raw, single_json, single_png

DESIGNS = ("service", "classic", "careful", "ceiling", "asgi")


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
    p.add_argument("--duration", type=float, default=5.0, help="Seconds per measured point, whole (default 5).")
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="Rounds of the single-image JSON sweep and the engine sweep; the best is kept (default 3).",
    )
    p.add_argument("--warmup", type=float, default=1.0, help="Seconds of unmeasured load per server (default 1).")
    p.add_argument(
        "--concurrency",
        type=_ints,
        default=[1, 8, 64, 256],
        help="Connections for the single-image sweep (default 1,8,64,256).",
    )
    p.add_argument("--designs", default=",".join(DESIGNS), help="Designs to run (default: all five).")
    p.add_argument(
        "--bulk-sizes",
        type=_ints,
        default=[256, 1024, 4096],
        help="Images per request for the binary bulk points (default 256,1024,4096).",
    )
    p.add_argument(
        "--bulk-json-sizes",
        type=_ints,
        default=[256, 1024],
        help="Images per request for the JSON bulk points (default 256,1024).",
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
        help="Images per bulk request in the mixed run (default 1024, 2 connections).",
    )
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="py-spy the service during an extra JSON point at the high concurrency.",
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
        help="Extra environment for the service, repeatable, e.g. MNIST_INTRA_OP_THREADS=2.",
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
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": ort.__version__,
        "wrk": wrk_version.strip(),
    }


class Bench:
    def __init__(self, args: argparse.Namespace, model: ModelUnderTest, out: Path, body_dir: Path) -> None:
        self.args = args
        self.model = model
        self.out = out
        self.body_dir = body_dir
        self.points: list[Point] = []
        self.servers: dict[str, ServerProc] = {}
        self._prefixes: dict[str, str] = {}

    # --------------------------------------------------------------- servers
    def service_env(self) -> dict[str, str]:
        env = {}
        for kv in self.args.service_env:
            k, _, v = kv.partition("=")
            env[k] = v
        return env

    def start_service(self, name: str, flags: list[str], env: dict[str, str]) -> None:
        """Start one service process (not yet waited for) with the model under test and ``flags``."""
        args = ["-m", "service.server", "--model-repository", str(self.model.repository),
                "--model-name", self.model.name, "--model-version", self.model.version, *flags]  # fmt: skip
        self.servers[name] = start(name, args, self.out / "logs", env)

    def start_servers(self, designs: list[str]) -> None:
        for d in designs:
            if d == "service" or d == "service+accesslog":
                log_flag = "--access-log" if (d == "service+accesslog" or self.args.access_log) else "--no-access-log"
                self.start_service(d, [log_flag, *self.args.service_arg], self.service_env())
            else:
                args = ["-m", "bench.baselines", "--kind", d, "--model", str(self.model.folder)]
                self.servers[d] = start(d, args, self.out / "logs")
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
        mb, calls = mean_batch(before, after)
        s = sampler.sample
        pt = Point(
            design,
            w.name,
            c,
            w.images_per_request,
            r.good_rps,
            r.good_rps * w.images_per_request,
            r.p50_ms,
            r.p90_ms,
            r.p95_ms,
            r.p99_ms,
            r.p999_ms,
            r.latency_mean_ms,
            r.latency_max_ms,
            r.requests,
            r.errors,
            r.errors_status,
            r.errors_socket,
            r.duration_s,
            r.wrk_cpu_util,
            s.cpu_util,
            s.rss_peak_mb,
            mb,
            calls,
            note,
        )
        self.points.append(pt)
        print(
            f"  {design:<18} {w.name:<15} c={c:<4} {pt.rps:>9.0f} req/s {pt.images_per_s:>10.0f} img/s "
            f"p50 {pt.p50_ms:7.2f} p99 {pt.p99_ms:7.2f} ms err {pt.errors} batch {mb or 0:.1f} "
            f"cpu {s.cpu_util:.2f} rss {s.rss_peak_mb:.0f} MB wrk-cpu {r.wrk_cpu_util:.2f} {note}",
            flush=True,
        )
        return pt, other_r


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
    result: dict[str, Any] = {
        "machine": machine(),
        "model": {
            "name": model.name,
            "version": model.version,
            "standin": model.standin,
            "path": str(model.onnx_path),
        },
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "access_log_in_comparison": bool(args.access_log),
    }
    print(
        f"model {model.name}/{model.version}{' (stand-in)' if model.standin else ''}; "
        f"machine {result['machine']['cpu']} x{result['machine']['cores']}",
        flush=True,
    )

    engine_best = None
    if args.engine:
        print("engine ceiling (in-process ONNX Runtime):", flush=True)
        eps = engine.sweep(model.onnx_path, digits, seconds=args.engine_seconds, repeat=args.repeat)
        for e in eps:
            print(
                f"  batch {e.batch:>5} threads {e.intra_op_threads} spin {int(e.spinning)}: "
                f"{e.images_per_s:>10.0f} images/s ({e.ms_per_batch:.3f} ms/call)"
            )
        b = engine.best(eps)
        engine_best = b.images_per_s
        result["engine"] = {"points": [e.to_dict() for e in eps], "best": b.to_dict()}

    json_w, png_w = single_json(digits), single_png(digits)
    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as tmp:
        bench = Bench(args, model, out, Path(tmp))
        server_designs = list(designs)
        if args.access_log_check and "service" in designs:
            server_designs.append("service+accesslog")
        try:
            bench.start_servers(server_designs)
            result["servers"] = {d: {"pid": s.pid, "port": s.port} for d, s in bench.servers.items()}
            for d in server_designs:
                bench.warm(d, json_w)
            for r in range(args.repeat):
                print(f"single-image JSON, round {r + 1} of {args.repeat}:", flush=True)
                for c in args.concurrency:
                    for d in designs:
                        bench.point(d, json_w, c)
                    if c == args.high and "service+accesslog" in bench.servers:
                        bench.point("service+accesslog", json_w, c, note="access log on")
            bench.points = best_of_repeats(bench.points)
            if "service" in designs:
                _service_only(bench, args, digits, png_w, json_w)
            result["rss_hwm_mb"] = {d: _vm_hwm(s.pid) for d, s in bench.servers.items()}
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
    ts = targets(points, engine_best, c_high=args.high, c_low=min(args.concurrency))
    result["points"] = [p.to_dict() for p in points]
    result["cpu_normalised"] = _cpu_normalised(points, args.high)
    result["targets"] = [t.to_dict() for t in ts]
    result["mixed"] = getattr(bench, "mixed", None)
    result["profile"] = getattr(bench, "profile", None)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["elapsed_s"] = round(time.time() - started, 1)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    if args.plots:
        title = f"{model.name}/{model.version}, {result['machine']['cores']} cores, wrk, 1 worker"
        plots.write_all(points, engine_best, out, title)
    print()
    print(table(points))
    print()
    if result.get("mixed"):
        m = result["mixed"]
        print(
            f"single-image JSON c=1 beside a bulk load ({m['bulk_workload']} c={m['bulk_concurrency']}): "
            f"p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms (alone: p99 {m['alone_p99_ms']:.2f} ms); "
            f"bulk {m['bulk_images_per_s']:.0f} images/s"
        )
    if engine_best:
        print(f"engine ceiling: {engine_best:.0f} images/s ({result['engine']['best']})")
    print(targets_table(ts))
    cn = result["cpu_normalised"]
    if cn:
        print(
            f"requests per server CPU-second, JSON c={args.high} (less sensitive to other load on the machine): "
            + ", ".join(f"{k} {v:.0f}" for k, v in cn["req_per_cpu_s"].items())
            + "; service vs "
            + ", ".join(f"{k} {v:.2f}x" for k, v in cn["service_ratio"].items())
        )
    print(f"\nwrote {out / 'results.json'} ({result['elapsed_s']} s)")
    return result


def _service_only(
    bench: Bench, args: argparse.Namespace, digits: np.ndarray, png_w: Workload, json_w: Workload
) -> None:
    if args.png:
        print("single-image PNG:", flush=True)
        bench.warm("service", png_w)
        for c in args.concurrency:
            bench.point("service", png_w, c)
        if "ceiling" in bench.servers:
            bench.point("ceiling", png_w, args.high, note="canned answer, PNG body")
    if args.engine:
        # The engine again, right beside the bulk points: the machine's other load moves within a run.
        eps = engine.sweep(bench.model.onnx_path, digits, batches=(64, 256, 1024),
                           configs=((1, False), (2, False)), seconds=args.engine_seconds)  # fmt: skip
        bench.engine_again = [e.to_dict() for e in eps]  # type: ignore[attr-defined]
        b = engine.best(eps)
        print(f"engine ceiling again, beside the bulk points: {b.images_per_s:.0f} images/s (batch {b.batch}, "
              f"{b.intra_op_threads} threads)", flush=True)  # fmt: skip
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
    if args.mixed:
        print("single image beside a bulk load:", flush=True)
        bw = bulk_raw(digits, args.mixed_bulk)
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
    if args.profile:
        bench.profile = {  # type: ignore[attr-defined]
            "json": _profiled(bench, json_w, args.high, "profile-json.txt"),
            "bulk": _profiled(bench, bulk_raw(digits, args.mixed_bulk), 1, "profile-bulk.txt"),
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
    per = {d: p.req_per_cpu_s for d in DESIGNS if (p := find(points, d, "json", high)) is not None}
    if "service" not in per:
        return {}
    ratios = {d: per["service"] / v for d, v in per.items() if d != "service" and v > 0}
    return {"req_per_cpu_s": per, "service_ratio": ratios}


def _vm_hwm(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
