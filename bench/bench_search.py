"""The search machinery's cost: trial overhead vs plain `model.fit`, and concurrency speed-up.

    python -m bench.bench_search --data $FER2013_PATH --json out.json

- `trial_overhead_ratio`: the same model, data and epochs, run (a) as one trial of our search
  (Ray actor, object-store data, a checkpoint per epoch, MLflow metrics, model logging) timed
  from the child run's start to its end, and (b) as a plain script (`bench/plain_fit.py`):
  interpreter and TensorFlow start, model build, `model.fit`, timed without its data load.
  Both use the same two threads.
- `concurrency_speedup`: four identical small trials with the machine's cores shared by
  concurrent trials (1 CPU each) vs one trial at a time (all cores each); trials/hour ratio.
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

ROOT = Path(__file__).resolve().parent.parent


def bench_model() -> dict[str, Any]:
    """A small CNN (no augmentation, so both paths do identical work per epoch)."""
    from model.cnn import CNNConfig
    from model.configs import config_to_dict

    return config_to_dict(
        CNNConfig(
            filters=(32, 64, 128),
            convs_per_block=1,
            batch_norm=True,
            dropout=0.25,
            dense_units=(128,),
            normalization="standardize",
        )
    )


def _plan(name: str, epochs: int) -> dict[str, Any]:
    return {
        "name": name,
        "model": bench_model(),
        "training": {
            "batch_size": 64,
            "micro_batch_size": 64,
            "learning_rate": 0.001,
            "optimizer": "adam",
            "max_epochs": epochs,
            "seed": 2017,
        },
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _search(
    data: str,
    fraction: float,
    epochs: int,
    plans: list[dict[str, Any]],
    cpus_per_trial: float,
    workdir: Path,
    name: str,
) -> tuple[Any, Any]:
    import mlflow
    from mlflow.tracking import MlflowClient

    from jobs.search import run_search
    from jobs.settings import SearchSettings

    uri = f"sqlite:///{workdir}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_EXPERIMENT_NAME"] = name
    # An id in the caller's environment (e.g. under `mlflow run`) takes precedence over the
    # name in run_search: drop it, or this search would log into an experiment of another store.
    for stale in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        os.environ.pop(stale, None)
    mlflow.set_tracking_uri(uri)
    settings = SearchSettings(
        data=data,
        families="cnn",
        num_samples=len(plans),
        max_epochs=epochs,
        grace_epochs=epochs,
        time_budget_min=120,
        data_fraction=fraction,
        storage=str(workdir / "tune"),
        name=name,
        cpus_per_trial=cpus_per_trial,
        register=False,
    )
    result = run_search(settings, plans=plans)
    return result, MlflowClient(uri)


def trial_spans(client: Any, run: Any) -> dict[str, float]:
    """Split a child run's wall time: start-up in the trial, epochs, after the last epoch, rest.

    `setup` is the trial's own `setup_seconds` (TF import, data, model build); `epochs` the
    sum of `epoch_seconds`; `after_last_epoch` the driver's work between the last epoch's
    metrics and the run's end (checkpoint copy, model files, MLflow Keras flavour); `other`
    is what remains (Ray actor start, per-epoch saves and reports).
    """
    run_id = run.info.run_id
    total = (run.info.end_time - run.info.start_time) / 1000
    epochs = client.get_metric_history(run_id, "epoch_seconds")
    setup = client.get_metric_history(run_id, "setup_seconds")
    last_epoch_at = max(m.timestamp for m in epochs)
    spans = {
        "setup": sum(m.value for m in setup),
        "epochs": sum(m.value for m in epochs),
        "after_last_epoch": (run.info.end_time - last_epoch_at) / 1000,
    }
    spans["other"] = total - sum(spans.values())
    return spans


def _plain_fit_seconds(data: str, fraction: float, epochs: int) -> float:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.plain_fit",
            "--data",
            data,
            "--fraction",
            str(fraction),
            "--epochs",
            str(epochs),
            "--threads",
            "2",
            "--model",
            json.dumps(bench_model()),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds_without_data_load"]


def _trial_seconds(
    data: str, fraction: float, epochs: int, repeat: int
) -> tuple[float, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        result, client = _search(
            data,
            fraction,
            epochs,
            [_plan("overhead", epochs)],
            2.0,
            Path(tmp),
            f"overhead-{repeat}",
        )
        child = client.get_run(result.best_run_id)
        return (child.info.end_time - child.info.start_time) / 1000, trial_spans(client, child)


def trial_overhead(data: str, fraction: float, epochs: int, repeats: int) -> dict[str, Any]:
    ratios, ours, plain = [], [], []
    spans: list[dict[str, float]] = []
    for repeat in range(repeats):
        # Alternate which runs first, so a drift in the VM's speed does not favour one side.
        if repeat % 2:
            plain_s = _plain_fit_seconds(data, fraction, epochs)
            trial_s, span = _trial_seconds(data, fraction, epochs, repeat)
        else:
            trial_s, span = _trial_seconds(data, fraction, epochs, repeat)
            plain_s = _plain_fit_seconds(data, fraction, epochs)
        spans.append(span)
        ours.append(trial_s)
        plain.append(plain_s)
        ratios.append(trial_s / plain_s)
    return {
        "trial_overhead_ratio": _summary(ratios),
        "trial_seconds": _summary(ours),
        "plain_fit_seconds": _summary(plain),
        # Medians over the repeats of where the trial's time went (see trial_spans).
        "trial_span_seconds": {
            key: statistics.median(span[key] for span in spans) for key in spans[0]
        },
        "epochs": epochs,
        "data_fraction": fraction,
    }


def concurrency(data: str, fraction: float, epochs: int, trials: int) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    walls = {}
    for label, cpus in (("shared", 1.0), ("serial", float(cores))):
        plans = [_plan(f"c{i}", epochs) for i in range(trials)]
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            _search(data, fraction, epochs, plans, cpus, Path(tmp), f"concurrency-{label}")
            walls[label] = time.perf_counter() - started
    per_hour = {label: trials / wall * 3600 for label, wall in walls.items()}
    return {
        "concurrency_speedup": per_hour["shared"] / per_hour["serial"],
        "trials_per_hour_shared": per_hour["shared"],
        "trials_per_hour_serial": per_hour["serial"],
        "concurrency_trials": trials,
        "concurrency_cores": cores,
    }


def run(
    data: str, fraction: float = 0.1, epochs: int = 3, repeats: int = 1, concurrency_trials: int = 4
) -> dict[str, Any]:
    from jobs.search import init_ray

    init_ray()
    results = trial_overhead(data, fraction, epochs, repeats)
    results.update(concurrency(data, fraction / 2, 2, concurrency_trials))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FER2013_PATH", ""))
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.data:
        parser.error("--data or FER2013_PATH is required")
    results = run(args.data, args.fraction, args.epochs, args.repeats)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
