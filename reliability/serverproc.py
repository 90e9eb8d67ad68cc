"""The one launcher of servers as child processes on 127.0.0.1: start one with its real CLI on a free port,
wait for /readyz, watch its memory, stop it with SIGTERM. The tests, the reliability scripts and the benchmark
all start their servers here: the service through :func:`start`, anything else that takes ``--port`` (the
benchmark's comparison designs, the service under granian) through :func:`spawn`.

``launcher`` is what follows ``python``: ``-m service.server`` by default; a wrapper module that ends with
``--`` (e.g. ``-m tests.standin --delay-s 0.05 --`` for an engine with a controlled cost) takes the same
server flags after it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    import httpx

ROOT = Path(__file__).resolve().parent.parent
SERVER_MODULE: tuple[str, ...] = ("-m", "service.server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    exit_code: int | None = field(default=None)
    name: str = "service"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 90) -> None:
        """:func:`wait_ready` (a longer default: the benchmark warms many servers up at once)."""
        wait_ready(self, timeout_s)

    def logs(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        return float(psutil.Process(self.proc.pid).memory_info().rss) / 2**20

    def client(self, **kw: Any) -> httpx.Client:
        """An httpx client on this server (httpx is a test dependency: imported only here)."""
        import httpx

        return httpx.Client(base_url=self.url, timeout=30, **kw)

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM (a graceful drain), then SIGKILL after ``timeout_s``; returns (and keeps) the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.exit_code = self.proc.wait()
        return self.exit_code

    def terminate(self, timeout: float = 30) -> int:
        return self.stop(timeout)


def launch(
    repo: Path,
    log_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    launcher: Sequence[str] = SERVER_MODULE,
) -> ServerProcess:
    """Start the service on a free port (stdout and stderr to ``log_path``) without waiting for it."""
    return spawn([*launcher, "--model-repository", str(repo), *args], log_path, env=env)


def spawn(argv: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None,
          name: str = "service") -> ServerProcess:  # fmt: skip
    """``python <argv> --port P`` from the repository root on a free port P, stdout and stderr to ``log_path``;
    not waited for."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        cmd = [sys.executable, *argv, "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
    return ServerProcess(proc, port, log_path, name=name)


def wait_ready(server: ServerProcess, timeout_s: float = 60) -> None:
    """Poll /readyz until it says 200; stop the process and raise (with the log's tail) otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}; log {server.log_path}:\n"
                               f"{server.logs()[-5000:]}")  # fmt: skip
        try:
            with urllib.request.urlopen(f"{server.url}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{server.name} was not ready within {timeout_s:g} s; log {server.log_path}:\n"
                       f"{server.logs()[-5000:]}")  # fmt: skip


def start(
    repo: Path,
    log_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    launcher: Sequence[str] = SERVER_MODULE,
    timeout_s: float = 60,
    wait: bool = True,
) -> ServerProcess:
    """Start the service with its real CLI and (unless ``wait`` is false) wait until /readyz says 200."""
    server = launch(repo, log_path, *args, env=env, launcher=launcher)
    if wait:
        wait_ready(server, timeout_s)
    return server


@dataclass
class RssSampler:
    """Samples a process's resident memory every ``interval_s`` in a daemon thread."""

    pid: int
    interval_s: float = 0.25
    samples: list[tuple[float, float]] = field(default_factory=list)  # (monotonic time, MiB)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        proc = psutil.Process(self.pid)

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.samples.append((time.monotonic(), proc.memory_info().rss / 2**20))
                except psutil.Error:
                    return
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def between(self, t0: float, t1: float) -> list[float]:
        return [mb for t, mb in self.samples if t0 <= t <= t1]
