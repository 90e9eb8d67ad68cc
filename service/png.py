"""PNG bodies -> MNIST-like pixels: (1, H*W) uint8, 0 = background, 255 = ink.

An image of the model's own size (28x28) is taken as it is: 8-bit grayscale, white digit on black, exactly
what the model was trained on (the fast path: no other step).

Any other size or aspect is brought into MNIST's form the way MNIST itself was made:

1. **Grayscale**: any colour mode and bit depth; a transparent background is flattened onto the
   opposite shade of the visible content, so dark strokes on a transparent canvas stay visible.
2. **Polarity**: MNIST digits are light ink on a dark background; a photo or a scan is dark ink on light
   paper. The background level is the median of the image's border (the outer 5% of each side, at least one
   pixel): a digit may touch the border, but it never covers most of it. The image is inverted when its
   darkest point lies further below that level than its brightest lies above it, that is when the ink is
   darker than the background (read on a 3x3-smoothed copy from 64 pixels up, so a noisy pixel is not ink).
3. **Background removal**: the background level is subtracted and the rest stretched to 0-255. Pixels below
   a noise floor (a quarter of Otsu's ink/background threshold) become 0, so paper texture, uneven light
   and sensor noise are not taken for ink.
4. **Crop** to the bounding box of the ink (the pixels above Otsu's threshold).
5. **Fit into 20x20** (for 28x28; 20/28 of the model's size in general), keeping the aspect ratio, with an
   antialiasing (Lanczos) resampling, as MNIST's digits were size-normalised to a 20x20 box; then scaled so
   its brightest pixel is 255, as in every MNIST digit.
6. **Centre by mass**: pasted into an empty 28x28 image so that the ink's centre of mass falls on the
   image centre, as MNIST did (shifted by whole pixels, never cutting the digit off).

An image with no ink at all (blank) gives an empty image. Only Pillow and NumPy are used.

Decoding is guarded as for every body: the PNG signature is checked first, only Pillow's PNG decoder is
allowed, the declared width x height is checked against ``max_pixels`` before any pixel is decoded (413),
Pillow's decompression-bomb warning is an error (413), and anything Pillow cannot decode is a 400.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFilter

from service.errors import MalformedBody, PayloadTooLarge

SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Larger images are first reduced (box filter, in C) so that their longer side is at most this: the digit
#: ends up 20 pixels tall anyway, and the NumPy steps then cost the same for a 12-megapixel photo as for this.
WORK_SIDE = 512
#: The digit's box inside the image, as a fraction of each side (MNIST: 20 of 28).
BOX_FRACTION = 20 / 28
BORDER_FRACTION = 0.05
#: Pixels fainter than this fraction of Otsu's threshold are background (paper texture, noise).
NOISE_FLOOR = 0.25
#: Images this small are not smoothed before their polarity is read (their strokes are a pixel or two wide).
SMOOTH_FROM = 64
RESAMPLE = Image.Resampling.LANCZOS


def png_pixels(body: bytes, image_shape: tuple[int, int], max_pixels: int) -> np.ndarray:
    """A PNG of any size -> (1, rows*cols) uint8, 0 = background. Raises MalformedBody (400) or PayloadTooLarge."""
    img = open_png(body, max_pixels)
    try:
        if img.size == (image_shape[1], image_shape[0]):  # the model's size: as it is (the fast path)
            return grayscale(img).reshape(1, -1)
        return mnist_like(img, image_shape).reshape(1, -1)
    except (MalformedBody, PayloadTooLarge):
        raise
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"the PNG declares too many pixels; the limit is {max_pixels}") from exc
    except Exception as exc:  # truncated or corrupt image data surfaces when the pixels are read
        raise MalformedBody(f"the PNG cannot be decoded: {type(exc).__name__}", code="malformed_png") from exc


def open_png(body: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and check the declared size; the pixels are decoded later, on first use."""
    if not body.startswith(SIGNATURE):
        raise MalformedBody("the body is not a PNG image", code="malformed_png")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(body), formats=["PNG"])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"the PNG declares too many pixels; the limit is {max_pixels}") from exc
    except Exception as exc:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, ...)
        raise MalformedBody(f"the PNG cannot be decoded: {type(exc).__name__}", code="malformed_png") from exc
    w, h = img.size
    if w * h > max_pixels:
        raise PayloadTooLarge(f"the PNG declares {w}x{h} pixels; the limit is {max_pixels}")
    if w == 0 or h == 0:
        raise MalformedBody(f"the PNG is {w}x{h} pixels", code="malformed_png")
    return img


