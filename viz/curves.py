"""Architecture table and learning curves of the best CNN and DNN of a search."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.table import Table
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from schema.run import TAG_COURSEWORK_NOTE, TAG_FAMILY
from viz.plotting import plt, save_figure
from viz.runs import BEST_METRIC, TAG_PARENT, parent_run_id

FAMILY_COLOURS = {"cnn": "tab:blue", "dnn": "tab:orange"}
_OTHER_COLOURS = ["tab:green", "tab:red", "tab:purple", "tab:brown"]


# ---------------------------------------------------------------- architecture table


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


def plot_architecture(model: Any, path: str | Path, title: str) -> Path:
    """The model summary as a table figure."""
    rows = architecture_rows(model)
    total, trainable = param_counts(model)
    cells = [[r.name, r.kind, r.output_shape, f"{r.params:,}"] for r in rows]
    cells.append(["total", "", f"trainable {trainable:,}", f"{total:,}"])
    row_inches = 0.3
    table_inches = row_inches * (len(cells) + 1)
    fig = plt.figure(figsize=(10, table_inches + 0.8))
    # The axes is exactly the table's box below the title, so rows never stretch or leave gaps.
    ax = fig.add_axes((0.04, 0.1 / (table_inches + 0.8), 0.92, table_inches / (table_inches + 0.8)))
    ax.axis("off")
    # Built cell by cell: only add_cell sets alignment per cell (numbers right-aligned).
    table = Table(ax, bbox=(0, 0, 1, 1))
    widths = (0.32, 0.24, 0.26, 0.18)
    lines = [["layer", "type", "output shape", "params"], *cells]
    for row, line in enumerate(lines):
        for col, text in enumerate(line):
            cell = table.add_cell(
                row,
                col,
                widths[col],
                1 / len(lines),
                text=text,
                loc="right" if col == 3 else "left",
            )
            if row == 0:
                cell.set_facecolor("#dbe5f1")
                cell.set_text_props(weight="bold")
            elif row == len(lines) - 1:
                cell.set_facecolor("#f2f2f2")
                cell.set_text_props(weight="bold")
            elif row % 2 == 0:
                cell.set_facecolor("#fafafa")
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    ax.add_table(table)
    fig.suptitle(title, fontsize=12, y=1 - 0.15 / (table_inches + 0.8))
    return save_figure(fig, path)


# ---------------------------------------------------------------- learning curves


@dataclass
class FamilyRun:
    """A run drawn in the learning curves."""

    run_id: str
    family: str
    best_val_accuracy: float | None
    param_count: int | None
    is_target: bool = False


@dataclass
class Curve:
    run: FamilyRun
    accuracy: tuple[np.ndarray, np.ndarray] = field(
        default_factory=lambda: (np.zeros(0), np.zeros(0))
    )
    val_accuracy: tuple[np.ndarray, np.ndarray] = field(
        default_factory=lambda: (np.zeros(0), np.zeros(0))
    )


def _family_run(run: Run, is_target: bool) -> FamilyRun:
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
        is_target=is_target,
    )


def best_runs_by_family(client: MlflowClient, target: Run) -> dict[str, FamilyRun]:
    """Best `best_val_accuracy` child run per family of the target's parent search.

    A standalone run (no parent) is its own only entry.
    """
    parent = parent_run_id(target)
    if parent is None:
        entry = _family_run(target, True)
        return {entry.family: entry}
    children = client.search_runs(
        [target.info.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent}'",
        max_results=5000,
    )
    best: dict[str, FamilyRun] = {}
    for child in children:
        entry = _family_run(child, child.info.run_id == target.info.run_id)
        if entry.best_val_accuracy is None:
            continue
        current = best.get(entry.family)
        if current is None or entry.best_val_accuracy > (current.best_val_accuracy or -1.0):
            best[entry.family] = entry
    return best


def coursework_notes(client: MlflowClient, target: Run) -> list[str]:
    """What the search said of the coursework models its budget could not train."""
    parent = parent_run_id(target)
    if parent is None:
        return []
    children = client.search_runs(
        [target.info.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent}'",
        max_results=5000,
    )
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


def collect_curves(
    client: MlflowClient, target: Run, best: dict[str, FamilyRun] | None = None
) -> list[Curve]:
    """Curves of the best run per family (`best`, else queried), plus the target run when it
    is not one of them."""
    best = best_runs_by_family(client, target) if best is None else best
    runs = sorted(best.values(), key=lambda r: r.family)
    if not any(r.run_id == target.info.run_id for r in runs):
        runs.append(_family_run(target, True))
    curves = []
    for entry in runs:
        curves.append(
            Curve(
                run=entry,
                accuracy=metric_series(client, entry.run_id, "accuracy"),
                val_accuracy=metric_series(client, entry.run_id, "val_accuracy"),
            )
        )
    return curves


def _label(run: FamilyRun) -> str:
    params = "? params" if run.param_count is None else f"{run.param_count:,} params"
    best = "" if run.best_val_accuracy is None else f", best val {run.best_val_accuracy:.3f}"
    mark = " (visualised)" if run.is_target else ""
    return f"{run.family.upper()} {run.run_id[:8]}: {params}{best}{mark}"


def plot_learning_curves(curves: list[Curve], path: str | Path, title: str) -> Path:
    """Training and validation accuracy per epoch, one line per run."""
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
        style = dict(color=colour, linewidth=2, label=_label(curve.run))
        for ax, (steps, values) in zip(axes, (curve.accuracy, curve.val_accuracy), strict=True):
            marker = "o" if len(steps) <= 30 else None
            ax.plot(steps, values, marker=marker, markersize=4, **style)
    for ax, name in zip(axes, ("training accuracy", "validation accuracy"), strict=True):
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("accuracy")
    if all(len(c.accuracy[0]) == 0 and len(c.val_accuracy[0]) == 0 for c in curves):
        for ax in axes:
            ax.text(0.5, 0.5, "no per-epoch metrics logged", ha="center", transform=ax.transAxes)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * len(curves), 1, 1))
    return save_figure(fig, path)
