"""Fuzzing the decoders (service/decode.py) with hypothesis: whatever the bytes, a decoder either returns a
valid float32 (N, 784) batch in [0, 1] or raises a 4xx ``ServiceError`` with a safe message; never another
exception, never a hang, never an unpickle. A few cases also go through HTTP to a real server.

Bounded: a fixed number of derandomized examples per property (reproducible in CI), each under a deadline.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service import decode
from service.errors import ServiceError
from tests.helpers import Server, assert_clean_shutdown, start_server

FEATURES, MAX_IMAGES, MAX_PIXELS = 784, 64, 4096 * 4096
SHAPE = decode.Shape(features=FEATURES, rows=28, cols=28, max_images=MAX_IMAGES, max_png_pixels=MAX_PIXELS)
LEAKS = ("Traceback", 'File "', "/work", "site-packages", " at 0x")

FUZZ = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def check(call: Callable[[], np.ndarray], max_images: int = MAX_IMAGES) -> np.ndarray | ServiceError:
    """Run a decoder; assert it returned a valid batch or raised a clean 4xx ServiceError. A valid batch is
    (N, 784), 1 <= N <= the limit, uint8 (0-255 pixels) or float32 in [0, 1]."""
    try:
        x = call()
    except ServiceError as exc:
        error = exc
    else:
        error = None
    if error is not None:
        assert 400 <= error.status_code < 500, (error.status_code, error.message)
        assert error.message
        assert error.code
        for marker in LEAKS:
            assert marker not in error.message, error.message
        return error
    assert isinstance(x, np.ndarray)
    assert x.dtype in (np.uint8, np.float32), x.dtype
    assert x.ndim == 2
    assert x.shape[1] == FEATURES
    assert 1 <= x.shape[0] <= max_images
    if x.dtype == np.float32:
        assert np.isfinite(x).all()
        assert x.min() >= 0.0
        assert x.max() <= 1.0
    return x


def _route(table: dict[str, decode.Decoder], content_type: str) -> Callable[[bytes], np.ndarray]:
    """The decoding a route does: pick the decoder by media type, run it (service/decode.py ``decode``)."""
    return lambda body: decode.decode(table, content_type, body, SHAPE)


decode_json_image = _route(decode.SINGLE, "application/json")
decode_json_images = _route(decode.MANY, "application/json")
decode_png = _route(decode.SINGLE, "image/png")
decode_npy = _route(decode.MANY, "application/x-npy")
decode_raw = _route(decode.MANY, "application/octet-stream")


# ---------------------------------------------------------------------------------------------- strategies
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-0.5, max_value=1.5),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 0.5, 1.0000001, -0.0, 1e-320, 1e308]),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=40,
)


@st.composite
def near_images(draw: st.DrawFn) -> Any:
    """Images that are almost right: the right size or nearly, nested or flat, values near [0, 1]."""
    pixel = st.floats(min_value=-0.01, max_value=1.01) | numbers
    if draw(st.booleans()):
        n = draw(st.sampled_from([0, 1, 783, 784, 785]))
        return draw(st.lists(pixel, min_size=n, max_size=n))
    rows = draw(st.sampled_from([0, 1, 27, 28, 29]))
    width = st.sampled_from([27, 28, 28, 28, 29])
    return [draw(st.lists(pixel, min_size=w, max_size=w)) for w in [draw(width) for _ in range(rows)]]


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()  # NaN / Infinity tokens are not JSON: must be refused


@st.composite
def mutated(draw: st.DrawFn, seed_body: bytes) -> bytes:
    """A valid body with a few bytes flipped, cut, or inserted."""
    body = bytearray(seed_body)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        i = draw(st.integers(0, max(0, len(body) - 1)))
        if op == "flip" and body:
            body[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del body[i : i + draw(st.integers(1, 64))]
        elif op == "insert":
            body[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            del body[i:]
    return bytes(body)


def png(img: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, idat: bytes = b"") -> bytes:
    """A syntactically valid PNG header declaring any size, followed by ``idat``."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def npy(header: str, data: bytes, version: int = 1) -> bytes:
    raw = header.encode("latin-1")
    if version == 1:
        raw += b" " * ((64 - (len(raw) + 11) % 64) % 64) + b"\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw)) + raw + data
    raw += b" " * ((64 - (len(raw) + 13) % 64) % 64) + b"\n"
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<I", len(raw)) + raw + data