def grayscale(img: Image.Image) -> np.ndarray:
    """8-bit grayscale (h, w) of any mode; 16-bit images are scaled (Pillow's convert would clip them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if img.mode.startswith("I"):  # 16-bit grayscale PNGs open as I;16 / I
            wide = np.asarray(img, dtype=np.int64)
            return np.clip((wide + 128) // 257, 0, 255).astype(np.uint8)
        return np.asarray(img.convert("L"), dtype=np.uint8)


def _flatten_alpha(img: Image.Image) -> np.ndarray:
    """Grayscale with any transparency composited onto the shade opposite to the visible content."""
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return grayscale(img).astype(np.float32)
    rgba = img.convert("LA")
    values = np.asarray(rgba, dtype=np.float32)
    gray, alpha = values[..., 0], values[..., 1] / 255.0
    if alpha.min() >= 1.0:
        return gray
    weight = alpha.sum()
    shade = float((gray * alpha).sum() / weight) if weight > 0 else 0.0
    background = 255.0 if shade < 128 else 0.0
    flat: np.ndarray = np.rint(gray * alpha + background * (1.0 - alpha))  # 8-bit levels, as without alpha
    return flat


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of 8-bit-range values: the split that best separates ink from background."""
    hist = np.bincount(np.rint(np.clip(values, 0, 255)).astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 / total - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(np.argmax(between))


def background_level(gray: np.ndarray) -> float:
    """The median of the image's border (the outer 5% of each side, at least one pixel)."""
    h, w = gray.shape
    bh, bw = max(1, round(h * BORDER_FRACTION)), max(1, round(w * BORDER_FRACTION))
    border = np.concatenate(
        [gray[:bh].ravel(), gray[h - bh :].ravel(), gray[bh : h - bh, :bw].ravel(), gray[bh : h - bh, w - bw :].ravel()]
    )
    return float(np.median(border))


def dark_on_light(gray: np.ndarray, background: float) -> bool:
    """True when the ink is darker than the background: the darkest (smoothed) pixel lies further below the
    background than the brightest lies above it."""
    smooth = gray
    if min(gray.shape) >= SMOOTH_FROM:  # a 3x3 mean: one noisy pixel is not taken for ink
        as_8bit = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8))
        smooth = np.asarray(as_8bit.filter(ImageFilter.BoxBlur(1)), dtype=np.float32)
    return background - float(smooth.min()) > float(smooth.max()) - background


def ink_map(gray: np.ndarray) -> np.ndarray:
    """Steps 2 and 3: float32 (h, w), 0 = background, 255 = the strongest ink."""
    background = background_level(gray)
    if dark_on_light(gray, background):
        gray = 255.0 - gray
        background = 255.0 - background
    ink = np.clip(gray - background, 0.0, None)
    top = float(ink.max())
    if top <= 0.0:
        return np.zeros_like(ink)
    ink *= 255.0 / top
    ink[ink <= _otsu(ink) * NOISE_FLOOR] = 0.0
    return ink


def mnist_like(img: Image.Image, image_shape: tuple[int, int]) -> np.ndarray:
    """Steps 1-6 for an image of any size: (rows, cols) uint8 in MNIST's form."""
    rows, cols = image_shape
    w, h = img.size
    if max(w, h) > WORK_SIDE:
        factor = -(-max(w, h) // WORK_SIDE)
        if img.mode.startswith("I"):
            img = Image.fromarray(grayscale(img))
        img = img.convert("LA" if "A" in img.mode or "transparency" in img.info else "L").reduce(factor)
    gray = _flatten_alpha(img)
    ink = ink_map(gray)
    out = np.zeros((rows, cols), dtype=np.uint8)
    mask = ink > _otsu(ink)
    if not mask.any():
        mask = ink > 0
        if not mask.any():
            return out
    ys, xs = np.nonzero(mask)
    crop = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    box_h, box_w = max(1, round(rows * BOX_FRACTION)), max(1, round(cols * BOX_FRACTION))
    ch, cw = crop.shape
    scale = min(box_h / ch, box_w / cw)
    size = (max(1, min(box_w, round(cw * scale))), max(1, min(box_h, round(ch * scale))))
    fitted = Image.fromarray(crop.astype(np.float32), mode="F").resize(size, RESAMPLE)
    digit = np.clip(np.asarray(fitted), 0.0, None)
    peak = float(digit.max())
    if peak <= 0.0:
        return out
    digit *= 255.0 / peak  # MNIST's digits all reach full intensity (a thin or tiny digit would not)
    mass = float(digit.sum())
    dh, dw = digit.shape
    cy = float((digit.sum(axis=1) * np.arange(dh)).sum() / mass)
    cx = float((digit.sum(axis=0) * np.arange(dw)).sum() / mass)
    top = min(max(round(rows / 2 - cy), 0), rows - dh)
    left = min(max(round(cols / 2 - cx), 0), cols - dw)
    out[top : top + dh, left : left + dw] = np.rint(digit).astype(np.uint8)
    return out
