"""MNIST loading: an ``mnist.npz`` in Keras's layout, or Keras's own downloader.

Every failure is a :class:`DataError` whose message says what was wrong and how to fix it, so the CLIs can
print it and exit non-zero instead of showing a stack trace.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

IMAGE_SHAPE = (28, 28)
N_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
N_CLASSES = 10
PIXEL_SCALE = 1.0 / 255.0
KERAS_KEYS = ("x_train", "y_train", "x_test", "y_test")
KERAS_SOURCE = "keras.datasets.mnist"

HOW_TO_PROVIDE = (
    "Provide the data file with --data path/to/mnist.npz (Keras layout: uint8 arrays x_train (N, 28, 28), "
    "y_train (N,), x_test (M, 28, 28), y_test (M,))."
)

Images = npt.NDArray[np.uint8]
Labels = npt.NDArray[np.uint8]
Features = npt.NDArray[np.float32]


class DataError(Exception):
    """The MNIST data could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class MnistData:
    """The four MNIST arrays as uint8, plus where they came from."""

    x_train: Images
    y_train: Labels
    x_test: Images
    y_test: Labels
    sha256: str
    source: str

    def limit(self, n: int | None) -> MnistData:
        """Keep only the first ``n`` training images (the test set is untouched)."""
        if n is None or n >= len(self.x_train):
            return self
        if n <= 0:
            raise DataError(f"--limit must be positive, got {n}")
        return replace(self, x_train=self.x_train[:n], y_train=self.y_train[:n])


def to_features(images: npt.NDArray[np.uint8]) -> Features:
    """uint8 images (N, 28, 28) -> float32 (N, 784) in [0, 1], the model's input."""
    flat = images.reshape(len(images), N_PIXELS)
    return (flat.astype(np.float32) * np.float32(PIXEL_SCALE)).astype(np.float32)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """A content hash of the arrays (for data that did not come from a file we can hash)."""
    digest = hashlib.sha256()
    for key in KERAS_KEYS:
        arr = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{arr.dtype.str}:{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def _validate(arrays: dict[str, np.ndarray], origin: str) -> None:
    missing = [key for key in KERAS_KEYS if key not in arrays]
    if missing:
        raise DataError(
            f"{origin} is missing the array(s) {', '.join(missing)} (found: {sorted(arrays) or 'none'}). "
            + HOW_TO_PROVIDE
        )
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
            raise DataError(
                f"{origin}: x_{split} must be uint8 with shape (N, 28, 28), got {x.dtype} {x.shape}. " + HOW_TO_PROVIDE
            )
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or len(y) != len(x):
            raise DataError(
                f"{origin}: y_{split} must be integer labels with shape ({len(x)},), got {y.dtype} {y.shape}."
            )
        if len(x) == 0:
            raise DataError(f"{origin}: x_{split} is empty.")
        if y.min() < 0 or y.max() >= N_CLASSES:
            raise DataError(f"{origin}: y_{split} labels must be in 0..9, got {y.min()}..{y.max()}.")


def _from_arrays(arrays: dict[str, np.ndarray], sha256: str, source: str) -> MnistData:
    _validate(arrays, source)
    return MnistData(
        x_train=np.ascontiguousarray(arrays["x_train"]),
        y_train=arrays["y_train"].astype(np.uint8),
        x_test=np.ascontiguousarray(arrays["x_test"]),
        y_test=arrays["y_test"].astype(np.uint8),
        sha256=sha256,
        source=source,
    )


def load_npz(path: Path) -> MnistData:
    """Read an ``mnist.npz`` in Keras's layout; :class:`DataError` when it is missing or malformed."""
    if not path.is_file():
        raise DataError(f"Data file not found: {path}. " + HOW_TO_PROVIDE)
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz archive ({exc}). " + HOW_TO_PROVIDE) from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not an .npz archive. " + HOW_TO_PROVIDE)
    try:
        with loaded:
            arrays = {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is a corrupt .npz archive ({exc}). " + HOW_TO_PROVIDE) from exc
    return _from_arrays(arrays, file_sha256(path), str(path))


def download_keras() -> MnistData:
    """Keras's own MNIST loader (downloads once into ~/.keras/datasets)."""
    try:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as exc:  # offline, DNS failure, proxy, corrupt cache: Keras raises plain Exception
        raise DataError(
            f"Could not download MNIST with Keras ({type(exc).__name__}: {exc}). "
            "Without network access, use a local copy. " + HOW_TO_PROVIDE
        ) from exc
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    return _from_arrays(arrays, arrays_sha256(arrays), KERAS_SOURCE)


def load_mnist(path: Path | None) -> MnistData:
    """The npz at ``path`` when given, otherwise Keras's download."""
    return load_npz(path) if path is not None else download_keras()


def split_validation(x: Images, y: Labels, fraction: float, seed: int) -> tuple[Images, Labels, Images, Labels]:
    """A seeded random split of the training set into (x_fit, y_fit, x_val, y_val)."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation split must be in [0, 1), got {fraction}")
    n_val = round(len(x) * fraction)
    order = np.random.default_rng(seed).permutation(len(x))
    val, fit = order[:n_val], order[n_val:]
    return x[fit], y[fit], x[val], y[val]
