"""Shared figure plumbing: the headless backend and saving PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

# Headless everywhere (CI, MLflow entry points); must precede the pyplot import.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DPI = 100

__all__ = ["DPI", "grid_figure", "plt", "save_figure", "side_colourbar"]


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write `fig` as a PNG (creating folders) and release its memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    plt.close(fig)
    return path


def grid_figure(
    rows: int,
    cols: int,
    tile: tuple[float, float],
    margins: tuple[float, float, float, float],
    gaps: tuple[float, float] = (0.15, 0.45),
) -> tuple[Any, Any]:
    """A figure of rows x cols equal tiles laid out in inches, without tight_layout.

    tile: (width, height) of one tile; margins: (left, right, top, bottom); gaps: (between
    columns, between rows, the latter leaving room for two-line tile titles). tight_layout on
    50+ axes costs seconds; a fixed layout costs nothing and looks the same for regular grids.
    """
    left, right, top, bottom = margins
    width = left + right + cols * tile[0] + (cols - 1) * gaps[0]
    height = top + bottom + rows * tile[1] + (rows - 1) * gaps[1]
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        top=1 - top / height,
        bottom=bottom / height,
        wspace=gaps[0] / tile[0],
        hspace=gaps[1] / tile[1],
    )
    return fig, axes


def side_colourbar(fig: Any, mappable: Any, label: str, right_inches: float) -> Any:
    """A colour bar in the right margin (right_inches wide), 70 % of the figure's height."""
    width, _ = fig.get_size_inches()
    x = 1 - (right_inches - 0.25) / width
    bar_ax = fig.add_axes((x, 0.15, 0.15 / width, 0.7))
    bar = fig.colorbar(mappable, cax=bar_ax)
    bar.set_label(label)
    return bar
