"""Summary: what the search's children did, on the parent run (trials.csv, memory, budget)."""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

from jobs.search.context import SearchContext
from jobs.settings import SearchSettings
from jobs.tracking.parent import children
from schema import run as layout

log = logging.getLogger("jobs.search")
# Full-data epochs below which a coursework model's accuracy is not the model's but the
# budget's (SEED2017 is still near chance after 2; published runs train it for 30+).
COURSEWORK_MIN_EPOCHS = 10


@dataclass(frozen=True)
class Summary:
    """The trials as summarised on the parent run, and the runs the champion is chosen from."""

    trials: tuple[dict[str, Any], ...]
    refused: tuple[str, ...]
    report: dict[str, Any]  # search/budget.json
    runs: tuple[Any, ...]  # the trials' MLflow runs (refused ones too)


def summarise(ctx: SearchContext) -> Summary:
    """Write the search's summary artifacts and metrics on its parent run."""
    from mlflow.tracking import MlflowClient

    return write_summary(MlflowClient(ctx.run.tracking_uri), ctx.run.parent_id, ctx.settings)


def write_summary(client: Any, parent_id: str, settings: SearchSettings) -> Summary:
    """trials.csv, memory.csv, budget.json and their metrics on `parent_id`."""
    from mlflow.entities import Metric, Param

    runs = children(client, parent_id)
    rows = [_trial_row(run) for run in runs]
    _note_undertrained_coursework(client, runs, settings)
    refused = [
        r.info.run_name
        for r in runs
        if r.data.tags.get(layout.TAG_STATUS) in layout.REFUSED_STATUSES
    ]
    client.log_text(parent_id, _trials_csv(rows) if rows else "", "search/trials.csv")
    memory = memory_rows(runs)
    if memory:
        client.log_text(parent_id, _trials_csv(memory), "search/memory.csv")
        errors = [abs(row["error"]) for row in memory]
        client.log_metric(parent_id, "memory_estimate_median_abs_err", statistics.median(errors))
    report = budget_report(client, runs, settings)
    client.log_text(parent_id, json.dumps(report, indent=2), "search/budget.json")
    now = int(time.time() * 1000)
    metrics = [Metric("budget_trials_started", report["trials_started"], now, 0)]
    if report["epoch_time_estimate_median_abs_err"] is not None:
        metrics.append(
            Metric(
                "epoch_time_estimate_median_abs_err",
                report["epoch_time_estimate_median_abs_err"],
                now,
                0,
            )
        )
    client.log_batch(
        parent_id,
        metrics=metrics,
        params=[
            Param("budget.explore_minutes", str(report["explore_minutes"])),
            Param("budget.final_minutes", str(report["final_minutes"])),
        ],
    )
    return Summary(tuple(rows), tuple(refused), report, tuple(runs))


def _trial_row(run: Any) -> dict[str, Any]:
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "trial_status": run.data.tags.get(layout.TAG_STATUS, ""),
        "phase": run.data.params.get("phase", ""),
        "family": run.data.tags.get(layout.TAG_FAMILY, ""),
        "param_count": run.data.params.get("param_count", ""),
        "estimated_memory_mb": run.data.params.get("estimated_memory_mb", ""),
        "estimated_epoch_seconds": run.data.params.get("estimated_epoch_seconds", ""),
        "best_val_accuracy": run.data.metrics.get("best_val_accuracy", ""),
        "epochs_done": run.data.tags.get(layout.TAG_EPOCHS_DONE, ""),
    }


def _trials_csv(rows: list[dict[str, Any]]) -> str:
    columns = sorted({key for row in rows for key in row})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def memory_rows(runs: list[Any]) -> list[dict[str, Any]]:
    """Estimated vs measured peak memory of each trial that trained (search/memory.csv)."""
    rows = []
    for run in runs:
        params = run.data.params
        # Host memory reserved (the whole trial on a CPU worker), against the measured peak.
        estimate = float(
            params.get("estimated_host_memory_mb", params.get("estimated_memory_mb", 0)) or 0
        )
        peak = run.data.metrics.get("peak_memory_mb")  # the latest epoch's: the peak so far
        if estimate > 0 and peak:
            rows.append(
                {
                    "name": run.info.run_name,
                    "run_id": run.info.run_id,
                    "estimated_memory_mb": round(estimate, 1),
                    "peak_memory_mb": round(peak, 1),
                    "gpu_peak_memory_mb": run.data.metrics.get("gpu_peak_memory_mb", ""),
                    "error": round(estimate / peak - 1, 4),
                }
            )
    return rows


