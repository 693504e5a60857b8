"""Our search vs KerasTuner Hyperband: time to reach the best accuracy KerasTuner reaches.

    python -m bench.bench_kerastuner --data $FER2013_PATH --fraction 0.2 --budget-min 10

Same data subset, same search space (`jobs.space.SPACE`, built by the same `model.configs`
builders), same wall-clock budget and the same machine, one tool after the other. KerasTuner
(installed only for the benchmark, `requirements-bench.txt`) runs one trial at a time with all
cores, as users run it; our search runs with its defaults (one CPU per trial, ASHA, the final
phase). The target is KerasTuner's best validation accuracy in its budget, so both tools reach
it unless ours never does: the ratio is our seconds to that accuracy over KerasTuner's seconds
to its best (`--target` sets a fixed target instead). The clock starts before each tool loads
the data; a tool that never reaches the target is censored at the budget.
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
        strategy="explore",  # this benchmark times the exploration against KerasTuner's
    )
    result = run_search(settings)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vs-kerastuner")
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
    )
    history = sorted(
        ((m.timestamp - started_ms) / 1000, m.value)
        for run in children
        for m in client.get_metric_history(run.info.run_id, "val_accuracy")
    )
    parent = client.get_run(result.parent_run_id)
    return {
        "history": history,
        "best_val_accuracy": result.best_val_accuracy,
        "wall_seconds": result.wall_seconds,
        "trials": len(children),
        "reference_images_per_second": parent.data.metrics.get("reference_images_per_second"),
    }


def _kerastuner(
    data: str, fraction: float, budget_min: float, max_epochs: int, workdir: Path
) -> dict[str, Any]:
    history_file = workdir / "kt_history.jsonl"
    command = [
        sys.executable,
        "-m",
        "bench.kerastuner_worker",
        "--data",
        data,
        "--fraction",
        str(fraction),
        "--max-epochs",
        str(max_epochs),
        "--directory",
        str(workdir / "kt"),
        "--history",
        str(history_file),
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
    lines = history_file.read_text().splitlines() if history_file.exists() else []
    history = [(row["time"] - started, row["val_accuracy"]) for row in map(json.loads, lines)]
    return {
        "history": history,
        "best_val_accuracy": max((v for _, v in history), default=None),
        "wall_seconds": wall,
    }


def seconds_to(history: list[tuple[float, float]], target: float) -> float | None:
    """When a (seconds, val_accuracy) history first reaches `target` (None: never)."""
    return min((t for t, v in history if v >= target - 1e-9), default=None)


def compare(
    ours: list[tuple[float, float]],
    kerastuner: list[tuple[float, float]],
    budget_s: float,
    target: float | None = None,
) -> dict[str, Any]:
    """Each tool's seconds to `target` (default: KerasTuner's best) and their ratio; a tool that
    never reaches it counts the whole budget."""
    if target is None:
        if not kerastuner:
            raise RuntimeError("KerasTuner finished no epoch in its budget: no target to reach")
        target = max(v for _, v in kerastuner)
    ours_s, kt_s = seconds_to(ours, target), seconds_to(kerastuner, target)
    return {
        "kerastuner_time_to_target_ratio": (ours_s or budget_s) / (kt_s or budget_s),
        "kerastuner_target_val_accuracy": target,
        "seconds_to_target": {"ours": ours_s, "kerastuner": kt_s},
        "censored": {"ours": ours_s is None, "kerastuner": kt_s is None},
    }


def run(
    data: str,
    fraction: float = 0.2,
    budget_min: float = 10.0,
    target: float | None = None,
    max_epochs: int = 9,
    num_samples: int = 8,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ours = _ours(data, fraction, budget_min, max_epochs, num_samples, Path(tmp) / "ours")
        kt = _kerastuner(data, fraction, budget_min, max_epochs, Path(tmp))
    outcome = compare(ours.pop("history"), kt.pop("history"), budget_min * 60, target)
    seconds = outcome.pop("seconds_to_target")
    ours["seconds_to_target"], kt["seconds_to_target"] = seconds["ours"], seconds["kerastuner"]
    return {
        **outcome,
        "kerastuner_budget_min": budget_min,
        "kerastuner_data_fraction": fraction,
        "kerastuner_reference_images_per_second": ours["reference_images_per_second"],
        "ours": ours,
        "kerastuner": kt,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FER2013_PATH", ""))
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--budget-min", type=float, default=10.0)
    parser.add_argument(
        "--target", type=float, default=None, help="default: KerasTuner's best val accuracy"
    )
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