DESCRS = ["|u1", "<f4", ">f4", "<f8", "|i1", "<i4", "|O", "|b1", "<U3", "|V8",
          "[('a', '<f4')]", "[('a', '|O')]", "[('a', '|u1', (784,))]", "'<f4'", "np.float32", "__import__('os')"]  # fmt: skip
SHAPES = ["(1, 784)", "(2, 28, 28)", "(0, 784)", "(-1, 784)", "(10**12, 784)", "(2**63, 784)", "(1, 2**70)",
          "(784,)", "()", "(1, 28, 28, 1)", "[1, 784]", "(1.5, 784)", "None", "(1, 784) + (1,)"]  # fmt: skip


@st.composite
def npy_files(draw: st.DrawFn) -> bytes:
    descr = draw(st.sampled_from(DESCRS))
    shape = draw(st.sampled_from(SHAPES))
    fortran = draw(st.sampled_from(["False", "True", "0", "'yes'"]))
    quoted = descr if descr.startswith(("[", "'", "np", "__")) else f"'{descr}'"
    header = draw(st.sampled_from([
        f"{{'descr': {quoted}, 'fortran_order': {fortran}, 'shape': {shape}, }}",
        f"{{'descr': {quoted}, 'shape': {shape}}}",
        f"{{'descr': {quoted}, 'fortran_order': {fortran}, 'shape': {shape}, 'extra': 1}}",
        "[1, 2, 3]", "", "{" * 200, "'" + "a" * 900 + "'",
    ]))  # fmt: skip
    size = draw(st.sampled_from([0, 1, 784, 784 * 4, 2 * 784, 2 * 784 * 4, 783]))
    data = (
        draw(st.binary(min_size=size, max_size=size))
        if size < 64
        else bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8))
    )
    return npy(header, data, draw(st.sampled_from([1, 2, 3])))


def valid_npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- JSON
@FUZZ
@given(st.binary(max_size=2048))
def test_json_decoders_survive_any_bytes(body: bytes) -> None:
    check(lambda: decode_json_image(body))
    check(lambda: decode_json_images(body))


@FUZZ
@given(json_values)
def test_json_decoders_survive_any_document(doc: Any) -> None:
    body = dumps(doc)
    check(lambda: decode_json_image(body))
    check(lambda: decode_json_images(body))
    body = dumps({"image": doc, "images": doc})
    check(lambda: decode_json_image(body))
    check(lambda: decode_json_images(body))


@settings(FUZZ, max_examples=100)
@given(near_images(), st.integers(0, 3))
def test_json_decoders_on_nearly_valid_images(img: Any, copies: int) -> None:
    one = check(lambda: decode_json_image(dumps({"image": img})))
    many = check(lambda: decode_json_images(dumps({"images": [img] * copies})))
    if isinstance(one, np.ndarray) and copies:  # the two paths agree on what a valid image is
        assert isinstance(many, np.ndarray)
        assert many.shape[0] == copies


def agree(body: bytes) -> None:
    """simdjson's fast path takes a body only if msgspec's strict decoders accept it, with the same numbers."""
    for field, strict in (("image", decode.strict_one), ("images", decode.strict_many)):
        fast = decode.fast_json(body, field, SHAPE)
        if fast is not None:
            assert fast.dtype == np.float32
            assert np.array_equal(fast, strict(body, SHAPE)), body[:200]  # strict raising fails the test too


@FUZZ
@given(json_values)
def test_the_fast_json_path_takes_only_what_the_strict_decoders_accept(doc: Any) -> None:
    agree(dumps(doc))
    agree(dumps({"image": doc}))
    agree(dumps({"images": doc}))


@settings(FUZZ, max_examples=150)
@given(near_images(), st.integers(0, 3), st.booleans())
def test_the_fast_json_path_agrees_on_nearly_valid_images(img: Any, copies: int, extra_key: bool) -> None:
    one, many = {"image": img}, {"images": [img] * copies}
    if extra_key:  # an unknown field: msgspec ignores it, the fast path leaves such bodies to msgspec
        one["note"] = many["note"] = "[x]"
    agree(dumps(one))
    agree(dumps(many))


