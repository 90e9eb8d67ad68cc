"""PNG input of any size (service/png.py): the 28x28 fast path, MNIST-style preprocessing of other sizes,
checked on real MNIST digits with the default model in ONNX Runtime, and the decoder's guards."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.errors import MalformedBody, PayloadTooLarge
from service.png import png_pixels
from tests.helpers import DEFAULT_MODEL, ROOT, assert_clean_shutdown, load_mnist_test, start_server

SHAPE = (28, 28)
LIMIT = 4096 * 4096


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode=mode).save(out, format="PNG")
    return out.getvalue()


def digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST test digits: the shared data set when present, else the fixture shipped with the repo."""
    real = load_mnist_test()
    if real is not None:
        return real[0][:n], real[1][:n]
    with np.load(ROOT / "tests" / "fixtures" / "mnist_small.npz") as data:
        return data["x_test"][:n], data["y_test"][:n]


def resized(digit: np.ndarray, width: int, height: int) -> np.ndarray:
    resample = Image.Resampling.LANCZOS if width < 28 else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(digit).resize((width, height), resample))


def pixels(body: bytes) -> np.ndarray:
    out = png_pixels(body, SHAPE, LIMIT)
    assert out.shape == (1, 784)
    assert out.dtype == np.uint8
    return out.reshape(SHAPE)


Classify = Callable[[np.ndarray], np.ndarray]


