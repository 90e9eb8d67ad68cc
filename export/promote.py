"""``mnist-promote``: choose the version the service serves by default, or roll back to the one before.

The choice is ``<repository>/<name>/promoted.json``: ``{"version": "2", "history": [...]}``, the history
being the promotions in order (the last one is the current one). ``mnist-export`` writes new versions beside
it and never moves it unless told to (``--promote``). A version is promoted only after it loads exactly as
the service loads it (``service.model.load_model``: files, sizes, sha256, ONNX contract, golden digits);
the pointer is replaced atomically (written beside, fsynced, renamed), so a reader sees the old or the new
one, never half a file. A running service reads the pointer when it starts; to switch one without a
restart, load the version through the admin endpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.errors import ModelLoadError
from service.model import load_model
from service.repository import PROMOTED_FILE, default_model_name, list_versions, read_promoted
from service.settings import Settings

HISTORY_LIMIT = 100


class PromoteError(Exception):
    """The version cannot be promoted (or rolled back to); the message says why."""


@dataclass(frozen=True)
class Promotion:
    name: str
    version: str
    previous: str | None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate(repository: Path, name: str, version: str) -> None:
    """Load the version as the service does (on the CPU); :class:`PromoteError` with the reason if it fails."""
    folder = repository / name / version
    if version not in list_versions(repository, name):
        found = ", ".join(list_versions(repository, name)) or "none"
        raise PromoteError(f"{name} has no version {version} in {repository} (found: {found})")
    try:
        load_model(folder, Settings.model_validate({"provider": "cpu"}), repository=repository)
    except ModelLoadError as exc:
        raise PromoteError(f"version {version} of {name} does not load: {exc}") from exc


def write_pointer(repository: Path, name: str, pointer: dict[str, Any]) -> Path:
    """Replace ``promoted.json`` atomically: a temporary file in the same folder, fsync, rename, fsync the folder."""
    folder = repository / name
    target = folder / PROMOTED_FILE
    fd, tmp = tempfile.mkstemp(prefix=".promoted-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(pointer, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def _pointer(repository: Path, name: str) -> dict[str, Any] | None:
    try:
        return read_promoted(repository, name)
    except ModelLoadError as exc:
        raise PromoteError(f"{exc}; fix or delete it, then promote again") from exc


def promote(repository: Path, name: str, version: str, *, command: str = "mnist-promote") -> Promotion:
    """Validate ``version`` and make it the promoted one (a no-op if it already is)."""
    validate(repository, name, version)
    pointer = _pointer(repository, name)
    previous = None if pointer is None else str(pointer["version"])
    if previous == version:
        return Promotion(name, version, previous)
    history = [] if pointer is None else list(pointer["history"])
    history.append({"version": version, "promoted_at": _now(), "command": command})
    write_pointer(repository, name, {"version": version, "history": history[-HISTORY_LIMIT:]})
    return Promotion(name, version, previous)


def rollback(repository: Path, name: str) -> Promotion:
    """Promote again the version promoted before the current one (dropping the current one from the history)."""
    pointer = _pointer(repository, name)
    history = [] if pointer is None else [h for h in pointer["history"] if isinstance(h.get("version"), str)]
    if pointer is None or len(history) < 2:
        raise PromoteError(f"{name} has no earlier promoted version to roll back to")
    current, earlier = str(pointer["version"]), history[:-1]
    target = str(earlier[-1]["version"])
    validate(repository, name, target)
    write_pointer(repository, name, {"version": target, "history": earlier})
    return Promotion(name, target, current)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mnist-promote",
        description="Set the version the service serves by default (models/<name>/promoted.json), after "
        "checking it loads exactly as the service loads it; or roll back to the previously promoted one.",
    )
    p.add_argument("version", nargs="?", help="version number to promote; omit it to show the promoted version")
    p.add_argument("--rollback", action="store_true", help="promote again the version promoted before this one")
    p.add_argument("--repository", type=Path, default=Path("models"), help="model repository root")
    p.add_argument("--name", default=None, help="model name (default: the first model in the repository)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        name = args.name or default_model_name(args.repository)
        if args.rollback and args.version:
            raise PromoteError("give a version or --rollback, not both")
        if args.rollback:
            done = rollback(args.repository, name)
        elif args.version:
            done = promote(args.repository, name, args.version, command=shlex.join(["mnist-promote", *argv]))
        else:
            pointer = _pointer(args.repository, name)
            versions = ", ".join(list_versions(args.repository, name))
            print(f"{name}: promoted version {pointer['version'] if pointer else 'none'} (versions: {versions})")
            return 0
    except (PromoteError, ModelLoadError) as exc:
        print(f"mnist-promote: error: {exc}", file=sys.stderr)
        return 1
    if done.previous == done.version:
        print(f"{name}: version {done.version} is already the promoted version")
    else:
        print(f"{name}: promoted version {done.version} (was {done.previous or 'none'})")
        print("A service started now serves it; a running one keeps its version until restarted or told with")
        print(f"  POST /admin/models/{name}/versions/{done.version}/load  (admin token)")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def next_steps(repository: Path, name: str, version: str, *, promoted: bool) -> str:
    """What to do with a new version: try it in a running service, promote it."""
    from service.errors import ModelLoadError
    from service.repository import promoted_version

    try:
        current = promoted_version(repository, name)
    except ModelLoadError:
        current = None
    lines = ["next steps:"]
    if promoted:
        lines.append(f"  version {version} is now the promoted version: a service started now serves it")
    else:
        lines.append(
            f"  the service still serves the promoted version ({current or 'none yet: the highest version'}) "
            "by default; to make this one the default:"
        )
        lines.append(f"    mnist-promote --repository {repository} --name {name} {version}")
    lines.append("  load it into a running service without a restart (needs MNIST_ADMIN_TOKEN set there):")
    lines.append(
        f'    curl -X POST -H "Authorization: Bearer $MNIST_ADMIN_TOKEN" '
        f"http://127.0.0.1:8000/admin/models/{name}/versions/{version}/load"
    )
    return "\n".join(lines)
