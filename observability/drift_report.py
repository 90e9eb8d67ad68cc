"""Print the drift scores (PSI) the service would report for real and for corrupted MNIST digits.

    .venv/bin/python observability/drift_report.py [--model models/mnist-mlp/1] [--data PATH] [--window 2000]

Uses the service's own code (service.quality.Quality with the model's metadata reference, the ONNX model
through service.model) on windows of real MNIST test digits drawn at random, then on the same digits
inverted, faded, noisy, shifted and rotated. docs/observability.md quotes its output.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from service.model import load_model
from service.quality import Quality, psi
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(images)
    out[:, dy:, dx:] = images[:, : images.shape[1] - dy, : images.shape[2] - dx]
    return out


CORRUPTIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "real digits (random window)": lambda x, rng: x,
    "inverted (255 - x)": lambda x, rng: 255 - x,
    "faded (x * 0.5)": lambda x, rng: (x * 0.5).astype(np.uint8),
    "noise (+ uniform 0..60)": lambda x, rng: np.clip(x + rng.integers(0, 61, x.shape), 0, 255).astype(np.uint8),
    "shifted 3 px down-right": lambda x, rng: shift(x, 3, 3),
    "shifted 4 px down-right": lambda x, rng: shift(x, 4, 4),
    "rotated 90 degrees": lambda x, rng: np.rot90(x, axes=(1, 2)).copy(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "mnist-mlp" / "1", help="model folder")
    parser.add_argument("--data", type=Path, default=ROOT / "tests" / "fixtures" / "mnist_small.npz",
                        help="mnist.npz (Keras layout); default: the small fixture of real digits")  # fmt: skip
    parser.add_argument("--window", type=int, default=Settings().drift_window, help="images per window")
    parser.add_argument("--trials", type=int, default=20, help="random windows per row (median and max shown)")
    args = parser.parse_args()
    data = args.data if args.data.exists() else ROOT / "tests" / "fixtures" / "mnist_small.npz"
    with np.load(data) as d:
        x_test, y_test = d["x_test"], d["y_test"]
    model = load_model(args.model, Settings(provider="cpu"))
    scale = np.float32(model.metadata["preprocessing"]["scale"])
    rng = np.random.default_rng(0)
    print(f"model {model.name}/{model.version}, data {data.name} ({len(x_test)} test digits), window {args.window}")
    print(f"{'input':30s} {'mean_intensity':>22s} {'predicted_class':>22s} {'accuracy':>9s}")
    for name, corrupt in CORRUPTIONS.items():
        scores: dict[str, list[float]] = {"mean_intensity": [], "predicted_class": []}
        accuracy = []
        for _ in range(args.trials):
            idx = rng.choice(len(x_test), args.window, replace=len(x_test) < args.window)
            images = corrupt(x_test[idx].astype(np.int64), rng).astype(np.uint8)
            x = images.reshape(len(images), -1).astype(np.float32) * scale
            probs = model.run(x)
            quality = Quality(model.n_classes, args.window, 1)
            quality.set_reference(model.reference)
            quality.record_batch(model, x, probs)
            for feature, value in quality.drift().items():
                scores[feature].append(value)
            accuracy.append(float((probs.argmax(axis=1) == y_test[idx]).mean()))
        cells = [f"{np.median(v):8.3f} (max {max(v):7.3f})" for v in scores.values()]
        print(f"{name:30s} {cells[0]:>22s} {cells[1]:>22s} {np.mean(accuracy):9.3f}")
    ordered = [x_test[i : i + args.window] for i in range(0, len(x_test) - args.window + 1, args.window)]
    if model.reference is not None and ordered:
        edges, fractions = model.reference.mean_intensity_edges, model.reference.mean_intensity_fractions
        slices = []
        for block in ordered:
            hist, _ = np.histogram(block.reshape(len(block), -1).mean(axis=1) * float(scale), bins=edges)
            slices.append(psi(fractions, hist / hist.sum()))
        print(f"contiguous slices of the test set (writer groups), mean_intensity: {np.round(slices, 3).tolist()}")


if __name__ == "__main__":
    main()
