"""The request bodies, made once from real digits: single-image JSON and PNG, bulk JSON and raw bytes."""

from __future__ import annotations

import io

import numpy as np
import orjson
from PIL import Image

from bench.loadgen import Workload

JSON = "application/json"
PNG = "image/png"
RAW = "application/octet-stream"


def _pixels(img: np.ndarray) -> list[float]:
    # What a Python client sends: float64 pixel/255 (e.g. 0.00392156862745098), zeros as 0.0.
    return (img.astype(np.float64) / 255.0).tolist()  # type: ignore[no-any-return]


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.reshape(28, 28), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def single_json(digits: np.ndarray, pool: int = 64) -> Workload:
    bodies = tuple(orjson.dumps({"image": _pixels(d)}) for d in digits[:pool])
    return Workload("json", "/v1/predict", JSON, None, bodies, 1)


def single_png(digits: np.ndarray, pool: int = 64) -> Workload:
    return Workload("png", "/v1/predict", PNG, None, tuple(png_bytes(d) for d in digits[:pool]), 1)


def _slices(digits: np.ndarray, n: int, pool: int) -> list[np.ndarray]:
    out = []
    for k in range(pool):
        idx = (np.arange(n) + k * 97) % len(digits)
        out.append(digits[idx])
    return out


def bulk_raw(digits: np.ndarray, n: int, pool: int = 4) -> Workload:
    """Raw uint8 N*784 bytes in, raw float32 (N, 10) out (``Accept: application/octet-stream``)."""
    bodies = tuple(np.ascontiguousarray(s).tobytes() for s in _slices(digits, n, pool))
    return Workload(f"bulk-raw-{n}", "/v1/predict/batch", RAW, RAW, bodies, n)


def bulk_json(digits: np.ndarray, n: int, pool: int = 2) -> Workload:
    bodies = tuple(orjson.dumps({"images": [_pixels(d) for d in s]}) for s in _slices(digits, n, pool))
    return Workload(f"bulk-json-{n}", "/v1/predict/batch", JSON, None, bodies, n)
