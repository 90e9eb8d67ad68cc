"""Shared argparse pieces for the ``mnist-train`` and ``mnist-export`` command lines."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where X says something (not for None or on/off flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


@dataclass
class NativeLog:
    """Set ``failed`` when the command fails, so the log file is kept and shown."""

    path: str | None = None
    failed: bool = False


@contextmanager
def native_logs(verbose: bool, prog: str) -> Iterator[NativeLog]:
    """Unless ``verbose``, send what native code writes to stderr (TensorFlow's C++ log: CUDA probing on a
    machine without a GPU, oneDNN notices, ``NodeDef mentions attribute ...`` lines during conversion) to a
    temporary file instead of the terminal. Python's own messages still reach stderr. If the command fails,
    the file is kept and its path printed; otherwise it is deleted.

    TensorFlow 2.16+ logs through absl before ``absl::InitializeLog()``, which ``TF_CPP_MIN_LOG_LEVEL`` does
    not silence, so the file descriptor itself is redirected.
    """
    if verbose:
        yield NativeLog()
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    log = tempfile.NamedTemporaryFile(prefix=f"{prog}-native-", suffix=".log", delete=False)  # noqa: SIM115
    os.dup2(log.fileno(), 2)
    real_stderr = sys.stderr
    rebound = _writes_to_fd2(real_stderr)
    if rebound:  # a plain terminal/pipe stderr: keep Python's messages visible through the saved descriptor
        sys.stderr = os.fdopen(
            os.dup(saved), "w", buffering=1, encoding=real_stderr.encoding, errors="backslashreplace"
        )
    state = NativeLog(path=log.name)
    try:
        yield state
    except BaseException:
        state.failed = True
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if rebound:  # left open: a logging handler made meanwhile may still hold it (it writes to the terminal)
            sys.stderr = real_stderr
        log.close()
        if state.failed and os.path.getsize(log.name):
            print(f"{prog}: TensorFlow's own log is in {log.name} (--verbose shows it live)", file=sys.stderr)
        else:
            os.unlink(log.name)


def _writes_to_fd2(stream: TextIO) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # pytest's capture objects have no usable fileno
        return False
