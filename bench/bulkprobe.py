"""Bulk probe: the bulk binary path of the service under a few configurations, side by side, in one run.

For each configuration (``--config NAME=K=V,K=V``: extra ``MNIST_*`` environment) one service process is
started (all at once; idle ones cost nothing), then, round by round and interleaved:

- ``bulk``: raw uint8, ``--images`` per request, ``--connections`` (2): images/s, p99, the server's CPU by
  thread (event loop, engine threads, others) in cores, its minor page faults per request, the machine's
  CPU by kind (idle, user, nice: the bulk threads run niced), and the server's resident memory after the
  point (its peak so far, and anonymous against file-backed; also printed at ready); with
  ``BULKPROBE_STATES=1`` also how often the bulk threads were runnable and how often two runnable threads were
  stacked on one CPU;
- ``mixed``: single-image JSON at 1 connection beside that bulk load: its p50/p99 and the bulk images/s;
- the engine ceiling (in-process ONNX Runtime, the service's session options, 1 and 2 callers, batch 256 and
  512), so every ratio is read against the machine's limit in the same run.

``--profile FILE`` py-spies (non-blocking, GIL holders only) the first configuration's first bulk point.
Run under the shared lock: ``flock /tmp/bench.lock python -m bench.bulkprobe --config p1=MNIST_BULK_PARALLEL=1
--config p2=MNIST_BULK_PARALLEL=2,MNIST_BULK_CHUNK_IMAGES=1024``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from bench import engine, profile
from bench.loadgen import WrkRun, run_wrk
from bench.models import DEFAULT_REPOSITORY, find_model, real_digits
from bench.servers import ServerProcess, scrape, start
from bench.workloads import bulk_raw, single_json


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (the native name, ``/proc/<pid>/task/<tid>/comm``), the main thread as 'loop'."""
    out: collections.Counter[str] = collections.Counter()
    try:
        threads = psutil.Process(pid).threads()
    except psutil.Error:
        return {}
    for t in threads:
        try:
            name = Path(f"/proc/{pid}/task/{t.id}/comm").read_text().strip()
        except OSError:
            continue
        out["loop" if t.id == pid else name] += t.user_time + t.system_time
    return dict(out)


STATES = os.environ.get("BULKPROBE_STATES") == "1"


def _stat() -> dict[str, int]:
    """The machine's CPU time so far by kind, in USER_HZ ticks (``/proc/stat``)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return dict(zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq"), v, strict=True))


def _faults(pid: int) -> int:
    """Minor page faults of the process so far (``/proc/<pid>/stat`` field 10)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def _memory(pid: int) -> str:
    """Resident memory now, its peak so far (``VmHWM``), and now by kind: anonymous (heaps, arenas, buffers) and
    file-backed (the mapped libraries' pages, whose resident share depends on the page cache), in MB."""
    f = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
         if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile"))}  # fmt: skip
    return f"rss {f['VmRSS']:.0f} peak {f['VmHWM']:.0f} MB (anon {f['RssAnon']:.0f}, file {f['RssFile']:.0f})"


def _states(pid: int, seconds: float) -> str:
    """Sample (every ~1 ms) which of the service's threads are runnable: the share of samples where 0, 1 or 2
    bulk threads were runnable ('R'), and where the runnable threads sat on fewer CPUs than there are."""
    tids = os.listdir(f"/proc/{pid}/task")
    bulk = [t for t in tids if Path(f"/proc/{pid}/task/{t}/comm").read_text().startswith("engine-bulk")]
    counts: collections.Counter[str] = collections.Counter()
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        states = []
        for t in tids:
            with contextlib.suppress(OSError):
                f = Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()
                states.append((t, f[0], int(f[36])))
        running = [(t, cpu) for t, st, cpu in states if st == "R"]
        counts[f"bulkR={sum(1 for t, _ in running if t in bulk)}"] += 1
        if len(running) >= 2 and len({cpu for _, cpu in running}) == 1:
            counts["stacked"] += 1
        counts[f"R={len(running)}"] += 1
        n += 1
        time.sleep(0.001)
    return " ".join(f"{k} {v / n:.2f}" for k, v in sorted(counts.items()))


