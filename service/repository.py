"""The model repository on disk: ``<repo>/<name>/<version>/{model.onnx, metadata.json}`` and the promoted pointer.

Everything here reads untrusted files defensively: ``metadata.json`` and the pointer are bounded regular files
read without following them outside their folder, and every field is checked for type and range. Any problem is
a :class:`ModelLoadError` with a clear message; service/model.py builds the ONNX Runtime session on top.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeGuard

import numpy as np

from service.errors import ModelLoadError

METADATA_FILE = "metadata.json"
PROMOTED_FILE = "promoted.json"
REQUIRED_KEYS = ("name", "version", "file", "sha256", "input", "output", "preprocessing", "class_labels", "golden")
MAX_METADATA_BYTES = 4 * 1024 * 1024  # the shipped metadata.json is 37 KB
MAX_POINTER_BYTES = 256 * 1024
MAX_GOLDEN = 10_000
MAX_CLASSES = 100_000
MAX_REFERENCE_BINS = 10_000
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
VERSION = re.compile(r"[1-9][0-9]{0,11}")


@dataclass(frozen=True)
class Reference:
    """Training-data statistics saved at export time, for drift."""

    mean_intensity_edges: np.ndarray
    mean_intensity_fractions: np.ndarray
    class_fractions: np.ndarray


@dataclass(frozen=True)
class Golden:
    """Real digits (uint8, (count, n_features)) and the labels the model must give them."""

    images: np.ndarray
    labels: np.ndarray


# ---------------------------------------------------------------------------------------------- files
def inside(path: Path, root: Path) -> bool:
    """Whether ``path``, all symlinks resolved, is ``root`` (resolved) or below it."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ModelLoadError for anything else.

    Opened non-blocking (a FIFO cannot hang the caller) and checked with fstat on the open descriptor, so a
    device such as ``/dev/zero``, a folder or a socket is refused before a single byte is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ModelLoadError(f"{what} {path} cannot be read: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ModelLoadError(f"{what} {path} cannot be read: not a regular file")
        if info.st_size > limit:
            raise ModelLoadError(f"{what} {path} is {info.st_size} bytes, more than the limit of {limit}")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ModelLoadError(f"{what} {path} cannot be read: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if size > limit:
        raise ModelLoadError(f"{what} {path} grew past the limit of {limit} bytes while being read")
    return b"".join(chunks)


def read_metadata(folder: Path) -> dict[str, Any]:
    meta_path = folder / METADATA_FILE
    if not meta_path.exists() and not meta_path.is_symlink():
        raise ModelLoadError(f"no {METADATA_FILE} in {folder}")
    if not inside(meta_path, folder):
        raise ModelLoadError(f"{meta_path} points outside its version folder")
    raw = read_bounded(meta_path, MAX_METADATA_BYTES, "metadata")
    try:
        metadata = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelLoadError(f"unreadable metadata {meta_path}: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ModelLoadError(f"{meta_path} lacks required keys: it is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if metadata.get(k) is None]
    if missing:
        raise ModelLoadError(f"{meta_path} lacks required keys: {missing}")
    return metadata


def model_path(folder: Path, file: Any, where: str) -> Path:
    """``folder/file`` when ``file`` names a path inside the folder (no absolute path, no ``..``, no NUL)."""
    if not isinstance(file, str) or not file or len(file) > 255 or "\x00" in file or "\\" in file:
        raise ModelLoadError(f"{where}: metadata 'file' must be a file name inside the version folder, got {file!r}")
    pure = PurePosixPath(file)
    if pure.is_absolute() or ".." in pure.parts or pure.name in ("", "."):
        raise ModelLoadError(f"{where}: metadata 'file' must be a file name inside the version folder, got {file!r}")
    path = folder / pure
    if not inside(path, folder):
        raise ModelLoadError(f"{where}: the model file {file!r} points outside its version folder")
    return path


def block(meta: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = meta.get(key)
    if not isinstance(value, dict):
        raise ModelLoadError(f"{where}: metadata '{key}' must be an object, got {type(value).__name__}")
    return value


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _numbers(value: Any, what: str, where: str, *, length: int | None = None, max_len: int = MAX_CLASSES) -> np.ndarray:
    """A list of finite numbers as float64 (of ``length`` items when given)."""
    if not isinstance(value, list) or not all(_is_number(v) for v in value):
        raise ModelLoadError(f"{where}: metadata {what} must be a list of numbers")
    if not value or len(value) > max_len or (length is not None and len(value) != length):
        expected = f"{length}" if length is not None else f"1..{max_len}"
        raise ModelLoadError(f"{where}: metadata {what} has {len(value)} values, expected {expected}")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except OverflowError:  # an integer beyond float range
        arr = np.asarray([math.inf])
    if not np.isfinite(arr).all():
        raise ModelLoadError(f"{where}: metadata {what} holds a non-finite number")
    return arr


def scale(meta: dict[str, Any], where: str) -> float:
    scale = block(meta, "preprocessing", where).get("scale")
    try:
        value = float(scale) if _is_number(scale) else math.nan
    except OverflowError:  # an integer beyond float range
        value = math.inf
    if not math.isfinite(value) or value <= 0:
        raise ModelLoadError(f"{where}: metadata preprocessing.scale must be a finite positive number, got {scale!r}")
    return value


def image_shape(meta: dict[str, Any], where: str) -> tuple[int, int]:
    shape = block(meta, "input", where).get("image_shape", [28, 28])
    ok = isinstance(shape, list) and len(shape) == 2
    if not ok or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 4096 for d in shape):
        raise ModelLoadError(f"{where}: metadata input.image_shape must be [height, width], got {shape!r}")
    return int(shape[0]), int(shape[1])


def class_labels(meta: dict[str, Any], where: str) -> list[str]:
    labels = meta["class_labels"]
    ok = isinstance(labels, list) and 0 < len(labels) <= MAX_CLASSES
    if not ok or not all(isinstance(c, str | int) and not isinstance(c, bool) for c in labels):
        raise ModelLoadError(f"{where}: metadata class_labels must be a non-empty list of strings")
    return [str(c) for c in labels]


def sha256(meta: dict[str, Any], where: str) -> str:
    value = meta.get("sha256")
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ModelLoadError(f"{where}: metadata sha256 must be the 64 hex digits of the model file's sha256")
    return value.lower()


def model_file(meta: dict[str, Any], where: str, precision: str) -> tuple[Any, dict[str, Any], str]:
    """The model file to serve (``file``, or for int8 the ``quantized`` block's), the block whose ``sha256`` it
    must have and the name of that block in messages."""
    if precision == "float32":
        return meta["file"], meta, where
    quantized = meta.get("quantized")
    if not isinstance(quantized, dict):
        raise ModelLoadError(f"{where}: no int8 variant (metadata 'quantized'); export one with mnist-export "
                             "--quantize, or serve float32 (MNIST_MODEL_PRECISION)")  # fmt: skip
    return quantized.get("file"), quantized, f"{where} (quantized)"


def golden(meta: dict[str, Any], where: str, n_features: int, n_classes: int) -> Golden:
    golden = block(meta, "golden", where)
    count, labels, b64 = golden.get("count"), golden.get("labels"), golden.get("images_b64")
    if not isinstance(count, int) or isinstance(count, bool) or not 0 < count <= MAX_GOLDEN:
        raise ModelLoadError(f"{where}: malformed golden set in metadata: count must be 1..{MAX_GOLDEN}, got {count!r}")
    if not isinstance(labels, list) or len(labels) != count:
        raise ModelLoadError(f"{where}: malformed golden set in metadata: labels must be a list of {count} labels")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n_classes for v in labels):
        raise ModelLoadError(
            f"{where}: malformed golden set in metadata: labels must be integers in 0..{n_classes - 1}"
        )
    if not isinstance(b64, str):
        raise ModelLoadError(f"{where}: malformed golden set in metadata: images_b64 must be a base64 string")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ModelLoadError(f"{where}: malformed golden set in metadata: images_b64: {exc}") from exc
    if len(raw) != count * n_features:
        raise ModelLoadError(
            f"{where}: malformed golden set in metadata: {len(raw)} bytes of images, expected count x "
            f"{n_features} = {count * n_features}"
        )
    images = np.frombuffer(raw, dtype=np.uint8).reshape(count, n_features)
    return Golden(images=images, labels=np.asarray(labels, dtype=np.int64))


def reference(meta: dict[str, Any], where: str, n_classes: int) -> Reference | None:
    """The drift statistics, or None when the metadata has none (drift is then not computed)."""
    if meta.get("reference") is None:
        return None
    ref = block(meta, "reference", where)
    edges = _numbers(ref.get("mean_intensity_edges"), "reference.mean_intensity_edges", where,
                     max_len=MAX_REFERENCE_BINS + 1)  # fmt: skip
    if len(edges) < 2 or not (np.diff(edges) > 0).all():
        raise ModelLoadError(f"{where}: metadata reference.mean_intensity_edges must be at least 2 increasing numbers")
    fractions = _numbers(ref.get("mean_intensity_fractions"), "reference.mean_intensity_fractions", where,
                         length=len(edges) - 1)  # fmt: skip
    classes = _numbers(ref.get("class_fractions"), "reference.class_fractions", where, length=n_classes)
    if (fractions < 0).any() or (classes < 0).any():
        raise ModelLoadError(f"{where}: metadata reference fractions must not be negative")
    return Reference(edges, fractions, classes)


# ---------------------------------------------------------------------------------------------- repository


def list_versions(repository: Path, name: str) -> list[str]:
    folder = repository / name
    if not folder.is_dir():
        return []
    return sorted((p.name for p in folder.iterdir() if p.is_dir() and VERSION.fullmatch(p.name)), key=int)


def default_model_name(repository: Path) -> str:
    if not repository.is_dir():
        raise ModelLoadError(f"model repository {repository} does not exist")
    names = sorted(p.name for p in repository.iterdir() if p.is_dir() and list_versions(repository, p.name))
    if not names:
        raise ModelLoadError(f"model repository {repository} holds no <name>/<version>/ folder")
    return names[0]


def read_promoted(repository: Path, name: str) -> dict[str, Any] | None:
    """``<repo>/<name>/promoted.json`` (``{"version": "1", "history": [...]}``), or None when there is none.

    The pointer names the version served by default; only ``mnist-promote`` (or ``mnist-export --promote``)
    moves it. A malformed pointer is a ModelLoadError, never a silent fallback.
    """
    path = repository / name / PROMOTED_FILE
    if not path.exists() and not path.is_symlink():
        return None
    raw = read_bounded(path, MAX_POINTER_BYTES, "promoted-version pointer")
    try:
        pointer = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ModelLoadError(f"unreadable promoted-version pointer {path}: {exc}") from exc
    version = pointer.get("version") if isinstance(pointer, dict) else None
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        raise ModelLoadError(f"{path}: 'version' must be a version number (a positive integer as a string)")
    history = pointer.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ModelLoadError(f"{path}: 'history' must be a list of objects")
    return {"version": version, "history": history}


def promoted_version(repository: Path, name: str) -> str | None:
    pointer = read_promoted(repository, name)
    return None if pointer is None else str(pointer["version"])
