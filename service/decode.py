"""Decoders: request bodies -> (N, features) pixels, validated at the edge, one table keyed by media type.

A decoder returns uint8 (0-255, scaled by the engine thread) or float32 in [0, 1]. ONNX Runtime accepts some
wrong shapes silently, so it is never the validator: every decoder checks shape, type, count, finiteness and
range here and raises an error naming what was wrong. JSON pixels take one of two paths:

- the plain forms (an object whose only key is ``image``/``images``, holding flat images of ``features``
  numbers or ``rows`` lists of ``cols``) are parsed by simdjson straight into a float64 buffer, with no Python
  object per number (3x less CPU for one image, and a 1,024-image batch without 800,000 Python floats);
- anything else, or anything simdjson refuses, goes to typed msgspec decoders, the authority on what is wrong:
  their length limits stop a hostile body while it is read (a million empty images are refused at image 4,097),
  and they refuse strings, booleans and objects where pixels belong. The fast path accepts only bodies those
  decoders accept, with the same numbers (a test holds both to it).
"""

from __future__ import annotations

import functools
import io
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np
import simdjson

from service.envelope import multipart_file
from service.errors import InvalidInput, MalformedBody, PayloadTooLarge, ServiceError, UnsupportedMediaType

JSON = "application/json"
PNG = "image/png"
NPY = "application/x-npy"
RAW = "application/octet-stream"
MULTIPART = "multipart/form-data"
#: JSON bodies up to this size share one parser per thread (sizing new buffers is half a digit's parse); a bigger
#: one gets its own, freed once its numbers are out: no thread keeps a bulk body's buffers.
REUSED_PARSER_BYTES = 64 * 1024
_threads = threading.local()
_MIN, _MAX = np.minimum.reduce, np.maximum.reduce
#: numpy parses .npy headers with ``ast``, which two threads at once broke under load ("AST constructor recursion").
_NPY_HEADER = threading.Lock()


@dataclass(frozen=True, slots=True)
class Shape:
    """What one request may hold: the model's image geometry and the service's limits."""

    features: int
    rows: int
    cols: int
    max_images: int
    max_png_pixels: int


#: (body, media-type header, shape) -> pixels. ``single`` decoders return exactly one image.
Decoder = Callable[[bytes, str, Shape], np.ndarray]


@functools.lru_cache(maxsize=256)  # a handful of distinct values in practice; bounded against the rest
def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def unsupported(ct: str, allowed: tuple[str, ...]) -> UnsupportedMediaType:
    return UnsupportedMediaType(f"content type {ct or '(none)'!r} is not supported here; "
                                f"use one of {', '.join(allowed)}")  # fmt: skip


# ---------------------------------------------------------------------------------------------- JSON
@functools.cache
def _json_decoders(features: int, rows: int, cols: int, max_images: int) -> tuple[msgspec.json.Decoder[Any], ...]:
    row = Annotated[list[float], msgspec.Meta(max_length=cols)]
    image = Annotated[list[float | row], msgspec.Meta(min_length=1, max_length=max(features, rows))]
    one = msgspec.defstruct("PredictBody", [("image", image)])
    many = msgspec.defstruct("BatchBody", [("images", Annotated[list[image], msgspec.Meta(max_length=max_images)])])
    return msgspec.json.Decoder(one), msgspec.json.Decoder(many)


def _typed(decoder: msgspec.json.Decoder[Any], body: bytes, field: str, max_images: int) -> Any:
    if not body:
        raise MalformedBody("the request body is empty; send JSON")
    try:
        return getattr(decoder.decode(body), field)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.startswith("Object missing required field") or (
            text.startswith("Expected `object`") and " - at " not in text
        ):
            raise InvalidInput(
                f'the JSON body must be an object with an "{field}" field', code="missing_field"
            ) from None
        if field == "images" and text.endswith("- at `$.images`") and "length <=" in text:
            raise PayloadTooLarge(f"too many images in one request; the limit is {max_images}") from None
        shape_error = "length" in text or "got `float`" in text or "got `int`" in text
        code = "invalid_shape" if shape_error else "invalid_type"
        raise InvalidInput(f"invalid {field}: {text}", code=code) from None
    except msgspec.DecodeError as exc:
        raise MalformedBody(f"malformed JSON: {exc}", code="malformed_json") from None
    except RecursionError:  # nesting deeper than the decoder follows (an unknown field may hold anything)
        raise MalformedBody("malformed JSON: nested too deeply", code="malformed_json") from None


def _parser(size: int) -> simdjson.Parser:
    if size > REUSED_PARSER_BYTES:
        return simdjson.Parser()
    parser: simdjson.Parser | None = getattr(_threads, "parser", None)
    if parser is None:
        parser = _threads.parser = simdjson.Parser()
    return parser


