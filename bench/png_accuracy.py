"""Accuracy of the default model on real MNIST test digits sent as PNGs of other sizes and looks.

Each test digit is rendered as a PNG (resized, inverted like a photo of ink on paper, on a transparent or
non-square canvas, 16-bit, ...), decoded by the service's own ``service.png.png_pixels`` and classified by
ONNX Runtime directly (no server: the figure is the preprocessing's, not the transport's). The 28x28 row is
the model's own accuracy (the fast path takes those bytes as they are). The "naive" column is what a plain
resize of the whole image to 28x28 would give, for comparison.

    python -m bench.png_accuracy [--limit 2000] [--data path/to/mnist.npz]

Data: ``--data path/to/mnist.npz`` (the MNIST test set), else ``tests/fixtures/mnist_small.npz`` (1000 test digits).
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageFilter

from service.png import png_pixels

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "mnist-mlp" / "1" / "model.onnx"
DATA = (ROOT / "tests" / "fixtures" / "mnist_small.npz",)  # 1,000 test digits; --data for the full set
MAX_PIXELS = 4096 * 4096

Render = Callable[[np.ndarray, np.random.Generator], bytes]


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _resized(digit: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    return Image.fromarray(digit).resize(size, resample)


def as_is(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    return _png(Image.fromarray(digit))


def square(side: int) -> Render:
    resample = Image.Resampling.LANCZOS if side < 28 else Image.Resampling.BICUBIC

    def render(digit: np.ndarray, rng: np.random.Generator) -> bytes:
        return _png(_resized(digit, (side, side), resample))

    return render


def stretched(width: int, height: int) -> Render:
    def render(digit: np.ndarray, rng: np.random.Generator) -> bytes:
        return _png(_resized(digit, (width, height), Image.Resampling.BICUBIC))

    return render


def off_centre(width: int, height: int, side: int) -> Render:
    """The 28x28 digit scaled to side x side, at a random place on a black width x height canvas."""

    def render(digit: np.ndarray, rng: np.random.Generator) -> bytes:
        canvas = Image.new("L", (width, height), 0)
        x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        canvas.paste(_resized(digit, (side, side), Image.Resampling.BICUBIC), (x, y))
        return _png(canvas)

    return render


def photo(width: int, height: int) -> Render:
    """Dark ink on light, unevenly lit paper, blurred, noisy, in colour: what a phone photo looks like."""

    def render(digit: np.ndarray, rng: np.random.Generator) -> bytes:
        side = int(min(width, height) * rng.uniform(0.45, 0.8))
        ink = np.zeros((height, width), dtype=np.float32)
        x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        big = np.asarray(_resized(digit, (side, side), Image.Resampling.BICUBIC), dtype=np.float32) / 255
        ink[y : y + side, x : x + side] = big
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        light = (np.cos(angle) * xx / width + np.sin(angle) * yy / height) * rng.uniform(20, 50)
        paper = rng.uniform(175, 225) + light - light.mean()
        ink_level = rng.uniform(20, 70)
        gray = paper * (1 - ink) + ink_level * ink
        blurred = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
        gray = np.asarray(blurred, dtype=np.float32) + rng.normal(0, 6, (height, width))
        tint = rng.uniform(0.9, 1.05, 3)
        rgb = np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)
        return _png(Image.fromarray(rgb, mode="RGB"))

    return render


def transparent(side: int) -> Render:
    """Black strokes on a transparent canvas (a drawing app's export): the digit is in the alpha channel."""

    def render(digit: np.ndarray, rng: np.random.Generator) -> bytes:
        alpha = np.asarray(_resized(digit, (side, side), Image.Resampling.BICUBIC))
        rgba = np.zeros((side, side, 4), dtype=np.uint8)
        rgba[..., 3] = alpha
        return _png(Image.fromarray(rgba, mode="RGBA"))

    return render


def sixteen_bit(side: int) -> Render:
    def render(digit: np.ndarray, rng: np.random.Generator) -> bytes:
        big = np.asarray(_resized(digit, (side, side), Image.Resampling.BICUBIC), dtype=np.uint16) * 257
        return _png(Image.fromarray(big))

    return render


VARIANTS: list[tuple[str, Render]] = [
    ("28x28 as is (fast path)", as_is),
    ("14x14", square(14)),
    ("20x20", square(20)),
    ("56x56", square(56)),
    ("100x100", square(100)),
    ("300x300", square(300)),
    ("1000x1000", square(1000)),
    ("84x42, stretched 2:1", stretched(84, 42)),
    ("42x84, stretched 1:2", stretched(42, 84)),
    ("160x90, digit 70px off-centre", off_centre(160, 90, 70)),
    ("400x300, digit 40px off-centre", off_centre(400, 300, 40)),
    ("300x300 photo-like, dark on paper, RGB", photo(300, 300)),
    ("640x480 photo-like, dark on paper, RGB", photo(640, 480)),
    ("280x280 RGBA, black on transparent", transparent(280)),
    ("56x56 16-bit grayscale", sixteen_bit(56)),
]


def naive(body: bytes) -> np.ndarray:
    """A plain resize of the whole image to 28x28, grayscale, no inversion: the comparison column."""
    img: Image.Image = Image.open(io.BytesIO(body))
    if img.mode.startswith("I"):
        img = Image.fromarray((np.asarray(img, dtype=np.int64) // 257).astype(np.uint8))
    return np.asarray(img.convert("L").resize((28, 28), Image.Resampling.LANCZOS), dtype=np.uint8).reshape(1, -1)


def load(data: Path | None) -> tuple[np.ndarray, np.ndarray, Path]:
    candidates = (data,) if data is not None else DATA
    for path in candidates:
        if path is not None and path.exists():
            with np.load(path) as d:
                return d["x_test"], d["y_test"], path
    raise SystemExit(f"no MNIST data in {', '.join(str(p) for p in candidates)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.png_accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=2000, help="test digits per variant (default: 2000)")
    parser.add_argument("--data", type=Path, default=None, help="an .npz with x_test, y_test")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x, y, path = load(args.data)
    x, y = x[: args.limit], y[: args.limit]
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def accuracy(pixels: np.ndarray) -> float:
        probs = session.run(None, {name: pixels.astype(np.float32) / 255})[0]
        return float((np.argmax(probs, axis=1) == y).mean())

    print(f"model: {MODEL.relative_to(ROOT)}; data: {path.name}, first {len(y)} test digits; seed {args.seed}")
    print(f"python {platform.python_version()}, onnxruntime {ort.__version__}, {platform.machine()}")
    print(f"command: python -m bench.png_accuracy {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print()
    header = f"{'PNG as sent':<42} {'accuracy':>9} {'naive resize':>13} {'decode ms/img':>14}"
    print(header)
    print("-" * len(header))
    for label, render in VARIANTS:
        rng = np.random.default_rng(args.seed)
        bodies = [render(digit, rng) for digit in x]
        start = time.perf_counter()
        ours = np.concatenate([png_pixels(body, (28, 28), MAX_PIXELS) for body in bodies])
        per_image_ms = (time.perf_counter() - start) / len(bodies) * 1000
        plain = np.concatenate([naive(body) for body in bodies])
        print(f"{label:<42} {accuracy(ours):>8.2%} {accuracy(plain):>12.2%} {per_image_ms:>14.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
