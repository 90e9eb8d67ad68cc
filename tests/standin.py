"""An engine whose cost the test controls: the real service (``service.server.main``) with the real ONNX model,
where every engine call (``service.model.Model.run``: golden check, warm-up, calibration and every batch) first

- blocks while a *gate file* exists (the test holds the engine by creating it, releases it by deleting it),
- then sleeps a fixed ``--delay-s``,

and writes ``enter N`` / ``exit N`` (N images) to a *journal* file, so the test can see a call held at the gate.

    python -m tests.standin --delay-s 0.05 --gate-file /tmp/gate --journal /tmp/journal -- --port 8001 ...

Admission tests need an engine that is slow by a known amount on any machine; a compute-heavy model costs
5x more on one CPU than on another, a sleep does not. The delay applies from the first call, so the
service measures the engine as the slow engine it is (a cheap first measurement could make it run batches
inline on the event loop, where a held gate would freeze the whole server).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GATE_POLL_S = 0.002


def install(delay_s: float, gate: Path | None, journal: Path | None) -> None:
    """Wrap ``Model.run`` in this process: gate, then delay, then the real ONNX Runtime call."""
    import numpy as np

    from service.model import Model

    real: Callable[[Model, np.ndarray], np.ndarray] = Model.run
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if journal is not None else None

    def note(event: str, n: int) -> None:
        if fd is not None:
            os.write(fd, f"{event} {n}\n".encode())  # one O_APPEND write per line: never interleaved

    def run(self: Model, batch: np.ndarray) -> np.ndarray:
        n = int(batch.shape[0])
        note("enter", n)
        try:
            while gate is not None and gate.exists():
                time.sleep(GATE_POLL_S)
            if delay_s > 0:
                time.sleep(delay_s)
            return real(self, batch)
        finally:
            note("exit", n)

    Model.run = run  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="python -m tests.standin", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--delay-s", type=float, default=0.0, help="Seconds every engine call sleeps.")
    p.add_argument("--gate-file", type=Path, help="Engine calls block while this file exists.")
    p.add_argument("--journal", type=Path, help="Append 'enter N' and 'exit N' per engine call.")
    args = p.parse_args(argv[:split])
    install(args.delay_s, args.gate_file, args.journal)
    from service import server

    return server.main(argv[split + 1 :])


# ---------------------------------------------------------------------------------------------- test side
@dataclass
class Engine:
    """The test's handle on a stand-in engine: its gate, its journal, the launcher that starts it."""

    folder: Path
    delay_s: float = 0.05

    @property
    def gate(self) -> Path:
        return self.folder / "gate"

    @property
    def journal(self) -> Path:
        return self.folder / "journal"

    def launcher(self) -> tuple[str, ...]:
        """What follows ``python`` to start the service on this engine (see reliability.serverproc.start)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return ("-m", "tests.standin", "--delay-s", str(self.delay_s), "--gate-file", str(self.gate),
                "--journal", str(self.journal), "--")  # fmt: skip

    def hold(self) -> None:
        """From now on, every engine call waits at the gate (a call already past it finishes)."""
        self.gate.touch()

    def release(self) -> None:
        self.gate.unlink(missing_ok=True)

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Hold the engine for the block; released on the way out, whatever happens in it."""
        self.hold()
        try:
            yield
        finally:
            self.release()

    def calls(self) -> tuple[int, int]:
        """(engine calls entered, engine calls finished) since the process started."""
        if not self.journal.exists():
            return 0, 0
        lines = self.journal.read_text().splitlines()
        return sum(ln.startswith("enter ") for ln in lines), sum(ln.startswith("exit ") for ln in lines)

    def in_progress(self) -> int:
        """Engine calls in progress now (waiting at the gate, sleeping or computing)."""
        entered, finished = self.calls()
        return entered - finished

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()  # never leave a server blocked: its drain would wait for the held calls


if __name__ == "__main__":
    sys.exit(main())
