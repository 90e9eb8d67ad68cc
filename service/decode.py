"""Decoders: request bodies -> float32 (N, features) in [0, 1], validated at the edge.

ONNX Runtime accepts some wrong shapes silently, so it is never the validator: every decoder checks
shape, dtype, count, finiteness and range here and raises an ``InvalidInput`` naming what was wrong.
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Any

import numpy as np
import orjson
from PIL import Image

from service.errors import InvalidInput, MalformedBody, PayloadTooLarge, UnsupportedMediaType

JSON = "application/json"
PNG = "image/png"
NPY = "application/x-npy"
RAW = "application/octet-stream"
MULTIPART = "multipart/form-data"


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_json(body: bytes) -> Any:
    if not body:
        raise MalformedBody("the request body is empty; send JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"malformed JSON: {exc}", code="malformed_json") from exc


def _check_range(x: np.ndarray, what: str) -> np.ndarray:
    if x.size and x.min() >= 0.0 and x.max() <= 1.0:  # NaN fails both comparisons: one fast path for all
        return x
    if not np.isfinite(x).all():
        raise InvalidInput(f"{what} contains NaN or infinity", code="not_finite")
    if x.size:
        raise InvalidInput(
            f"{what} has values outside [0, 1] (min {x.min():g}, max {x.max():g}); scale 0-255 pixels by 1/255",
            code="out_of_range",
        )
    return x


def _numeric_array(value: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nesting
        raise InvalidInput(f"{what} is not a regular array of numbers: {exc}", code="invalid_shape") from exc
    if arr.dtype.kind not in "iuf":
        raise InvalidInput(f"{what} must contain only numbers (got {arr.dtype.kind!r} data)", code="invalid_type")
    return arr


def _image_rows(arr: np.ndarray, features: int, image_shape: tuple[int, int], what: str, batch: bool) -> np.ndarray:
    """Accept (features,) / (h, w) per image; returns (N, features)."""
    per_image = arr.shape[1:] if batch else arr.shape
    if per_image not in ((features,), image_shape):
        want = f"{features} numbers or {image_shape[0]}x{image_shape[1]} nested lists"
        raise InvalidInput(f"{what} has shape {list(arr.shape)}; each image must be {want}", code="invalid_shape")
    return arr.reshape(-1, features)


def json_image(doc: Any, features: int, image_shape: tuple[int, int]) -> np.ndarray:
    """``{"image": [...]}`` -> (1, features) float32."""
    if not isinstance(doc, dict) or "image" not in doc:
        raise InvalidInput('the JSON body must be an object with an "image" field', code="missing_field")
    arr = _numeric_array(doc["image"], '"image"')
    rows = _image_rows(arr, features, image_shape, '"image"', batch=False).astype(np.float32)
    return _check_range(rows, '"image"')


def json_images(doc: Any, features: int, image_shape: tuple[int, int], max_images: int) -> np.ndarray:
    """``{"images": [[...], ...]}`` -> (N, features) float32."""
    if not isinstance(doc, dict) or "images" not in doc:
        raise InvalidInput('the JSON body must be an object with an "images" field', code="missing_field")
    images = doc["images"]
    if not isinstance(images, list):
        raise InvalidInput('"images" must be a list of images', code="invalid_type")
    _check_count(len(images), max_images)
    try:
        arr = np.asarray(images)
    except (ValueError, TypeError):  # ragged: flat and nested images mixed (both allowed), or a bad image
        rows = np.concatenate([_json_image_rows(img, i, features, image_shape) for i, img in enumerate(images)])
    else:
        if arr.dtype.kind not in "iuf":
            raise InvalidInput(f'"images" must contain only numbers (got {arr.dtype.kind!r} data)', code="invalid_type")
        if arr.ndim < 2:
            raise InvalidInput('"images" must be a list of images, each a list of numbers', code="invalid_shape")
        rows = _image_rows(arr, features, image_shape, '"images"', batch=True)
    return _check_range(rows.astype(np.float32), '"images"')


def _json_image_rows(image: Any, i: int, features: int, image_shape: tuple[int, int]) -> np.ndarray:
    what = f'"images"[{i}]'
    return _image_rows(_numeric_array(image, what), features, image_shape, what, batch=False)


def _check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise InvalidInput("the batch is empty; send at least one image", code="empty_batch")
    if n > max_images:
        raise PayloadTooLarge(f"{n} images in one request; the limit is {max_images}")


def png_image(body: bytes, features: int, image_shape: tuple[int, int], max_pixels: int, scale: float) -> np.ndarray:
    """A PNG (any bit depth/colour mode, converted to 8-bit grayscale, 0 = background) -> (1, features)."""
    if not body.startswith(b"\x89PNG\r\n\x1a\n"):
        raise MalformedBody("the body is not a PNG image", code="malformed_png")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(body), formats=["PNG"])
            w, h = img.size
            if w * h > max_pixels:
                raise PayloadTooLarge(f"the PNG declares {w}x{h} pixels; the limit is {max_pixels}")
            if (h, w) != image_shape:
                raise InvalidInput(
                    f"the PNG is {w}x{h}; it must be {image_shape[1]}x{image_shape[0]} pixels",
                    code="invalid_shape",
                )
            gray = np.asarray(img.convert("L"), dtype=np.uint8)
    except (InvalidInput, PayloadTooLarge):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"the PNG declares too many pixels; the limit is {max_pixels}") from exc
    except Exception as exc:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, ...)
        raise MalformedBody(f"the PNG cannot be decoded: {type(exc).__name__}", code="malformed_png") from exc
    return gray.reshape(1, features).astype(np.float32) * np.float32(scale)


def _safe(exc: BaseException, limit: int = 200) -> str:
    """An exception's text fit for a client: no object reprs (they show memory addresses), bounded length."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<expression>", str(exc))
    return text if len(text) <= limit else text[:limit] + "..."