def _bulk(server: ServerProcess, w: object, prefix: str, seconds: float, connections: int = 2) -> str:
    f0, s0 = _faults(server.pid), _stat()
    before, t0 = _thread_cpu(server.pid), time.monotonic()
    m0 = scrape(server.url)
    run = WrkRun(server.url, w, prefix, connections, seconds, 1)  # type: ignore[arg-type]
    states = _states(server.pid, seconds - 1) if STATES else ""
    r = run.result()
    wall = time.monotonic() - t0
    m1 = scrape(server.url)
    after = _thread_cpu(server.pid)
    faults = _faults(server.pid) - f0
    s1 = _stat()
    machine = {k: (s1[k] - s0[k]) / wall / 100 for k in s0}  # USER_HZ 100 -> cores
    cpu = {k: (v - before.get(k, 0.0)) / wall for k, v in after.items()}
    calls = m1.get("mnist_batch_size_images_count", 0) - m0.get("mnist_batch_size_images_count", 0)
    images = m1.get("mnist_batch_size_images_sum", 0) - m0.get("mnist_batch_size_images_sum", 0)
    threads = " ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v >= 0.01)
    return (f"{r.good_rps * w.images_per_request:>9.0f} img/s p50 {r.p50_ms:6.2f} p99 {r.p99_ms:6.2f} ms "  # type: ignore[attr-defined]
            f"err {r.errors} batch {images / calls if calls else 0:.0f} cpu {sum(cpu.values()):.2f} [{threads}] "
            f"wrk {r.wrk_cpu_util:.2f} faults/req {faults / max(r.requests, 1):.0f} "
            f"machine idle {machine['idle']:.2f} softirq {machine['softirq']:.2f} sys {machine['system']:.2f} "
            f"user {machine['user']:.2f} nice {machine['nice']:.2f} {_memory(server.pid)} {states}")  # fmt: skip


def _spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy, not pausing the process (``--nonblocking``: the profile costs the server nothing)."""
    cmd = [str(profile.py_spy()), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate",
           "500", "--format", "raw", "--threads", "--nonblocking", "--gil", "--output", str(out)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], metavar="NAME=K=V,K=V")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--connections", type=int, default=2, help="bulk connections (default 2)")
    p.add_argument("--no-mixed", action="store_true")
    p.add_argument("--profile", type=Path, help="py-spy the first configuration's bulk point into this file")
    args = p.parse_args()
    model = find_model(DEFAULT_REPOSITORY)
    digits = real_digits(4096, model)
    configs: dict[str, dict[str, str]] = {}
    for c in args.config or ["default="]:
        name, _, env = c.partition("=")
        configs[name] = dict(kv.split("=", 1) for kv in env.split(",") if kv)
    bw, jw = bulk_raw(digits, args.images), single_json(digits)
    with tempfile.TemporaryDirectory(prefix="bulkprobe-") as tmp:
        servers: dict[str, ServerProcess] = {}
        try:
            for name, env in configs.items():
                flags = ["--model-repository", str(model.repository), "--no-access-log"]
                servers[name] = start(name, ["-m", "service.server", *flags], Path(tmp) / "logs", env)
            for name, s in servers.items():
                s.wait_ready()
                print(f"  {name:<14} ready  {_memory(s.pid)}", flush=True)
            bp, jp = bw.write(Path(tmp)), jw.write(Path(tmp))
            for s in servers.values():
                run_wrk(s.url, bw, bp, 2, 1, 1)
                run_wrk(s.url, jw, jp, 1, 1, 1)
            for r in range(args.rounds):
                eps = engine.sweep(model.onnx_path, digits, batches=(256, 512), configs=("service", "service-x2"),
                                   seconds=0.5)  # fmt: skip
                best = engine.best(eps)
                one = max(e.images_per_s for e in eps if e.config == "service")
                print(f"round {r + 1}: engine best {best.images_per_s:.0f} img/s ({best.config} batch {best.batch}); "
                      f"one caller {one:.0f}", flush=True)  # fmt: skip
                for name, s in servers.items():
                    spy = _spy(s.pid, args.seconds, args.profile) if args.profile and r == 0 else None
                    print(f"  {name:<14} bulk   {_bulk(s, bw, bp, args.seconds, args.connections)}", flush=True)
                    if spy is not None:
                        spy.wait()
                        args.profile = None
                    if args.no_mixed:
                        continue
                    other = WrkRun(s.url, bw, bp, 2, args.seconds, 1)
                    j = run_wrk(s.url, jw, jp, 1, args.seconds, 1)
                    b = other.result()
                    print(f"  {name:<14} mixed  json p50 {j.p50_ms:.2f} p99 {j.p99_ms:.2f} ms ({j.good_rps:.0f} req/s); "
                          f"bulk {b.good_rps * bw.images_per_request:.0f} img/s", flush=True)  # fmt: skip
        finally:
            for s in servers.values():
                s.stop()


if __name__ == "__main__":
    main()
