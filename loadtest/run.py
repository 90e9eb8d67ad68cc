"""``mnist-loadtest``: run the locust users headless for a bounded time against a running service, write
the CSV stats and the HTML report, and exit non-zero when an SLO is missed.

Before any load the target must answer ``GET /readyz`` with 200: a dead port, a refused connection or a
service that is not ready ends the run at once (exit 2) instead of timing a flood of connection errors.
Every SLO is judged only when the error ratio is within its limit: the latency of failed requests (a refused
connection takes microseconds) says nothing, so an error ratio over its limit misses every SLO.

It prints the load it offers: a profile with think time (``mixed``) is a closed loop that offers about
``users / mean think time`` requests per second, whatever the service can do.

Exit codes: 0 all SLOs met; 1 an SLO missed (p99 latency or error ratio); 2 the run itself failed
(target unreachable or not ready, locust crashed, no stats, refused target).
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from loadtest.profiles import PROFILES

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


@dataclass(frozen=True)
class Summary:
    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rps: float

    @property
    def error_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 1.0


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(ai[4][0]).is_loopback for ai in socket.getaddrinfo(host, None))
        except OSError:
            return False


def check_target(url: str, timeout: float = 5.0) -> str | None:
    """None when ``url``/readyz answers 200; otherwise why not (refused, timed out, not ready...)."""
    probe = url.rstrip("/") + "/readyz"
    try:
        with urllib.request.urlopen(probe, timeout=timeout) as resp:
            status = int(resp.status)
    except urllib.error.HTTPError as exc:
        return f"{probe} answered {exc.code} (the service is not ready or is draining)"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return f"{probe} is unreachable: {reason}"
    return None if status == 200 else f"{probe} answered {status}"


def read_summary(stats_csv: Path) -> Summary:
    """The "Aggregated" row of locust's ``<prefix>_stats.csv``."""
    with stats_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    agg = next((r for r in rows if r.get("Name") == "Aggregated"), None)
    if agg is None:
        raise ValueError(f"{stats_csv} has no Aggregated row")

    def num(key: str) -> float:
        value = agg.get(key) or "0"
        return float(value) if value != "N/A" else float("nan")

    return Summary(
        int(num("Request Count")), int(num("Failure Count")), num("50%"), num("95%"), num("99%"), num("Requests/s")
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mnist-loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="http://127.0.0.1:8000", help="Service URL (default http://127.0.0.1:8000).")
    p.add_argument("--allow-remote", action="store_true", help="Allow a target that is not a loopback address.")
    p.add_argument("--profile", choices=sorted(PROFILES), default="mixed", help="User class (default mixed).")
    p.add_argument("--users", type=int, default=20, help="Concurrent users (default 20).")
    p.add_argument("--spawn-rate", type=float, default=20.0, help="Users started per second (default 20).")
    p.add_argument("--run-time", default="30s", help="How long to run, locust syntax: 10s, 2m (default 30s).")
    p.add_argument("--out", type=Path, default=Path("loadtest-results"), help="Folder for CSV and HTML.")
    p.add_argument("--p99-ms", type=float, default=100.0, help="SLO: aggregated p99 latency, ms (default 100).")
    p.add_argument("--max-error-ratio", type=float, default=0.001, help="SLO: failed/total requests (default 0.001).")
    p.add_argument("--bulk-size", type=int, default=256, help="Images per bulk request (default 256).")
    return p


def _seconds(run_time: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    total, num = 0.0, ""
    for ch in run_time.strip():
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in units and num:
            total += float(num) * units[ch]
            num = ""
        else:
            raise ValueError(f"bad run time {run_time!r}")
    return total + (float(num) if num else 0.0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.allow_remote and not is_loopback(args.host):
        print(f"mnist-loadtest: refusing non-loopback target {args.host} (pass --allow-remote)", file=sys.stderr)
        return 2
    try:
        seconds = _seconds(args.run_time)
    except ValueError as exc:
        print(f"mnist-loadtest: {exc}", file=sys.stderr)
        return 2
    problem = check_target(args.host)
    if problem:
        print(f"mnist-loadtest: target not usable, no load sent: {problem}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / "locust"
    html = args.out / "report.html"
    profile = PROFILES[args.profile]
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        args.host,
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.run_time,
        "--stop-timeout",
        "5",
        "--csv",
        str(prefix),
        "--html",
        str(html),
        "--only-summary",
        "--loglevel",
        "WARNING",
        profile.user_class,
    ]
    env = {**os.environ, "MNIST_LOADTEST_BULK": str(args.bulk_size)}
    print(f"mnist-loadtest: {args.profile} users={args.users} for {args.run_time} against {args.host}", flush=True)
    print(profile.describe(args.users), flush=True)
    try:
        proc = subprocess.run(cmd, env=env, timeout=seconds + 60, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        print("mnist-loadtest: locust did not stop in time", file=sys.stderr)
        return 2
    (args.out / "locust.log").write_text(proc.stdout + proc.stderr)
    stats = Path(f"{prefix}_stats.csv")
    if proc.returncode not in (0, 1) or not stats.exists():
        print(f"mnist-loadtest: locust failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return 2
    s = read_summary(stats)
    if s.requests == 0:
        print("mnist-loadtest: no request was made", file=sys.stderr)
        return 2
    err_ok = s.error_ratio <= args.max_error_ratio
    p99_ok = err_ok and s.p99_ms <= args.p99_ms
    offered = profile.offered_rps(args.users)
    print(
        f"requests {s.requests}, {s.rps:.1f} req/s"
        + (f" (offered about {offered:.1f} req/s)" if offered is not None else "")
        + f", failures {s.failures} ({s.error_ratio:.4%}), "
        f"p50 {s.p50_ms:g} ms, p95 {s.p95_ms:g} ms, p99 {s.p99_ms:g} ms"
    )
    print(f"{'PASS' if err_ok else 'MISS'}  error ratio {s.error_ratio:.4%} <= {args.max_error_ratio:.4%}")
    if err_ok:
        print(f"{'PASS' if p99_ok else 'MISS'}  p99 {s.p99_ms:g} ms <= {args.p99_ms:g} ms")
    else:
        print(f"MISS  p99 {s.p99_ms:g} ms <= {args.p99_ms:g} ms not judged: the error ratio is over its limit, "
              "and the latency of failed requests says nothing")  # fmt: skip
    if offered is not None and args.profile == "mixed":
        print(f"note: the mixed profile's rate is set by its think time ({s.rps:.1f} req/s for about {offered:.1f} "
              "offered): it checks latency and correctness under a realistic mix, not capacity "
              "(use --profile json, png or bulk, or more --users)")  # fmt: skip
    print(f"wrote {stats}, {html}")
    return 0 if p99_ok and err_ok else 1


if __name__ == "__main__":
    sys.exit(main())
