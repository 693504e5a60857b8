"""Our search vs KerasTuner Hyperband: time to first reach a target validation accuracy.

    python -m bench.bench_kerastuner --data $FER2013_PATH --budget-min 10 --target 0.35

Same data subset, same search space (`jobs.space.SPACE`, built by the same `model.configs`
builders), same wall-clock budget and the same machine. KerasTuner (installed only for the
benchmark, `requirements-bench.txt`) runs one trial at a time with all cores, as users run it;
our search runs with its defaults (one CPU per trial, ASHA). The clock starts before each tool
loads the data; a tool that never reaches the target is censored at the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _ours(
    data: str,
    fraction: float,
    budget_min: float,
    target: float,
    max_epochs: int,
    num_samples: int,
    workdir: Path,
) -> dict[str, Any]:
    import mlflow
    from mlflow.tracking import MlflowClient

    from jobs.search import run_search
    from jobs.settings import SearchSettings

    uri = f"sqlite:///{workdir}/mlflow.db"
    os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="vs-kerastuner")
    # An id in the caller's environment (e.g. under `mlflow run`) takes precedence over the
    # name in run_search: drop it, or this search would log into an experiment of another store.
    for stale in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        os.environ.pop(stale, None)
    mlflow.set_tracking_uri(uri)
    started_ms = time.time() * 1000
    settings = SearchSettings(
        data=data,
        data_fraction=fraction,
        num_samples=num_samples,
        max_epochs=max_epochs,
        time_budget_min=budget_min,
        storage=str(workdir / "tune"),
        name="vs-kt",
        register=False,
    )
    result = run_search(settings)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vs-kerastuner")
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
    )
    hits = [
        m.timestamp
        for run in children
        for m in client.get_metric_history(run.info.run_id, "val_accuracy")
        if m.value >= target
    ]
    return {
        "seconds_to_target": (min(hits) - started_ms) / 1000 if hits else None,
        "best_val_accuracy": result.best_val_accuracy,
        "wall_seconds": result.wall_seconds,
        "trials": len(children),
    }


def _kerastuner(
    data: str, fraction: float, budget_min: float, target: float, max_epochs: int, workdir: Path
) -> dict[str, Any]:
    hit_file = workdir / "kt_hit.json"
    command = [
        sys.executable,
        "-m",
        "bench.kerastuner_worker",
        "--data",
        data,
        "--fraction",
        str(fraction),
        "--target",
        str(target),
        "--max-epochs",
        str(max_epochs),
        "--directory",
        str(workdir / "kt"),
        "--hit-file",
        str(hit_file),
    ]
    started = time.time()
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            timeout=budget_min * 60,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=False,
        )
    except subprocess.TimeoutExpired:
        pass  # the budget is the stop condition, as for our search
    else:
        # Finishing early is fine (Hyperband ran out of trials); crashing is not: a worker whose
        # every trial failed would otherwise read as "never reached the target".
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"KerasTuner worker exited {done.returncode}:\n{tail}")
    wall = time.time() - started
    hit = json.loads(hit_file.read_text()) if hit_file.exists() else {}
    best = (
        json.loads((workdir / "kt_best.json").read_text())
        if (workdir / "kt_best.json").exists()
        else {}
    )
    return {
        "seconds_to_target": hit["time"] - started if hit else None,
        "best_val_accuracy": best.get("best_val_accuracy"),
        "wall_seconds": wall,
    }


def run(
    data: str,
    fraction: float = 0.1,
    budget_min: float = 10.0,
    target: float = 0.35,
    max_epochs: int = 9,
    num_samples: int = 8,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ours = _ours(
            data, fraction, budget_min, target, max_epochs, num_samples, Path(tmp) / "ours"
        )
        kt = _kerastuner(data, fraction, budget_min, target, max_epochs, Path(tmp))
    budget_s = budget_min * 60
    ours_t = ours["seconds_to_target"] or budget_s
    kt_t = kt["seconds_to_target"] or budget_s
    return {
        "kerastuner_time_to_target_ratio": ours_t / kt_t,
        "kerastuner_target_val_accuracy": target,
        "kerastuner_budget_min": budget_min,
        "kerastuner_data_fraction": fraction,
        "ours": ours,
        "kerastuner": kt,
        "censored": {
            "ours": ours["seconds_to_target"] is None,
            "kerastuner": kt["seconds_to_target"] is None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FER2013_PATH", ""))
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--budget-min", type=float, default=10.0)
    parser.add_argument("--target", type=float, default=0.35)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.data:
        parser.error("--data or FER2013_PATH is required")
    results = run(args.data, args.fraction, args.budget_min, args.target)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
