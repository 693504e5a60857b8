"""Layer table of a model, and learning curves of the search's best CNN and DNN.

A final trial continued an explored trial's weights: its curve is the whole path, the
explored epochs (on a share of the rows), then the final ones (on every row), the boundary
marked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from schema.run import TAG_COURSEWORK_NOTE, TAG_FAMILY
from viz.plotting import plt, save_figure
from viz.recipe import explored_of
from viz.runs import BEST_METRIC

FAMILY_COLOURS = {"cnn": "tab:blue", "dnn": "tab:orange"}
_OTHER_COLOURS = ["tab:green", "tab:red", "tab:purple", "tab:brown"]


# ---------------------------------------------------------------- layer table


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    output_shape: str
    params: int


def architecture_rows(model: Any) -> list[LayerRow]:
    """One row per layer: name, class, output shape, parameter count."""
    rows = []
    for layer in model.layers:
        try:
            shape = tuple(layer.output.shape)
        except (AttributeError, ValueError):  # a layer never called has no symbolic output
            shape = None
        shape_text = (
            "?"
            if shape is None
            else "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"
        )
        rows.append(
            LayerRow(layer.name, type(layer).__name__, shape_text, int(layer.count_params()))
        )
    return rows


def param_counts(model: Any) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    trainable = int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))
    return int(model.count_params()), trainable


# ---------------------------------------------------------------- learning curves


@dataclass
class FamilyRun:
    """A run drawn in the learning curves."""

    run_id: str
    family: str
    best_val_accuracy: float | None
    param_count: int | None
    mark: str = ""  # what the report calls it ("question 1", "champion"), if anything
    name: str = ""  # the run's name


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0), np.zeros(0)


@dataclass
class Curve:
    run: FamilyRun
    accuracy: tuple[np.ndarray, np.ndarray] = field(default_factory=_empty)
    val_accuracy: tuple[np.ndarray, np.ndarray] = field(default_factory=_empty)
    # Epochs of the explored trial a final continued (its curve starts there), else None.
    explored_epochs: int | None = None

    @property
    def empty(self) -> bool:
        return len(self.accuracy[0]) == 0 and len(self.val_accuracy[0]) == 0


def family_run(run: Run, mark: str = "") -> FamilyRun:
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    family = tags.get(TAG_FAMILY) or params.get("family") or "unknown"
    try:
        count: int | None = int(params["param_count"])
    except (KeyError, ValueError):
        count = None
    return FamilyRun(
        run_id=run.info.run_id,
        family=family,
        best_val_accuracy=metrics.get(BEST_METRIC),
        param_count=count,
        mark=mark,
        name=run.info.run_name or "",
    )


def best_runs_by_family(children: list[Run]) -> dict[str, FamilyRun]:
    """Best `best_val_accuracy` run per family among a search's runs (`children`)."""
    best: dict[str, FamilyRun] = {}
    for child in children:
        entry = family_run(child)
        if entry.best_val_accuracy is None:
            continue
        current = best.get(entry.family)
        if current is None or entry.best_val_accuracy > (current.best_val_accuracy or -1.0):
            best[entry.family] = entry
    return best


def coursework_notes(children: list[Run]) -> list[str]:
    """What the search said of the coursework models its budget could not train."""
    return sorted(
        run.data.tags[TAG_COURSEWORK_NOTE]
        for run in children
        if run.data.tags.get(TAG_COURSEWORK_NOTE)
    )


def metric_series(client: MlflowClient, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of a per-epoch metric; a step logged twice (resumed trial): the last."""
    by_step: dict[int, tuple[int, float]] = {}
    for metric in client.get_metric_history(run_id, key):
        seen = by_step.get(metric.step)
        if seen is None or metric.timestamp >= seen[0]:
            by_step[metric.step] = (metric.timestamp, metric.value)
    steps = np.array(sorted(by_step), dtype=np.int64)
    values = np.array([by_step[s][1] for s in steps], dtype=np.float64)
    return steps, values


def _joined(
    first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray], offset: int
) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([first[0], second[0] + offset]), np.concatenate([first[1], second[1]])


def whole_history(client: MlflowClient, entry: FamilyRun, children: list[Run]) -> Curve:
    """A run's accuracy per epoch; a final trial's preceded by its explored trial's epochs."""
    run = next((c for c in children if c.info.run_id == entry.run_id), None)
    own = [metric_series(client, entry.run_id, k) for k in ("accuracy", "val_accuracy")]
    explored = explored_of(run, children) if run is not None else None
    if explored is None:
        return Curve(entry, own[0], own[1])
    before = [metric_series(client, explored.info.run_id, k) for k in ("accuracy", "val_accuracy")]
    offset = int(max([0, *before[0][0], *before[1][0]]))
    return Curve(
        entry,
        _joined(before[0], own[0], offset),
        _joined(before[1], own[1], offset),
        explored_epochs=offset,
    )


def collect_curves(
    client: MlflowClient, entries: list[FamilyRun], children: list[Run]
) -> list[Curve]:
    """The whole history of each run in `entries` that logged per-epoch metrics (an ensemble
    logs none: it has no line to draw, so no legend entry either)."""
    found = [whole_history(client, entry, children) for entry in entries]
    return [curve for curve in found if not curve.empty]


def _label(curve: Curve) -> str:
    run = curve.run
    params = "? params" if run.param_count is None else f"{run.param_count:,} params"
    best = "" if run.best_val_accuracy is None else f", best val {run.best_val_accuracy:.3f}"
    mark = f" ({run.mark})" if run.mark else ""
    name = run.name or run.run_id[:8]
    phases = ""
    if curve.explored_epochs is not None:
        final = int(len(curve.val_accuracy[0]) or len(curve.accuracy[0])) - curve.explored_epochs
        phases = f"; {curve.explored_epochs} explored + {max(final, 0)} final epochs"
    return f"{run.family.upper()} {name}: {params}{best}{phases}{mark}"


def plot_learning_curves(curves: list[Curve], path: str | Path, title: str) -> Path:
    """Training and validation accuracy per epoch, one line per run; a dotted line where a
    final trial's epochs on every row begin."""
    if not curves:
        raise ValueError("plot_learning_curves: expected at least one run's curves, found none")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    spare = iter(_OTHER_COLOURS)
    used: set[str] = set()
    for curve in curves:
        colour = FAMILY_COLOURS.get(curve.run.family, "")
        if not colour or colour in used:  # unknown family, or a family's second run
            colour = next(spare, "black")
        used.add(colour)
        style = dict(color=colour, linewidth=2, label=_label(curve))
        for ax, (steps, values) in zip(axes, (curve.accuracy, curve.val_accuracy), strict=True):
            marker = "o" if len(steps) <= 30 else None
            ax.plot(steps, values, marker=marker, markersize=4, **style)
            if curve.explored_epochs is not None:
                boundary = curve.explored_epochs + 0.5
                ax.axvline(boundary, color=colour, linestyle=":", linewidth=1.5)
                ax.annotate(
                    "final, every row →",
                    (boundary, 0.02),
                    xycoords=("data", "axes fraction"),
                    xytext=(4, 0),
                    textcoords="offset points",
                    fontsize=8,
                    color=colour,
                )
    for ax, name in zip(axes, ("training accuracy", "validation accuracy"), strict=True):
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("accuracy")
    if all(c.empty for c in curves):
        for ax in axes:
            ax.text(0.5, 0.5, "no per-epoch metrics logged", ha="center", transform=ax.transAxes)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * len(curves), 1, 1))
    return save_figure(fig, path)