@pytest.fixture(scope="module")
def classify() -> Classify:
    import onnxruntime as ort

    session = ort.InferenceSession(str(DEFAULT_MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> np.ndarray:
        x = images.reshape(len(images), -1).astype(np.float32) / 255
        labels: np.ndarray = np.asarray(session.run(None, {name: x})[0]).argmax(axis=1)
        return labels

    return run


# ------------------------------------------------------------------------------------------- fast path
def test_28x28_is_taken_as_it_is() -> None:
    x, _ = digits(20)
    for digit in x:
        assert np.array_equal(pixels(png(digit)), digit)
    rgb = np.stack([x[0], x[0], x[0]], axis=-1)
    assert np.array_equal(pixels(png(rgb)), x[0])  # colour: converted to grayscale, nothing else
    photo_like = 255 - x[0]
    assert np.array_equal(pixels(png(photo_like)), photo_like)  # no polarity step on the fast path


# ------------------------------------------------------------------------------------------- other sizes
def test_other_sizes_are_brought_into_mnist_form() -> None:
    x, _ = digits(30)
    rows, cols = np.mgrid[0:28, 0:28]
    for digit in x:
        for width, height in ((14, 14), (100, 100), (300, 300), (90, 160), (500, 40)):
            img = pixels(png(resized(digit, width, height)))
            assert img.max() == 255
            ink_rows, ink_cols = np.nonzero(img)
            assert ink_rows.max() - ink_rows.min() + 1 <= 20  # fits in the 20x20 box
            assert ink_cols.max() - ink_cols.min() + 1 <= 20
            assert max(ink_rows.max() - ink_rows.min(), ink_cols.max() - ink_cols.min()) + 1 >= 19  # and fills it
            mass = img.astype(np.float64).sum()
            centre = ((img * rows).sum() / mass, (img * cols).sum() / mass)
            assert abs(centre[0] - 14) <= 1.0  # centred by mass, like MNIST (whole-pixel shifts)
            assert abs(centre[1] - 14) <= 1.0


def test_aspect_is_kept() -> None:
    bar = np.zeros((28, 28), dtype=np.uint8)
    bar[4:24, 12:16] = 255  # a "1": 20 tall, 4 wide
    img = pixels(png(resized(bar, 140, 140)))
    ink_rows, ink_cols = np.nonzero(img > 127)
    assert ink_rows.max() - ink_rows.min() + 1 == 20
    assert 3 <= ink_cols.max() - ink_cols.min() + 1 <= 5  # not stretched to a square


def test_dark_ink_on_light_paper_is_inverted() -> None:
    x, _ = digits(10)
    for digit in x:
        light = resized(digit, 120, 120)
        assert np.array_equal(pixels(png(255 - light)), pixels(png(light)))


def test_where_the_digit_is_does_not_matter() -> None:
    """A digit in a corner (inside the border band that sets the background level) or in the middle of a
    non-square canvas gives the same image: not inverted, cropped and centred the same."""
    x, _ = digits(10)
    for digit in x:
        images = []
        for top, left in ((0, 240), (70, 120), (140, 0)):
            canvas = np.zeros((200, 300), dtype=np.uint8)
            canvas[top : top + 60, left : left + 60] = resized(digit, 60, 60)
            images.append(pixels(png(canvas)).astype(int))
        assert images[0][0, 0] == 0  # the background stays black
        for img in images[1:]:
            assert np.abs(img - images[0]).max() <= 1


def test_transparent_and_16_bit_pngs() -> None:
    x, _ = digits(10)
    for digit in x:
        big = resized(digit, 84, 84)
        expected = pixels(png(big))
        rgba = np.zeros((84, 84, 4), dtype=np.uint8)
        rgba[..., 3] = big  # black strokes on a transparent canvas
        assert np.array_equal(pixels(png(rgba, "RGBA")), expected)
        white_strokes = rgba.copy()
        white_strokes[..., :3] = 255  # white strokes on a transparent canvas
        assert np.array_equal(pixels(png(white_strokes, "RGBA")), expected)
        sixteen = big.astype(np.uint16) * 257
        assert np.array_equal(pixels(png(sixteen)), expected)


def test_a_blank_image_of_any_size_is_empty() -> None:
    for value in (0, 255, 128):
        assert not pixels(png(np.full((50, 70), value, dtype=np.uint8))).any()


def test_a_12_megapixel_photo_gives_the_digit(classify: Classify) -> None:
    x, _ = digits(8)
    agree = 0
    for digit in x:
        photo = np.full((3000, 4000), 205, dtype=np.uint8)  # light paper, dark ink
        photo[900:2100, 1400:2600] = (205 - resized(digit, 1200, 1200) * 0.75).astype(np.uint8)
        img = pixels(png(photo))
        assert img.max() == 255
        agree += int(classify(img[None])[0] == classify(digit[None])[0])
    assert agree >= 7, agree


# ------------------------------------------------------------------------------------------- accuracy
def render(digit: np.ndarray, how: str, rng: np.random.Generator) -> bytes:
    if how == "photo":  # dark ink on light, unevenly lit, noisy paper, RGB, the digit off-centre
        paper = np.linspace(170, 220, 240, dtype=np.float32)[None, :] * np.ones((200, 1), dtype=np.float32)
        ink = np.zeros((200, 240), dtype=np.float32)
        y, x = int(rng.integers(0, 80)), int(rng.integers(0, 120))
        ink[y : y + 120, x : x + 120] = resized(digit, 120, 120) / 255
        gray = paper * (1 - ink) + 40 * ink + rng.normal(0, 5, ink.shape)
        return png(np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=2))
    side = int(how)
    return png(resized(digit, side, side))


@pytest.mark.parametrize("how", ["14", "56", "100", "300", "photo"])
def test_accuracy_at_other_sizes_is_close_to_28x28(how: str, classify: Classify) -> None:
    x, y = digits(300)
    rng = np.random.default_rng(0)
    base = float((classify(x) == y).mean())
    images = np.stack([pixels(render(digit, how, rng)) for digit in x])
    accuracy = float((classify(images) == y).mean())
    assert accuracy >= base - 0.03, (how, accuracy, base)


# ------------------------------------------------------------------------------------------- guards
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def declared(width: int, height: int) -> bytes:
    """A PNG header that declares width x height (and one tiny data chunk): nothing of that size exists."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    )


def test_not_a_png_is_400() -> None:
    for body in (b"", b"GIF89a....", png(np.zeros((28, 28), np.uint8))[1:]):
        with pytest.raises(MalformedBody) as caught:
            png_pixels(body, SHAPE, LIMIT)
        assert caught.value.status_code == 400


def test_a_truncated_png_is_400_at_every_size() -> None:
    for side in (28, 100):
        body = png(np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8))
        with pytest.raises(MalformedBody) as caught:
            png_pixels(body[: len(body) // 2], SHAPE, LIMIT)
        assert caught.value.status_code == 400
        assert caught.value.code == "malformed_png"


def test_too_many_pixels_are_refused_before_decoding() -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        png_pixels(declared(5000, 5000), SHAPE, LIMIT)  # 25 megapixels declared in a 100-byte body
    assert caught.value.status_code == 413
    assert "5000x5000" in caught.value.message
    with pytest.raises(PayloadTooLarge):
        png_pixels(png(np.zeros((30, 30), np.uint8)), SHAPE, 784)  # the limit is a setting


def test_pillow_decompression_bomb_checks_are_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (40, 100):  # 1600 pixels: Pillow's warning; 10000: its error
        with pytest.raises(PayloadTooLarge):
            png_pixels(png(np.zeros((side, side), np.uint8)), SHAPE, LIMIT)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_any_bytes_after_the_signature_are_a_clean_error_or_pixels(tail: bytes) -> None:
    try:
        out = png_pixels(b"\x89PNG\r\n\x1a\n" + tail, SHAPE, LIMIT)
    except (MalformedBody, PayloadTooLarge):
        return
    assert out.shape == (1, 784)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 120),
    st.integers(1, 120),
    st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "1", "I;16"]),
    st.integers(0, 2**32 - 1),
)
def test_any_real_png_gives_pixels(width: int, height: int, mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    img = base.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(base).astype(np.uint16) * 257)
    out = io.BytesIO()
    img.save(out, format="PNG")
    result = png_pixels(out.getvalue(), SHAPE, LIMIT)
    assert result.shape == (1, 784)
    assert result.dtype == np.uint8


# ------------------------------------------------------------------------------------------- over HTTP
def test_a_phone_photo_over_http(tmp_path: Path) -> None:
    """The real service with the default model: a large photo-like PNG (raw body and multipart upload) gets
    the answer the model gives the original 28x28 digit; bad PNGs get clean 4xx JSON errors."""
    x, _ = digits(6)
    rng = np.random.default_rng(1)
    server = start_server(DEFAULT_MODEL.parent.parent, tmp_path, "--model-name", DEFAULT_MODEL.parent.name)
    try:
        with server.client() as client:
            agree = 0
            for digit in x:
                expected = client.post("/v1/predict", content=png(digit), headers={"content-type": "image/png"})
                assert expected.status_code == 200, expected.text
                photo = render(digit, "photo", rng)
                raw = client.post("/v1/predict", content=photo, headers={"content-type": "image/png"})
                upload = client.post("/v1/predict", files={"file": ("digit.png", photo, "image/png")})
                assert raw.status_code == 200, raw.text
                assert upload.status_code == 200, upload.text
                assert raw.json()["label"] == upload.json()["label"]
                agree += int(raw.json()["label"] == expected.json()["label"])
            assert agree >= 5, agree
            for body, status in ((b"\x89PNG\r\n\x1a\nnot really", 400), (declared(20000, 20000), 413)):
                r = client.post("/v1/predict", content=body, headers={"content-type": "image/png"})
                assert r.status_code == status, r.text
                assert set(r.json()["error"]) >= {"code", "message", "request_id"}
    finally:
        assert_clean_shutdown(server)