def npy_images(body: bytes, features: int, image_shape: tuple[int, int], max_images: int, scale: float) -> np.ndarray:
    """A NumPy .npy file, (N, h, w) or (N, features), uint8 (0-255) or float32 ([0, 1]). Never unpickles."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=1024)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=1024)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as exc:  # numpy's header parser raises ValueError, SyntaxError, tokenize.TokenError, ...
        raise MalformedBody(f"malformed .npy: {_safe(exc)}", code="malformed_npy") from exc
    if dtype.hasobject or dtype not in (np.dtype(np.uint8), np.dtype("<f4")):
        raise InvalidInput(f".npy dtype must be uint8 or float32 (little-endian), got {dtype}", code="invalid_type")
    if len(shape) not in (2, 3) or tuple(shape[1:]) not in ((features,), image_shape):
        raise InvalidInput(
            f".npy shape {list(shape)}; expected (N, {features}) or (N, {image_shape[0]}, {image_shape[1]})",
            code="invalid_shape",
        )
    _check_count(shape[0], max_images)
    offset = stream.tell()
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(body) - offset != expected:
        raise MalformedBody(
            f".npy data is {len(body) - offset} bytes; its header declares {expected}", code="malformed_npy"
        )
    arr = np.frombuffer(body, dtype=dtype, offset=offset)
    if fortran:
        arr = arr.reshape(shape[::-1]).transpose()
    arr = arr.reshape(-1, features)
    if dtype == np.uint8:
        out: np.ndarray = np.multiply(arr, np.float32(scale), dtype=np.float32)  # one pass: cast and scale
        return out
    return _check_range(np.ascontiguousarray(arr), ".npy data")


def raw_images(body: bytes, features: int, max_images: int, scale: float) -> np.ndarray:
    """Raw uint8 bytes, N * features of them, row-major."""
    if len(body) % features:
        raise InvalidInput(
            f"raw body is {len(body)} bytes, not a multiple of {features} (one uint8 per pixel)",
            code="invalid_shape",
        )
    _check_count(len(body) // features, max_images)
    return np.multiply(np.frombuffer(body, dtype=np.uint8).reshape(-1, features), np.float32(scale), dtype=np.float32)


def unsupported(ct: str, allowed: tuple[str, ...]) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"content type {ct or '(none)'!r} is not supported here; use one of {', '.join(allowed)}"
    )
