"""The 60-minute budget search on the full data, as a user runs it (`mlflow run . -e search`).

    python -m bench.bench_budget --data $FER2013_PATH --json bench/results/budget_search.json
    python -m bench.bench_budget --summarise sqlite:////tmp/budget/mlflow.db --experiment budget

Slow (an hour): run once per change of the search; `make bench` reuses the stored result.
The summary says what the search reached and what limited it: epochs done per trial,
throughput, ASHA decisions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from schema import run as layout

ROOT = Path(__file__).resolve().parent.parent


def summarise(tracking_uri: str, experiment: str) -> dict[str, Any]:
    """Read the latest search parent run of `experiment` and its children."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no experiment {experiment!r} in {tracking_uri}")
    parents = client.search_runs(
        [found.experiment_id],
        f"tags.`{layout.TAG_ROLE}` = '{layout.ROLE_SEARCH}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        raise ValueError(f"no search parent run in experiment {experiment!r}")
    parent = parents[0]
    children = client.search_runs(
        [found.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    ensembles = [r for r in children if r.data.tags.get(layout.TAG_ROLE) == layout.ENSEMBLE]
    trials = []
    for run in children:
        if run.data.tags.get(layout.TAG_ROLE) == layout.ENSEMBLE:
            continue
        speed = [m.value for m in client.get_metric_history(run.info.run_id, "images_per_second")]
        trials.append(
            {
                "name": run.info.run_name,
                "phase": run.data.params.get("phase", ""),
                "family": run.data.tags.get(layout.TAG_FAMILY),
                "status": run.data.tags.get(layout.TAG_STATUS, run.info.status),
                "param_count": int(run.data.params.get("param_count", 0) or 0),
                "epochs_done": int(run.data.tags.get(layout.TAG_EPOCHS_DONE, 0) or 0),
                "stop_reason": run.data.tags.get(layout.TAG_STOP_REASON),
                "best_val_accuracy": run.data.metrics.get("best_val_accuracy"),
                "images_per_second_median": statistics.median(speed) if speed else None,
                "estimated_epoch_seconds": float(
                    run.data.params.get("estimated_epoch_seconds", 0) or 0
                ),
                "train_fraction": float(run.data.params.get("train_fraction", 1) or 1),
                "estimated_memory_mb": _host_estimate(run.data.params),
                "peak_memory_mb": run.data.metrics.get("peak_memory_mb"),
                "memory_over_reservation": run.data.tags.get(layout.TAG_MEMORY_OVER, ""),
            }
        )
    dnn = [
        t["best_val_accuracy"]
        for t in trials
        if t["family"] == "dnn" and t["best_val_accuracy"] is not None
    ]
    end = parent.info.end_time or int(time.time() * 1000)
    metrics = parent.data.metrics
    return {
        "budget_search_best_val_accuracy": metrics.get("best_val_accuracy"),
        # The machine's speed, measured in the same run: plain Keras on the reference CNN.
        "reference_images_per_second": metrics.get("reference_images_per_second"),
        "budget_trials_started": metrics.get("budget_trials_started"),
        "epoch_time_estimate_median_abs_err": metrics.get("epoch_time_estimate_median_abs_err"),
        # The trial memory estimate against the trials' measured peaks, that search's parent.
        "budget_memory_estimate_median_abs_err": metrics.get("memory_estimate_median_abs_err"),
        "budget_trials_over_reservation": sum(bool(t["memory_over_reservation"]) for t in trials),
        "budget_runtime_memory_mb": metrics.get("runtime_memory_mb"),
        "dnn_best_val_accuracy": max(dnn) if dnn else None,
        "budget_minutes": float(parent.data.params.get("search.time_budget_min", "nan")),
        "budget_wall_minutes": (end - parent.info.start_time) / 60000,
        "budget_run_date": time.strftime(
            "%Y-%m-%d %H:%M UTC", time.gmtime(parent.info.start_time / 1000)
        ),
        "budget_trials": sorted(trials, key=lambda t: -(t["best_val_accuracy"] or 0)),
        # Stopped before max_epochs, by ASHA or by the time budget (`stop_reason`; runs made
        # before that tag existed have none).
        "budget_trials_stopped_early": sum(t["status"] == "early_stopped" for t in trials),
        "budget_trials_stopped_by_scheduler": sum(t["stop_reason"] == "scheduler" for t in trials),
        **_ensemble(ensembles, parent.data.tags),
    }


def _host_estimate(params: dict[str, str]) -> float | None:
    """The host memory a trial was placed with (older runs logged the whole estimate only)."""
    value = params.get("estimated_host_memory_mb", params.get("estimated_memory_mb"))
    return float(value) if value else None


def _ensemble(runs: list[Any], parent_tags: dict[str, str]) -> dict[str, Any]:
    """The search's ensemble: its gain over the best single model on the report half."""
    if not runs:
        return {}
    metrics, params = runs[0].data.metrics, runs[0].data.params
    return {
        # Ensemble + flip minus the best single model, report half of PublicTest, in points.
        "ensemble_gain_points": metrics.get("ensemble_gain_points"),
        "ensemble_report": {
            key: metrics.get(f"report_{key}_accuracy")
            for key in ("best_single", "best_single_flip", "ensemble", "ensemble_flip")
        },
        "ensemble_members": params.get("members", ""),
        "ensemble_weights": params.get("weights", ""),
        "ensemble_flip": params.get("flip", ""),
        "ensemble_best_single": params.get("best_single", ""),
        "ensemble_report_rows": params.get("report_rows", ""),
        "ensemble_predict_ms_per_image": metrics.get("predict_ms_per_image"),
        "ensemble_champion": parent_tags.get(layout.TAG_CHAMPION, ""),
        "ensemble_champion_reason": parent_tags.get(layout.TAG_CHAMPION_REASON, ""),
    }


def run(data: str, budget_min: float = 60.0) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="fer-budget-"))
    uri = f"sqlite:///{workdir}/mlflow.db"
    # Kept after the run (an hour's trials and checkpoints): say where, and how to re-read it.
    print(
        f"budget search: tracking store and Tune storage in {workdir} "
        f"(re-read with: python -m bench.bench_budget --summarise {uri})",
        file=sys.stderr,
        flush=True,
    )
    # An experiment id or run id in the caller's environment would make `mlflow run` refuse
    # the experiment name given here.
    inherited = {
        key: value
        for key, value in os.environ.items()
        if key not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")
    }
    env = {
        **inherited,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    subprocess.run(
        [
            "mlflow",
            "run",
            ".",
            "--env-manager",
            "local",
            "-e",
            "search",
            "--experiment-name",
            "budget",
            "-P",
            f"data={data}",
            "-P",
            f"time_budget_min={budget_min}",
            "-P",
            f"storage={workdir}/tune",
        ],
        cwd=ROOT,
        env=env,
        check=True,
    )
    result = summarise(uri, "budget")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    result["budget_commit"] = commit
    result["budget_tracking_uri"] = uri
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FER2013_PATH", ""))
    parser.add_argument("--budget-min", type=float, default=60.0)
    parser.add_argument(
        "--summarise",
        metavar="TRACKING_URI",
        help="summarise an existing budget search instead of running one",
    )
    parser.add_argument("--experiment", default="budget")
    parser.add_argument("--commit", default="", help="commit the summarised run was made at")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.summarise:
        result = summarise(args.summarise, args.experiment)
        result["budget_commit"] = args.commit
    else:
        if not args.data:
            parser.error("--data or FER2013_PATH is required")
        result = run(args.data, args.budget_min)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