def budget_report(client: Any, runs: list[Any], settings: SearchSettings) -> dict[str, Any]:
    """How the budget was spent: minutes, epochs, stop reason and time estimate per trial."""
    trials = []
    errors = []
    for run in sorted(runs, key=lambda r: r.info.start_time):
        tags, params = run.data.tags, run.data.params
        seconds = [m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds")]
        estimate = float(params.get("estimated_epoch_seconds", 0) or 0)
        measured = statistics.median(seconds) if seconds else None
        if measured and estimate > 0:
            errors.append(abs(estimate / measured - 1))
        end = run.info.end_time or int(time.time() * 1000)
        trials.append(
            {
                "name": run.info.run_name,
                "phase": params.get("phase", ""),
                "status": tags.get(layout.TAG_STATUS, run.info.status),
                "stop_reason": tags.get(layout.TAG_STOP_REASON, ""),
                "refusal": tags.get(layout.TAG_REFUSAL, ""),
                "minutes": round((end - run.info.start_time) / 60000, 2),
                "epochs_done": int(tags.get(layout.TAG_EPOCHS_DONE, 0) or 0),
                "max_epochs": int(params.get("max_epochs", 0) or 0),
                "train_fraction": float(params.get("train_fraction", 1.0) or 1.0),
                "estimated_epoch_seconds": estimate,
                "median_epoch_seconds": measured,
                "best_val_accuracy": run.data.metrics.get("best_val_accuracy"),
            }
        )
    started = [t for t in trials if t["status"] not in layout.REFUSED_STATUSES]
    return {
        "time_budget_min": settings.time_budget_min,
        "final_budget_share": settings.final_budget_share,
        "trials_started": len(started),
        "trials_refused": len(trials) - len(started),
        "explore_minutes": round(
            sum(t["minutes"] for t in started if t["phase"] != layout.PHASE_FINAL), 2
        ),
        "final_minutes": round(
            sum(t["minutes"] for t in started if t["phase"] == layout.PHASE_FINAL), 2
        ),
        # |estimate / measured - 1| of each trial's median epoch: the time estimate's error.
        "epoch_time_estimate_median_abs_err": statistics.median(errors) if errors else None,
        "trials": trials,
    }


def _note_undertrained_coursework(client: Any, runs: list[Any], settings: SearchSettings) -> None:
    """Tag the coursework models the budget could not train, in words, with their epochs (the
    report then says so instead of presenting their accuracy as the model's)."""
    from jobs.space import COURSEWORK_POINTS

    for run in runs:
        name, params = run.info.run_name, run.data.params
        if name not in COURSEWORK_POINTS or "best_val_accuracy" not in run.data.metrics:
            continue
        epochs = int(run.data.tags.get(layout.TAG_EPOCHS_DONE, 0) or 0)
        fraction = float(params.get("train_fraction", 1.0) or 1.0)
        full = epochs * fraction
        if full >= COURSEWORK_MIN_EPOCHS:
            continue
        accuracy = run.data.metrics["best_val_accuracy"]
        note = (
            f"{name} trained {epochs} epoch(s) on "
            f"{'every training row' if fraction >= 1 else f'{fraction:g} of the training rows'} "
            f"({full:.1f} full-data epochs) in this {settings.time_budget_min:g}-minute search: "
            f"too few to train it, so {accuracy:.3f} is what the budget allowed, not the "
            f"model's accuracy. Train it alone: mlflow run . -e train -P preset={name} "
            f"-P epochs=30 (hours on a CPU core, minutes on a GPU)."
        )
        client.set_tag(run.info.run_id, layout.TAG_COURSEWORK_NOTE, note)
