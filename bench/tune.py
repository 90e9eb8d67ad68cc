"""``python -m bench.tune``: service settings side by side. Every variant runs as its own service process
at the same time (idle ones cost nothing) plus the framework ceiling, and the points are interleaved
variant by variant, so each setting is compared with the default seconds apart on a shared machine.

Each variant gets: single-image JSON at a high and at concurrency 1, and one bulk binary point.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.models import DEFAULT_REPOSITORY, find_model, real_digits
from bench.report import Point, best_of_repeats, table
from bench.run import Bench, build_parser
from bench.servers import start
from bench.workloads import bulk_raw, single_json

#: name -> (mnist-serve flags, environment). The first is the reference.
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "default": ([], {}),
    "access-log": (["--access-log"], {}),
    "intra-op-2": ([], {"MNIST_INTRA_OP_THREADS": "2"}),
    "spinning": ([], {"MNIST_ALLOW_SPINNING": "true"}),
    "wait-1ms": ([], {"MNIST_MAX_WAIT_MS": "1"}),
    "batch-64": ([], {"MNIST_MAX_BATCH_SIZE": "64"}),
    "batch-1024": ([], {"MNIST_MAX_BATCH_SIZE": "1024"}),
    "inline-0": ([], {"MNIST_INLINE_BUDGET_US": "0"}),
    "inline-100": ([], {"MNIST_INLINE_BUDGET_US": "100"}),
    "inline-1000": ([], {"MNIST_INLINE_BUDGET_US": "1000"}),
    "int8": ([], {"MNIST_MODEL_PRECISION": "int8"}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--out", type=Path, default=Path("bench-results/tune"))
    parser.add_argument("--duration", type=float, default=5.0, help="Seconds per point (default 5).")
    parser.add_argument("--repeat", type=int, default=2, help="Rounds; the best is kept (default 2).")
    parser.add_argument("--high", type=int, default=64, help="The high concurrency (default 64).")
    parser.add_argument("--bulk", type=int, default=1024, help="Images per bulk request (default 1024).")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Variants to run (default all).")
    args = parser.parse_args(argv)

    model = find_model(args.model_repository)
    digits = real_digits(4096, model)
    names = [v for v in args.variants.split(",") if v]
    bench_args = build_parser().parse_args(["--duration", str(args.duration), "--warmup", "1"])
    args.out.mkdir(parents=True, exist_ok=True)
    json_w, bulk_w = single_json(digits), bulk_raw(digits, args.bulk)
    with tempfile.TemporaryDirectory(prefix="mnist-tune-") as tmp:
        bench = Bench(bench_args, model, args.out, Path(tmp))
        try:
            for name in names:
                flags, env = VARIANTS[name]
                log_flags = [] if "--access-log" in flags else ["--no-access-log"]
                bench.start_service(name, [*log_flags, *flags], env)
            bench.servers["ceiling"] = start(
                "ceiling", ["-m", "bench.baselines", "--kind", "ceiling"], args.out / "logs"
            )
            for s in bench.servers.values():
                s.wait_ready()
            for name in bench.servers:
                bench.warm(name, json_w)
            for r in range(args.repeat):
                print(f"round {r + 1} of {args.repeat}:", flush=True)
                for name in names:
                    bench.point(name, json_w, args.high)
                bench.point("ceiling", json_w, args.high)
                for name in names:
                    bench.point(name, json_w, 1)
                    bench.point(name, bulk_w, 1)
        finally:
            bench.stop_servers()
    points = best_of_repeats(bench.points)
    print()
    print(table(points))
    summary = _summary(points, names, args.high, bulk_w.name)
    print()
    for row in summary:
        print(
            f"{row['variant']:<12} json c={args.high} {row['rps_high']:>7.0f} req/s ({row['vs_default_high']:.2f}x default, "
            f"{row['vs_ceiling']:.2f}x ceiling) p99 {row['p99_high']:.1f} ms | c=1 p50 {row['p50_c1']:.3f} ms | "
            f"bulk {row['bulk_ips']:.0f} img/s ({row['vs_default_bulk']:.2f}x) | req/cpu-s {row['req_per_cpu_s']:.0f}"
        )
    (args.out / "tune.json").write_text(
        json.dumps({"points": [p.to_dict() for p in points], "summary": summary}, indent=1)
    )
    return 0


def _summary(points: list[Point], names: list[str], high: int, bulk: str) -> list[dict[str, Any]]:
    def get(design: str, workload: str, c: int) -> Point:
        return next(p for p in points if p.design == design and p.workload == workload and p.concurrency == c)

    ceiling = get("ceiling", "json", high).rps
    ref_high, ref_bulk = get(names[0], "json", high).rps, get(names[0], bulk, 1).images_per_s
    rows = []
    for name in names:
        hi, lo, bk = get(name, "json", high), get(name, "json", 1), get(name, bulk, 1)
        rows.append(
            {
                "variant": name,
                "rps_high": hi.rps,
                "vs_default_high": hi.rps / ref_high if ref_high else 0.0,
                "vs_ceiling": hi.rps / ceiling if ceiling else 0.0,
                "p99_high": hi.p99_ms,
                "p50_c1": lo.p50_ms,
                "bulk_ips": bk.images_per_s,
                "vs_default_bulk": bk.images_per_s / ref_bulk if ref_bulk else 0.0,
                "req_per_cpu_s": hi.req_per_cpu_s,
                "mean_batch_high": hi.mean_batch,
            }
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