def test_the_plain_forms_take_the_fast_path_and_mixed_ones_do_not() -> None:
    rng = np.random.default_rng(0)
    flat = [float(v) for v in rng.random(FEATURES)]
    rows = [flat[r * 28 : (r + 1) * 28] for r in range(28)]
    for body, field in [
        (dumps({"image": flat}), "image"),
        (dumps({"image": rows}), "image"),
        (dumps({"images": [flat, flat, flat]}), "images"),
        (dumps({"images": [rows, rows]}), "images"),
        (dumps({"images": [[int(v > 0.5) for v in flat]]}), "images"),  # integers 0 and 1 are pixels too
    ]:
        fast = decode.fast_json(body, field, SHAPE)
        assert fast is not None, body[:80]
        assert np.array_equal(
            fast, decode.strict_one(body, SHAPE) if field == "image" else decode.strict_many(body, SHAPE)
        )
    for body, field in [
        (dumps({"images": [flat, rows]}), "images"),  # flat and nested in one batch: valid, left to msgspec
        (dumps({"image": flat, "model": "x"}), "image"),  # another field
        (dumps({"image": [*flat[:-1], True]}), "image"),  # a boolean
        (dumps({"image": [*flat[:-1], "0.5"]}), "image"),  # a string
        (dumps({"image": [*rows[:-1], [*rows[-1][:27], [0.5]]]}), "image"),  # a row holding a list
        (dumps({"images": [flat] * (MAX_IMAGES + 1)}), "images"),  # over the limit: msgspec answers 413
        (b'{"image": [' + b",".join([b"0.5"] * 783) + b", 18446744073709551616]}", "image"),  # beyond int64
    ]:
        assert decode.fast_json(body, field, SHAPE) is None, body[:80]
    assert decode.strict_many(dumps({"images": [flat, rows]}), SHAPE).shape == (2, FEATURES)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"image": ' + b"[" * 1000 + b"0.5" + b"]" * 1000 + b"}",
        b'{"images": ' + b"[" * 60 + b"0.5" + b"]" * 60 + b"}",
        b'{"image": [1e309]}',
        b'{"image": [-1e309]}',
        b'{"image": [' + b",".join([b"1e-400"] * 784) + b"]}",
        b'{"image": [' + b"9" * 400 + b"]}",
        b'{"image": [NaN]}',
        b'{"images": [' + b",".join([b"[" + b",".join([b"0.5"] * 784) + b"]"] * 10_000) + b"]}",
        b'{"image": {"__proto__": 1}}',
        b'{"image": [0.5], "image": [' + b",".join([b"0.5"] * 784) + b"]}",
        b"\xef\xbb\xbf" + b'{"image": [0.1]}',
        b'{"image": "' + b"A" * 100_000 + b'"}',
    ],
)  # fmt: skip
def test_hostile_json(body: bytes) -> None:
    check(lambda: decode_json_image(body))
    check(lambda: decode_json_images(body))
    agree(body)


# ---------------------------------------------------------------------------------------------- PNG
@FUZZ
@given(st.binary(max_size=4096))
def test_png_decoder_survives_any_bytes(body: bytes) -> None:
    check(lambda: decode_png(body))
    check(lambda: decode_png(b"\x89PNG\r\n\x1a\n" + body))


@FUZZ
@given(
    st.integers(1, 64),
    st.integers(1, 64),
    st.sampled_from(["L", "RGB", "RGBA", "P", "1", "I;16", "LA"]),
    st.data(),
)
def test_png_decoder_on_mutated_images(w: int, h: int, mode: str, data: st.DataObject) -> None:
    img = np.random.default_rng(w * 100 + h).integers(0, 256, (h, w), dtype=np.uint8)
    good = png(img, mode)
    result = check(lambda: decode_png(good))
    assert isinstance(result, np.ndarray), result  # a PNG of any size is brought to 28x28
    assert result.shape == (1, FEATURES)
    check(lambda: decode_png(data.draw(mutated(good))))


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (png_declaring(100_000, 100_000), "payload_too_large"),  # a decompression bomb, declared in ~60 bytes
        (png_declaring(2**31 - 1, 2**31 - 1), None),
        (png_declaring(0, 0), None),
        (png_declaring(28, 28, zlib.compress(bytes(64 * 2**20), 9)), None),  # 64 MiB of zeros in ~64 KiB
        (png_declaring(28, 28, zlib.compress(bytes(29 * 28), 9)), None),  # valid size, filter bytes wrong
    ],
)
def test_png_bombs_are_refused_cheaply(body: bytes, code: str | None) -> None:
    result = check(lambda: decode_png(body))
    if code is not None:
        assert isinstance(result, ServiceError)
        assert result.code == code


