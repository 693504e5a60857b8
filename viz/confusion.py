"""Predictions on the split, the confusion matrix and its most confused class pairs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.batches import array_batches
from viz.plotting import plt, save_figure


@dataclass(frozen=True)
class ConfusedPair:
    """Images of class `true` predicted as `predicted`; `rate` is the share of that true class."""

    true: str
    predicted: str
    count: int
    rate: float

    def __str__(self) -> str:
        return f"{self.true} → {self.predicted} {self.rate * 100:.0f} %"


def predict_probabilities(model: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, 7) in inference mode (augmentation and dropout off)."""
    if images.ndim != 4 or images.shape[1:] != (48, 48, 1):
        raise ValueError(f"images: expected shape (N, 48, 48, 1), found {images.shape}")
    # Not predict(images): its autotuned input pipeline stalls on deletion (model/batches.py).
    batches = array_batches(images.astype(np.float32), None, batch_size)
    probs = model.predict(batches, verbose=0)
    return np.asarray(probs, dtype=np.float64)


def confusion_counts(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[i, j] = images of true class i predicted as j."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape or labels.ndim != 1:
        raise ValueError(
            f"labels/predictions: expected equal 1-D shapes, found {labels.shape} and "
            f"{predictions.shape}"
        )
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{name}: expected classes in 0..{num_classes - 1}, found "
                f"{values.min()}..{values.max()}"
            )
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def row_normalise(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its total (recall on the diagonal); empty rows stay 0."""
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)


def top_confused_pairs(
    counts: np.ndarray, class_names: list[str], top: int = 5
) -> list[ConfusedPair]:
    """Off-diagonal cells ordered by row-normalised rate, then count (ties: class order)."""
    rates = row_normalise(counts)
    pairs = [
        ConfusedPair(class_names[i], class_names[j], int(counts[i, j]), float(rates[i, j]))
        for i in range(counts.shape[0])
        for j in range(counts.shape[1])
        if i != j and counts[i, j] > 0
    ]
    pairs.sort(key=lambda p: (-p.rate, -p.count))
    return pairs[:top]


def plot_confusion(
    counts: np.ndarray, class_names: list[str], path: str | Path, title: str
) -> Path:
    """Counts and row-normalised panels side by side, each cell annotated."""
    n = len(class_names)
    if counts.shape != (n, n):
        raise ValueError(f"counts: expected shape ({n}, {n}), found {counts.shape}")
    rates = row_normalise(counts)
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.4))
    panels = (
        (counts, "counts", "images", "Blues", lambda v: f"{int(v)}"),
        (
            rates,
            "row-normalised (share of each true class)",
            "share",
            "Greens",
            lambda v: f"{v * 100:.0f}%",
        ),
    )
    for ax, (values, name, unit, cmap, fmt) in zip(axes, panels, strict=True):
        vmax = float(values.max()) if values.size and values.max() > 0 else 1.0
        image = ax.imshow(values, cmap=cmap, vmin=0, vmax=vmax)
        colourbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        colourbar.set_label(unit)
        ax.set_xticks(range(n), class_names, rotation=35, ha="right")
        ax.set_yticks(range(n), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
        for i in range(n):
            for j in range(n):
                dark = values[i, j] > 0.6 * vmax
                ax.text(
                    j,
                    i,
                    fmt(values[i, j]),
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if dark else "black",
                )
    accuracy = np.trace(counts) / max(int(counts.sum()), 1)
    fig.suptitle(f"{title} — {int(counts.sum())} images, accuracy {accuracy:.3f}", fontsize=12)
    fig.tight_layout()
    return save_figure(fig, path)
