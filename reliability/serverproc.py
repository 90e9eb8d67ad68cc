"""Start ``python -m service.server`` as a child process on 127.0.0.1, watch its memory, stop it with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        return float(psutil.Process(self.proc.pid).memory_info().rss) / 2**20

    def stop(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start(
    repo: Path, log_path: Path, *args: str, env: dict[str, str] | None = None, timeout_s: float = 60
) -> ServerProcess:
    """Start the service with its real CLI and wait until /readyz says 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "service.server", "--port", str(port), "--model-repository", str(repo), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
    server = ServerProcess(proc, port, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; log: {log_path}")
        try:
            with urllib.request.urlopen(f"{server.url}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"the server was not ready within {timeout_s:g} s; log: {log_path}")


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
