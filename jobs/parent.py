"""The search's parent run and the model registry: what the search says about itself in MLflow.

Opens (or finds, on resume) the parent run, logs the settings, versions and the space, and at
the end summarises the children: `search/trials.csv`, `search/budget.json` (how the budget was
spent), the best run, and the `fer2013-expression@champion` registration.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from jobs.settings import SearchSettings, as_dict
from schema import run as layout

log = logging.getLogger("jobs.search")

TAG_SEARCH_NAME = layout.TAG_SEARCH_NAME
TAG_TUNE_PATH = layout.TAG_TUNE_PATH
TAG_MODEL_URI = layout.TAG_MODEL_URI
REFUSED_STATUSES = ("does_not_fit", "over_budget")
ROLE_TRIAL = layout.ROLE_TRIAL
# Full-data epochs below which a coursework model's accuracy is not the model's but the
# budget's (SEED2017 is still near chance after 2; published runs train it for 30+).
COURSEWORK_MIN_EPOCHS = 10


@dataclass
class SearchResult:
    parent_run_id: str
    best_run_id: str | None
    best_val_accuracy: float | None
    tune_path: str
    champion_run_id: str | None = None  # the ensemble's run when it is champion, else best
    ensemble_note: str = ""  # why the search has no ensemble, when building it failed
    trials: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0


# MLflow 3's UI opens an experiment by its kind: model training shows the runs table first
# (without it, a new experiment opens on the GenAI overview of traces and sessions).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def experiment_id(client: Any) -> str:
    """The experiment the search logs to (MLflow's variables, else Default), marked as a
    model-training experiment unless its kind is already set."""
    found = _experiment_id(client)
    experiment = client.get_experiment(found)
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
        client.set_experiment_tag(found, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return found


def _experiment_id(client: Any) -> str:
    env_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if env_id:
        return env_id
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        # Not mlflow.set_experiment: it exports MLFLOW_EXPERIMENT_ID into this process's
        # environment, which then outlives the search (a later search or `mlflow run` in the
        # same process would log into, or refuse, that stale id).
        found = client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else client.create_experiment(name)
    return "0"


def find_parent(client: Any, experiment: str, name: str) -> Any | None:
    runs = client.search_runs(
        [experiment],
        filter_string=(
            f"tags.`{layout.TAG_ROLE}` = '{layout.ROLE_SEARCH}' "
            f"and tags.`{TAG_SEARCH_NAME}` = '{name}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def open_parent(
    client: Any, experiment: str, settings: SearchSettings, storage: str
) -> tuple[str, str, bool]:
    """(parent run id, Tune path, resumed): the earlier search's on resume, else a new one."""
    launched_run = os.environ.get("MLFLOW_RUN_ID")  # set by `mlflow run`
    parent = find_parent(client, experiment, settings.name) if settings.resume else None
    if settings.resume and parent is None:
        raise ValueError(
            f"resume: no earlier search named {settings.name!r} in experiment {experiment}; "
            f"run once with resume=false first"
        )
    if parent is not None:
        parent_id = parent.info.run_id
        if launched_run and launched_run != parent_id:
            client.set_tag(launched_run, layout.TAG_ROLE, layout.ROLE_SEARCH_RESUME)
            client.set_tag(launched_run, layout.TAG_RESUMED_PARENT, parent_id)
        client.update_run(parent_id, status="RUNNING")
        return parent_id, parent.data.tags[TAG_TUNE_PATH], True
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    name = f"{settings.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if launched_run:
        # `mlflow run` opened the run under a random name: the search's name is what users
        # look for in the UI.
        client.set_tag(launched_run, MLFLOW_RUN_NAME, name)
        parent_id = launched_run
    else:
        parent_id = client.create_run(experiment, run_name=name).info.run_id
    return parent_id, f"{storage}/{name}", False


def log_parent(
    client: Any,
    parent_id: str,
    settings: SearchSettings,
    budget: Any,
    planned: list[dict[str, Any]],
    data_info: dict[str, Any],
    tune_path: str,
    calibration: Any,
) -> None:
    """Settings, versions, the worker budget, the calibration and the space of a new search."""
    import keras
    import mlflow
    import ray
    import tensorflow as tf
    from mlflow.entities import Metric, Param

    from jobs.space import AUGMENTATIONS, SPACE

    params = {f"search.{k}": str(v) for k, v in as_dict(settings).items()}
    params["data_sha256"] = data_info["sha256"]
    tags = {
        layout.TAG_ROLE: layout.ROLE_SEARCH,
        TAG_SEARCH_NAME: settings.name,
        TAG_TUNE_PATH: tune_path,
        layout.TAG_DATA_SHA: data_info["sha256"],
        layout.TAG_WORKER_BUDGET: budget.describe(),
        layout.TAG_BACKEND: settings.backend,
        "version.tensorflow": tf.__version__,
        "version.keras": keras.__version__,
        "version.ray": ray.__version__,
        "version.mlflow": mlflow.__version__,
        "version.python": platform.python_version(),
    }
    metrics = []
    if calibration is not None:
        now = int(time.time() * 1000)
        tags[layout.TAG_CALIBRATION] = json.dumps(calibration.to_dict())
        metrics.append(
            Metric("reference_images_per_second", calibration.reference_images_per_second, now, 0)
        )
    client.log_batch(
        parent_id,
        params=[Param(k, v) for k, v in params.items()],
        metrics=metrics,
        tags=[_tag(k, v) for k, v in tags.items()],
    )
    client.log_text(
        parent_id,
        json.dumps(
            {"space": SPACE, "augmentations": AUGMENTATIONS, "plans": planned},
            indent=2,
            default=str,
        ),
        "search/space.json",
    )


def _tag(key: str, value: str) -> Any:
    from mlflow.entities import RunTag

    return RunTag(key, value)


def _trials_csv(rows: list[dict[str, Any]]) -> str:
    columns = sorted({key for row in rows for key in row})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def children(client: Any, parent_id: str, role: str = ROLE_TRIAL) -> list[Any]:
    """The parent's child runs of one role: its trials (refused ones too), or its ensemble."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs(
        [experiment],
        filter_string=(
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' and tags.`{layout.TAG_ROLE}` = '{role}'"
        ),
        max_results=5000,
    )


def memory_rows(runs: list[Any]) -> list[dict[str, Any]]:
    """Estimated vs measured peak memory of each trial that trained (search/memory.csv)."""
    rows = []
    for run in runs:
        estimate = float(run.data.params.get("estimated_memory_mb", 0) or 0)
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
    started = [t for t in trials if t["status"] not in REFUSED_STATUSES]
    return {
        "time_budget_min": settings.time_budget_min,
        "final_budget_share": settings.final_budget_share,
        "trials_started": len(started),
        "trials_refused": len(trials) - len(started),
        "explore_minutes": round(sum(t["minutes"] for t in started if t["phase"] != "final"), 2),
        "final_minutes": round(sum(t["minutes"] for t in started if t["phase"] == "final"), 2),
        # |estimate / measured - 1| of each trial's median epoch: the time estimate's error.
        "epoch_time_estimate_median_abs_err": statistics.median(errors) if errors else None,
        "trials": trials,
    }


def finalise(
    client: Any,
    parent_id: str,
    settings: SearchSettings,
    result: SearchResult,
    ensemble: Any | None = None,
) -> dict[str, Any]:
    """trials.csv, budget.json, best run tags and metrics, and the champion registration
    (`ensemble`, a `jobs.ensemble.EnsembleOutcome`, when the search built one)."""
    from mlflow.entities import Metric, Param

    runs = children(client, parent_id)
    rows = []
    for run in runs:
        rows.append(
            {
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
        )
    result.trials = rows
    _note_undertrained_coursework(client, runs, settings)
    result.refused = [
        r.info.run_name for r in runs if r.data.tags.get(layout.TAG_STATUS) in REFUSED_STATUSES
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
    scored = [
        r
        for r in runs
        if r.info.status == "FINISHED"
        and "best_val_accuracy" in r.data.metrics
        and TAG_MODEL_URI in r.data.tags
    ]
    if not scored:
        log.error("no trial finished with a model; nothing to tag or register")
        return report
    best = max(scored, key=lambda r: r.data.metrics["best_val_accuracy"])
    result.best_run_id = best.info.run_id
    result.best_val_accuracy = best.data.metrics["best_val_accuracy"]
    client.set_tag(parent_id, layout.TAG_BEST_RUN, best.info.run_id)
    client.log_metric(parent_id, "best_val_accuracy", result.best_val_accuracy)
    client.set_tag(best.info.run_id, layout.TAG_BEST, "true")
    for family in ("cnn", "dnn"):
        of_family = [r for r in scored if r.data.tags.get(layout.TAG_FAMILY) == family]
        if of_family:
            top = max(of_family, key=lambda r: r.data.metrics["best_val_accuracy"])
            client.log_metric(
                parent_id, f"best_{family}_val_accuracy", top.data.metrics["best_val_accuracy"]
            )
            client.set_tag(parent_id, f"best_{family}_run_id", top.info.run_id)
    champion_uri, result.champion_run_id = best.data.tags[TAG_MODEL_URI], best.info.run_id
    kind = "single"
    reason = " ".join(
        part
        for part in (f"{best.info.run_name} has the best val_accuracy.", result.ensemble_note)
        if part
    )
    if ensemble is not None:
        table = ensemble.choice.table
        client.log_batch(
            parent_id,
            metrics=[
                Metric("ensemble_gain_points", table.gain_points, now, 0),
                Metric("report_best_single_accuracy", table.best_single, now, 0),
                Metric("report_ensemble_flip_accuracy", table.ensemble_flip, now, 0),
            ],
        )
        reason = ensemble.reason()
        if ensemble.beats_best_single:
            kind, champion_uri = "ensemble", ensemble.model_uri
            result.champion_run_id = ensemble.run_id
    client.log_batch(
        parent_id,
        tags=[
            _tag(layout.TAG_CHAMPION, kind),
            _tag(layout.TAG_CHAMPION_REASON, reason),
            _tag(layout.TAG_CHAMPION_RUN, result.champion_run_id),
        ],
    )
    if settings.register:
        register_champion(client, champion_uri, result.champion_run_id)
    return report


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
            f"{name} trained {epochs} epoch(s) on {fraction:g} of the training rows "
            f"({full:.1f} full-data epochs) in this {settings.time_budget_min:g}-minute search: "
            f"too few to train it, so {accuracy:.3f} is what the budget allowed, not the "
            f"model's accuracy. Train it alone: mlflow run . -e train -P preset={name} "
            f"-P epochs=30 (hours on a CPU core, minutes on a GPU)."
        )
        client.set_tag(run.info.run_id, layout.TAG_COURSEWORK_NOTE, note)


def register_champion(client: Any, model_uri: str, run_id: str) -> str:
    """Register the model as `fer2013-expression` and point the `champion` alias at it."""
    import mlflow

    version = mlflow.register_model(model_uri, layout.REGISTERED_MODEL, tags={"run_id": run_id})
    client.set_registered_model_alias(
        layout.REGISTERED_MODEL, layout.CHAMPION_ALIAS, version.version
    )
    log.info(
        "registered %s version %s as @%s",
        layout.REGISTERED_MODEL,
        version.version,
        layout.CHAMPION_ALIAS,
    )
    return str(version.version)
