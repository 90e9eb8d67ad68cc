"""Test-set evaluation: accuracy and a confusion matrix (array and Agg-rendered figure)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from training.data import N_CLASSES


def accuracy(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def confusion_matrix(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, n_classes: int = N_CLASSES) -> npt.NDArray[np.int64]:
    """Rows are true labels, columns predicted labels."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def confusion_figure(matrix: npt.NDArray[np.int64], title: str) -> Figure:
    """A labelled heat map of ``matrix``, drawn with the Agg canvas (no display, no pyplot state)."""
    fig = Figure(figsize=(6.5, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    n = matrix.shape[0]
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for row in range(n):
        for col in range(n):
            value = int(matrix[row, col])
            colour = "white" if value > threshold else "black"
            ax.text(col, row, str(value), ha="center", va="center", fontsize=7, color=colour)
    fig.tight_layout()
    return fig
