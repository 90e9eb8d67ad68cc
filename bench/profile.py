"""Sampling profile of a server under load with py-spy (no restart, no instrumentation): collapsed
stacks on disk, and the top functions by own time and by inclusive time."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path, rate: int = 250) -> subprocess.Popen[bytes]:
    """Start py-spy on ``pid`` for ``seconds``; collapsed stacks go to ``out``. Caller waits.

    py-spy pauses the process for each sample (its default): slower, but every stack is one the process really
    had (``--nonblocking`` reads the stacks while they change and mixes frames of different moments)."""
    exe = py_spy()
    if exe is None:
        raise FileNotFoundError("py-spy is not installed (pip install py-spy)")
    cmd = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--threads",
        "--output",
        str(out),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _short(frame: str) -> str:
    # "handle (starlette/routing.py:123)" -> "handle (starlette/routing.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if path else name


def summarize(collapsed: Path, top: int = 15) -> dict[str, object]:
    """Top frames by own (leaf) samples and by inclusive samples, as fractions of all samples."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        n = int(count_s)
        frames = stack.split(";")
        if frames and frames[0].startswith(("thread (", "process ")):
            threads[frames[0]] += n
            frames = frames[1:]
        if not frames:
            continue
        total += n
        leaf = _short(frames[-1])
        if leaf.startswith("Runner.run "):  # no Python frame above the loop: uvloop/httptools C code
            leaf = "(native event loop: uvloop + httptools, socket I/O)"
        own[leaf] += n
        for f in {_short(f) for f in frames}:
            incl[f] += n
    return {
        "samples": total,
        "loop": thread_areas(collapsed),
        "bulk_threads": thread_areas(collapsed, "engine-bulk"),
        "threads": {k: v for k, v in threads.most_common(10)},
        "own": [(k, round(v / total, 4)) for k, v in own.most_common(top)] if total else [],
        "inclusive": [(k, round(v / total, 4)) for k, v in incl.most_common(top * 2)] if total else [],
    }


def _area(frame: str) -> str:
    """Where a frame's code lives: a service module (``service/decode.py``), else the top-level package or
    module (``numpy``, ``asyncio``, ``selectors``). py-spy names files relative to their ``sys.path`` entry, and
    native code called from Python counts where it is called (it samples Python stacks)."""
    path = frame.rpartition(" (")[2].rstrip(")").rsplit(":", 1)[0]
    if "service/" in path:
        return "service/" + path.rsplit("service/", 1)[1]
    return path.split("/", 1)[0].removesuffix(".py") or frame


def thread_areas(collapsed: Path, thread: str = "MainThread") -> dict[str, object]:
    """The samples of the threads whose name contains ``thread`` (the event loop's: ``MainThread``): the share
    spent waiting for events (``idle``: the selector), and the busy samples by the area of the running frame
    (``_area``), largest first. For engine threads, waiting for work shows as ``concurrent`` (the pool's queue)."""
    areas: Counter[str] = Counter()
    idle = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        frames = stack.split(";")
        if not count_s.isdigit() or len(frames) < 2 or thread not in frames[0]:
            continue
        if frames[-1].startswith(("EpollSelector.select ", "select ")) and "selectors.py" in frames[-1]:
            idle += int(count_s)
        else:
            areas[_area(frames[-1])] += int(count_s)
    busy = sum(areas.values())
    total = busy + idle
    return {
        "samples": total,
        "idle": round(idle / total, 4) if total else None,
        "busy_by_area": [(k, round(v / busy, 4)) for k, v in areas.most_common()] if busy else [],
    }


def format_summary(summary: dict[str, object]) -> str:
    lines = [f"py-spy: {summary['samples']} samples (active, all threads)", "top by own time:"]
    own = summary.get("own") or []
    assert isinstance(own, list)
    lines += [f"  {share * 100:5.1f}%  {name}" for name, share in own]
    lines.append("top by inclusive time:")
    inclusive = summary.get("inclusive") or []
    assert isinstance(inclusive, list)
    lines += [f"  {share * 100:5.1f}%  {name}" for name, share in inclusive]
    for key, title in (
        ("loop", "event-loop thread: {n} samples, idle {idle:.1f}%; busy by area:"),
        ("bulk_threads", "bulk engine threads: {n} samples by area (concurrent: waiting for work):"),
    ):
        part = summary.get(key)
        if isinstance(part, dict) and part.get("busy_by_area"):
            lines.append(title.format(n=part["samples"], idle=part["idle"] * 100))
            lines += [f"  {share * 100:5.1f}%  {name}" for name, share in part["busy_by_area"]]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m bench.profile STACKS...: the summary of raw py-spy stacks already taken
    for arg in sys.argv[1:]:
        print(f"== {arg}")
        print(format_summary(summarize(Path(arg))))