# ---------------------------------------------------------------------------------------------- npy
@FUZZ
@given(npy_files())
def test_npy_decoder_survives_any_header(body: bytes) -> None:
    check(lambda: decode_npy(body))


@FUZZ
@given(st.sampled_from([(1, 784), (3, 28, 28), (2, 784)]), st.sampled_from(["|u1", "<f4"]), st.data())
def test_npy_decoder_on_mutated_files(shape: tuple[int, ...], dtype: str, data: st.DataObject) -> None:
    rng = np.random.default_rng(len(shape))
    x = rng.integers(0, 256, shape).astype(dtype) if dtype == "|u1" else rng.random(shape).astype(dtype)
    good = valid_npy(x)
    assert isinstance(check(lambda: decode_npy(good)), np.ndarray)
    check(lambda: decode_npy(data.draw(mutated(good))))


def test_npy_object_arrays_are_never_unpickled(tmp_path: Path) -> None:
    """An object array holding a pickle that would create a file when loaded: refused, nothing runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    arr = np.empty((1, 784), dtype=object)
    arr[0, 0] = Payload()
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    result = check(lambda: decode_npy(buf.getvalue()))
    assert isinstance(result, ServiceError)
    assert result.code == "invalid_type"
    assert not marker.exists()


def test_npy_declaring_a_huge_array_allocates_nothing() -> None:
    body = npy("{'descr': '|u1', 'fortran_order': False, 'shape': (10**9, 784), }", b"\x00" * 784)
    huge = decode.Shape(FEATURES, 28, 28, max_images=10**10, max_png_pixels=MAX_PIXELS)
    result = check(lambda: decode.decode(decode.MANY, "application/x-npy", body, huge), max_images=10**10)
    assert isinstance(result, ServiceError)
    assert result.code == "malformed_npy"


# ---------------------------------------------------------------------------------------------- raw
@FUZZ
@given(st.integers(0, 70 * 784), st.data())
def test_raw_decoder_survives_any_length(n: int, data: st.DataObject) -> None:
    body = bytes(n) if n > 4096 else data.draw(st.binary(min_size=n, max_size=n))
    result = check(lambda: decode_raw(body))
    assert isinstance(result, np.ndarray) == (n % 784 == 0 and 0 < n // 784 <= MAX_IMAGES)


# ---------------------------------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tiny_repo, tmp_path_factory.mktemp("fuzz-srv"), "--max-images-per-request", "64")
    yield srv
    assert_clean_shutdown(srv)  # whatever the bodies, no error-level record: bad input is the client's problem


CONTENT_TYPES = ["application/json", "image/png", "application/x-npy", "application/octet-stream",
                 "multipart/form-data; boundary=b", "text/plain", "", "application/json; charset=utf-16"]  # fmt: skip


@settings(FUZZ, max_examples=120)
@given(
    st.sampled_from(["/v1/predict", "/v1/predict/batch"]),
    st.sampled_from(CONTENT_TYPES),
    st.one_of(st.binary(max_size=2048), json_values.map(dumps), npy_files(), near_images().map(lambda i: dumps({"image": i}))),
)  # fmt: skip
def test_http_answers_any_body_with_200_or_a_4xx_in_the_error_shape(
    server: Server, path: str, content_type: str, body: bytes
) -> None:
    r = httpx.post(server.url + path, content=body, headers={"content-type": content_type}, timeout=10)
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"code", "message", "request_id"}
        for marker in LEAKS:
            assert marker not in r.text


@pytest.mark.parametrize(
    "body",
    [
        npy("{'descr': '|u1', 'fortran_order': False, 'shape': (1, 784), ", b""),  # tokenize.TokenError once: 500
        npy("{" * 200, b""),
        npy("{'descr': '<f8', 'fortran_order': False, 'shape': (10**12, 784), }", b""),
        npy("{'descr': '|u1', 'fortran_order': False, 'shape': (-1, 784), }", bytes(784)),
        png_declaring(100_000, 100_000),
        b'{"image": ' + b"[" * 1000 + b"0.5" + b"]" * 1000 + b"}",  # the batch route skips "image": deeply
    ],
)  # fmt: skip
def test_http_regressions(server: Server, body: bytes) -> None:
    ct = {b"\x89": "image/png", b"{": "application/json"}.get(body[:1], "application/x-npy")
    path = "/v1/predict" if ct == "image/png" else "/v1/predict/batch"
    r = httpx.post(server.url + path, content=body, headers={"content-type": ct}, timeout=10)
    assert 400 <= r.status_code < 500, r.text