def fast_json(body: bytes, field: str, shape: Shape) -> np.ndarray | None:
    """The plain forms -> (N, features) float32 via simdjson, range checked; None: not one, msgspec decides.

    Every ``[`` in such a body opens an array (its only key holds no bracket, and strings are refused where
    numbers belong), so counting them proves the nesting: with ``n`` top-level items, ``n + 1`` brackets means
    flat items, ``rows * n + n + 1`` means items of ``rows`` flat rows."""
    try:
        doc = _parser(len(body)).parse(body)
        if not isinstance(doc, simdjson.Object) or len(doc) != 1 or field not in doc:
            return None
        items = doc[field]
        if not isinstance(items, simdjson.Array):
            return None
        brackets, n = body.count(b"["), len(items)
        loose: Any = items  # its items may be numbers: len() raises TypeError, caught below
        if field == "image":  # one image: rows are its items
            if (n, brackets) == (shape.features, 1):
                pass
            elif (n, brackets) != (shape.rows, shape.rows + 1) or any(len(r) != shape.cols for r in loose):
                return None
            n = 1
        elif not 0 < n <= shape.max_images:
            return None
        elif brackets == n + 1:
            if any(len(image) != shape.features for image in loose):
                return None
        elif brackets != (shape.rows + 1) * n + 1 or any(
            len(image) != shape.rows or any(len(r) != shape.cols for r in image) for image in loose
        ):
            return None
        flat = np.frombuffer(items.as_buffer(of_type="d"), dtype=np.float64)
        del doc, items, loose  # a big body's parser (its tape: several times the body) goes before the copies
    except RuntimeError:  # the kept parser still backs a document (not expected): a new one next time
        _threads.parser = None
        return None
    except Exception:  # simdjson refuses it (malformed, a string or boolean, a huge integer): msgspec says why
        return None
    if flat.size != n * shape.features:
        return None
    if in_unit_range(flat):  # the common case: no float32 overflow possible, nothing to name
        return flat.astype(np.float32).reshape(n, shape.features)
    with np.errstate(over="ignore"):  # a number beyond float32 becomes inf: check_range names it
        return check_range(flat.astype(np.float32).reshape(n, shape.features), f'"{field}"')


