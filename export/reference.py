"""What the service compares live traffic against (drift) and checks itself with (golden digits).

Per-image mean pixel intensity (pixels in [0, 1]) of real MNIST digits lies in about 0.025..0.40 (train:
median 0.127, 0.1 % and 99.9 % quantiles 0.036 and 0.291). The 20 bins are 0.015 wide between 0.04 and 0.31,
plus one catch-all bin on each side, so the first edge is 0.0 and the last 1.0. Bins follow ``numpy.histogram``:
half-open ``[a, b)`` except the last, which includes 1.0.
"""

from __future__ import annotations

import base64

import numpy as np
import numpy.typing as npt

from training.data import N_CLASSES, PIXEL_SCALE

MEAN_INTENSITY_EDGES: tuple[float, ...] = (0.0, *(round(0.04 + 0.015 * i, 4) for i in range(19)), 1.0)
GOLDEN_COUNT = 32


def mean_intensity(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """Per-image mean pixel value in [0, 1] for uint8 images of any trailing shape."""
    means: npt.NDArray[np.float64] = images.reshape(len(images), -1).mean(axis=1, dtype=np.float64)
    return means * PIXEL_SCALE


def mean_intensity_fractions(images: npt.NDArray[np.uint8]) -> list[float]:
    counts, _ = np.histogram(mean_intensity(images), bins=np.asarray(MEAN_INTENSITY_EDGES))
    return [float(c) / len(images) for c in counts]


def class_fractions(labels: npt.NDArray[np.integer]) -> list[float]:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=N_CLASSES)
    return [float(c) / len(labels) for c in counts]


def reference_stats(
    train_images: npt.NDArray[np.uint8], test_predictions: npt.NDArray[np.integer]
) -> dict[str, list[float]]:
    """The metadata ``reference`` block."""
    return {
        "mean_intensity_edges": list(MEAN_INTENSITY_EDGES),
        "mean_intensity_fractions": mean_intensity_fractions(train_images),
        "class_fractions": class_fractions(test_predictions),
    }


def golden_set(images: npt.NDArray[np.uint8], predicted: npt.NDArray[np.integer]) -> dict[str, object]:
    """The metadata ``golden`` block: uint8 images (count*784 bytes, base64) and the model's labels for them."""
    raw = np.ascontiguousarray(images, dtype=np.uint8).tobytes()
    return {
        "images_b64": base64.b64encode(raw).decode("ascii"),
        "count": len(images),
        "labels": [int(label) for label in predicted],
    }
