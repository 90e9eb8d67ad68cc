"""The processes under test: the service and the baselines, each a subprocess on 127.0.0.1 started by the one
launcher (reliability/serverproc.py), and what is read from them during a point (CPU seconds and resident
memory through psutil, batch sizes from /metrics)."""

from __future__ import annotations

import contextlib
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from reliability.serverproc import ServerProcess, free_port, spawn

__all__ = ["ProcSampler", "ServerProcess", "free_port", "mean_batch", "scrape", "start"]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def start(name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> ServerProcess:
    """``python <args> --port P`` from the repository root, its log ``<log_dir>/<name>.log`` (not yet waited
    for): reliability/serverproc.py's launcher, the one every server of the tests and scripts comes from."""
    return spawn(args, log_dir / f"{name}.log", env=env, name=name)


@dataclass
class ProcSample:
    cpu_s: float
    wall_s: float
    rss_peak_mb: float  # the largest single process of the tree (the one that serves)
    rss_end_mb: float
    threads: int
    rss_tree_peak_mb: float = 0.0  # every process of the tree together (granian: supervisor + worker)
    processes: int = 1
    main_thread_cpu_s: float = 0.0  # the serving process's main thread: the event loop's thread

    @property
    def main_thread_util(self) -> float:
        """The event loop thread's CPU use in cores (1.0 = that one thread never stopped)."""
        return self.main_thread_cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_util(self) -> float:
        """CPU used, in cores (1.0 = one core busy all the time)."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class ProcSampler:
    """CPU seconds (all threads of the process and of its children, e.g. granian's worker) between start and
    stop, and the peak RSS sampled every ``interval`` s: of the largest process, and of the tree together."""

    pid: int
    interval: float = 0.05
    _procs: list[psutil.Process] = field(init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _peak: int = field(default=0, init=False)
    _tree_peak: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        root = psutil.Process(self.pid)
        self._procs = [root, *root.children(recursive=True)]

    def _cpu(self) -> float:
        total = 0.0
        for p in self._procs:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            total += float(t.user + t.system)
        return total

    def _main_thread(self) -> float:
        """CPU seconds of the main thread of the process that serves (the biggest one: granian's worker)."""
        try:
            serving = max(self._procs, key=lambda p: p.memory_info().rss)
            return next((float(t.user_time + t.system_time) for t in serving.threads() if t.id == serving.pid), 0.0)
        except (psutil.Error, ValueError):
            return 0.0

    def _rss(self) -> tuple[int, int]:
        sizes = []
        for p in self._procs:
            try:
                sizes.append(p.memory_info().rss)
            except psutil.Error:
                continue
        return (max(sizes), sum(sizes)) if sizes else (0, 0)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            one, tree = self._rss()
            if not tree:
                return
            self._peak = max(self._peak, one)
            self._tree_peak = max(self._tree_peak, tree)

    def __enter__(self) -> ProcSampler:
        self._cpu0 = self._cpu()
        self._main0 = self._main_thread()
        self._t0 = time.monotonic()
        self._peak, self._tree_peak = self._rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        one, tree = self._rss()
        threads = 0
        for p in self._procs:
            with contextlib.suppress(psutil.Error):
                threads += p.num_threads()
        self.sample = ProcSample(
            cpu_s=self._cpu() - self._cpu0,
            wall_s=time.monotonic() - self._t0,
            rss_peak_mb=max(self._peak, one) / 2**20,
            rss_end_mb=one / 2**20,
            threads=threads,
            rss_tree_peak_mb=max(self._tree_peak, tree) / 2**20,
            processes=len(self._procs),
            main_thread_cpu_s=max(0.0, self._main_thread() - self._main0),
        )


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")


def scrape(url: str) -> dict[str, float]:
    """The service's /metrics as {name{labels}: value}; empty when the target has no /metrics."""
    try:
        status, body = http_get(url + "/metrics")
    except OSError:
        return {}
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def mean_batch(before: dict[str, float], after: dict[str, float]) -> tuple[float | None, int]:
    """Mean images per engine call between two scrapes, and the number of engine calls."""
    key_sum, key_count = "mnist_batch_size_images_sum", "mnist_batch_size_images_count"
    if key_count not in after or key_count not in before:
        return None, 0
    calls = int(after[key_count] - before[key_count])
    if calls <= 0:
        return None, 0
    return (after[key_sum] - before[key_sum]) / calls, calls