def _json_image(image: list[Any], shape: Shape, what: str) -> np.ndarray:
    """A flat list of ``features`` numbers or ``rows`` lists of ``cols`` -> (features,) float32."""
    try:
        with np.errstate(over="ignore"):  # a number beyond float32 becomes inf: check_range names it
            flat = isinstance(image[0], float)
            arr = np.fromiter(image, np.float32, len(image)) if flat else np.array(image, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidInput(f"{what} mixes numbers and rows, or has rows of different lengths",
                           code="invalid_shape") from None  # fmt: skip
    if arr.shape not in ((shape.features,), (shape.rows, shape.cols)):
        want = f"{shape.features} numbers or {shape.rows}x{shape.cols} nested lists"
        raise InvalidInput(f"{what} has shape {list(arr.shape)}; each image must be {want}", code="invalid_shape")
    return arr.reshape(shape.features)


def in_unit_range(x: np.ndarray) -> bool:
    """Every value in [0, 1] (NaN fails both); the ufuncs' reduce, without the Python layer of ``x.min()``."""
    return bool(x.size and _MIN(x, axis=None) >= 0.0 and _MAX(x, axis=None) <= 1.0)


def check_range(x: np.ndarray, what: str) -> np.ndarray:
    if in_unit_range(x):
        return x
    if not np.isfinite(x).all():
        raise InvalidInput(f"{what} contains NaN or infinity", code="not_finite")
    if x.size:
        raise InvalidInput(f"{what} has values outside [0, 1] (min {x.min():g}, max {x.max():g}); "
                           "scale 0-255 pixels by 1/255", code="out_of_range")  # fmt: skip
    return x


def check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise InvalidInput("the batch is empty; send at least one image", code="empty_batch")
    if n > max_images:
        raise PayloadTooLarge(f"{n} images in one request; the limit is {max_images}")


def strict_one(body: bytes, shape: Shape) -> np.ndarray:
    """msgspec's reading of ``{"image": [...]}`` -> (1, features) float32, range not checked yet."""
    one, _ = _json_decoders(shape.features, shape.rows, shape.cols, shape.max_images)
    return _json_image(_typed(one, body, "image", shape.max_images), shape, '"image"').reshape(1, -1)


def strict_many(body: bytes, shape: Shape) -> np.ndarray:
    """msgspec's reading of ``{"images": [[...], ...]}`` -> (N, features) float32, range not checked yet."""
    _, many = _json_decoders(shape.features, shape.rows, shape.cols, shape.max_images)
    images = _typed(many, body, "images", shape.max_images)
    check_count(len(images), shape.max_images)
    out = np.empty((len(images), shape.features), dtype=np.float32)
    for i, image in enumerate(images):
        out[i] = _json_image(image, shape, f'"images"[{i}]')
    return out


def json_one(body: bytes, _ct: str, shape: Shape) -> np.ndarray:
    """``{"image": [...]}`` -> (1, features) float32."""
    fast = fast_json(body, "image", shape)  # checked in range already
    return check_range(strict_one(body, shape), '"image"') if fast is None else fast


def json_many(body: bytes, _ct: str, shape: Shape) -> np.ndarray:
    """``{"images": [[...], ...]}`` -> (N, features) float32."""
    fast = fast_json(body, "images", shape)
    return check_range(strict_many(body, shape), '"images"') if fast is None else fast


# ---------------------------------------------------------------------------------------------- binary
def png_one(body: bytes, _ct: str, shape: Shape) -> np.ndarray:
    from service.png import png_pixels  # Pillow (2-3 MB resident) is loaded by the first PNG, not at start

    return png_pixels(body, (shape.rows, shape.cols), shape.max_png_pixels).reshape(1, shape.features)


def multipart_one(body: bytes, ct: str, shape: Shape) -> np.ndarray:
    """A ``multipart/form-data`` upload whose ``file`` part is a PNG."""
    return png_one(multipart_file(body, ct), PNG, shape)


def _safe(exc: BaseException, limit: int = 200) -> str:
    """An exception's text fit for a client: no object reprs (they show memory addresses), bounded length."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<expression>", str(exc))
    return text if len(text) <= limit else text[:limit] + "..."


def npy_many(body: bytes, _ct: str, shape: Shape) -> np.ndarray:
    """A NumPy .npy file, (N, h, w) or (N, features), uint8 (0-255) or float32 ([0, 1]). Never unpickles."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"unsupported .npy version {version}")
        with _NPY_HEADER:
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            dims, fortran, dtype = read(stream, max_header_size=1024)
    except Exception as exc:  # numpy's header parser raises ValueError, SyntaxError, tokenize.TokenError, ...
        raise MalformedBody(f"malformed .npy: {_safe(exc)}", code="malformed_npy") from None
    if dtype.hasobject or dtype not in (np.dtype(np.uint8), np.dtype("<f4")):
        raise InvalidInput(f".npy dtype must be uint8 or float32 (little-endian), got {dtype}", code="invalid_type")
    if len(dims) not in (2, 3) or tuple(dims[1:]) not in ((shape.features,), (shape.rows, shape.cols)):
        raise InvalidInput(f".npy shape {list(dims)}; expected (N, {shape.features}) or "
                           f"(N, {shape.rows}, {shape.cols})", code="invalid_shape")  # fmt: skip
    check_count(dims[0], shape.max_images)
    offset = stream.tell()
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(body) - offset != expected:
        raise MalformedBody(f".npy data is {len(body) - offset} bytes; its header declares {expected}",
                            code="malformed_npy")  # fmt: skip
    arr = np.frombuffer(body, dtype=dtype, offset=offset)
    if fortran:
        arr = np.ascontiguousarray(arr.reshape(dims[::-1]).transpose())
    arr = arr.reshape(-1, shape.features)
    return arr if dtype == np.uint8 else check_range(arr, ".npy data")


def raw_many(body: bytes, _ct: str, shape: Shape) -> np.ndarray:
    """Raw uint8 bytes, N * features of them, row-major."""
    if len(body) % shape.features:
        raise InvalidInput(f"raw body is {len(body)} bytes, not a multiple of {shape.features} "
                           "(one uint8 per pixel)", code="invalid_shape")  # fmt: skip
    check_count(len(body) // shape.features, shape.max_images)
    return np.frombuffer(body, dtype=np.uint8).reshape(-1, shape.features)


#: media type -> decoder, for one image (``/v1/predict``) and for many (``/v1/predict/batch``).
SINGLE: dict[str, Decoder] = {JSON: json_one, PNG: png_one, MULTIPART: multipart_one}
MANY: dict[str, Decoder] = {JSON: json_many, NPY: npy_many, RAW: raw_many}


def decode(table: dict[str, Decoder], content_type: str | None, body: bytes, shape: Shape) -> np.ndarray:
    """Pick the decoder for the request's media type and run it; 415 for a type the table lacks."""
    ct = media_type(content_type)
    decoder = table.get(ct)
    if decoder is None:
        raise unsupported(ct, tuple(table))
    try:
        return decoder(body, content_type or "", shape)
    except ServiceError:
        raise
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:  # never a 500 for a body we could not read
        raise MalformedBody(f"the body cannot be decoded: {_safe(exc)}") from None
