"""The model repository layout: ``<root>/<name>/<version>/{model.onnx, metadata.json, model.int8.onnx}``.

A version is written into a hidden staging directory beside its final place and renamed into it at the end,
so a reader (the service) never sees a half-written version and a failed export leaves nothing behind.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from export.errors import ExportError


def existing_versions(root: Path, name: str) -> list[int]:
    folder = root / name
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def next_version(root: Path, name: str) -> int:
    """Highest existing version + 1 (1 for a new model)."""
    versions = existing_versions(root, name)
    return versions[-1] + 1 if versions else 1


def check_target(root: Path, name: str, version: int, overwrite: bool = False) -> Path:
    """``<root>/<name>/<version>``, or :class:`ExportError` if the version is invalid or taken."""
    if version <= 0:
        raise ExportError(f"version must be a positive integer, got {version}")
    target = root / name / str(version)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists; pick another --version or pass --overwrite")
    return target


@contextmanager
def staged_version(root: Path, name: str, version: int, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; on success it becomes ``<root>/<name>/<version>``."""
    target = check_target(root, name, version, overwrite)
    staging = root / name / f".staging-{version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
