"""The search machinery's cost: trial overhead vs plain `model.fit`, and concurrency speed-up.

    python -m bench.bench_search --data $FER2013_PATH --json out.json

- `trial_overhead_ratio`: the same model, data and epochs, run (a) as one trial of our search
  (Ray actor, object-store data, a checkpoint per epoch, MLflow metrics, model logging) timed
  from the child run's start to its end, and (b) as a plain script (`bench/plain_fit.py`):
  interpreter and TensorFlow start, model build, `model.fit`, timed without its data load.
  Paired: both sides run at the same time with one core and one thread each, the cores swapped
  every second (`bench/core_rotation.py`), so both meet the same drifting speeds of this shared
  VM. Our side's core also carries the driver and every Ray process, so their work counts
  against us. The plain script feeds `fit` NumPy arrays, as users write it.
- `same_pipeline_trial_overhead_ratio`: the same, with the plain script feeding `fit` the input
  pipeline our trials use (`model/batches.py`): what our machinery alone costs.
- `concurrency_speedup`: four identical small trials with the machine's cores shared by
  concurrent trials (1 CPU each) vs one trial at a time (all cores each); trials/hour ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from jobs.plan import TrainingConfig, TrialPlan

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


def _plan(name: str, epochs: int) -> TrialPlan:
    training = TrainingConfig(batch_size=64, micro_batch_size=64, max_epochs=epochs, seed=2017)
    return TrialPlan(name, bench_model(), training)


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
    plans: list[TrialPlan],
    cpus_per_trial: float,
    workdir: Path,
    name: str,
) -> tuple[Any, Any]:
    import mlflow
    from mlflow.tracking import MlflowClient

    from jobs.search import Strategy, run_search
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
    result = run_search(settings, Strategy.fixed(plans))
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


def _plain_command(
    data: str, fraction: float, epochs: int, pipeline: str, start_after: Path
) -> list[str]:
    return [
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
        "1",
        "--pipeline",
        pipeline,
        "--model",
        json.dumps(bench_model()),
        "--start-after",
        str(start_after),
    ]


def _child_run_exists(database: Path) -> bool:
    """Whether the search has created its trial's child run (read-only: never creates the DB)."""
    if not database.exists():
        return False
    try:
        connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1)
        try:
            row = connection.execute(
                "SELECT count(*) FROM tags WHERE key = 'mlflow.parentRunId'"
            ).fetchone()
        finally:
            connection.close()
    except sqlite3.Error:
        return False  # tables not created yet, or locked for a moment
    return bool(row and row[0])


def _paired_repeat(
    data: str, fraction: float, epochs: int, repeat: int, pipeline: str
) -> tuple[float, float, dict[str, float]]:
    """One trial and one plain script at the same time, one core each, cores swapped each second.

    The plain script waits until the trial's child run exists, so both clocks start together.
    """
    from bench.core_rotation import CoreRotation, children_by_parent, process_tree

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        go = workdir / "go"
        plain = subprocess.Popen(
            _plain_command(data, fraction, epochs, pipeline, start_after=go),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        driver = os.getpid()

        def plain_side() -> set[int]:
            return process_tree(plain.pid) if plain.poll() is None else set()

        def our_side() -> set[int]:
            # The driver, Ray's daemons and workers: all this process started but the script.
            children = children_by_parent()
            return process_tree(driver, children) - process_tree(plain.pid, children)

        stop = threading.Event()

        def release_plain() -> None:
            while not stop.wait(0.1):
                if _child_run_exists(workdir / "mlflow.db"):
                    go.touch()
                    return

        watcher = threading.Thread(target=release_plain, name="release-plain", daemon=True)
        watcher.start()
        # Alternate which core each side starts on.
        cores = (0, 1) if repeat % 2 == 0 else (1, 0)
        try:
            with CoreRotation(our_side, plain_side, cores=cores) as rotation:
                result, client = _search(
                    data,
                    fraction,
                    epochs,
                    [_plan("overhead", epochs)],
                    1.0,
                    workdir,
                    f"paired-{pipeline}-{repeat}",
                )
                stdout, stderr = plain.communicate(timeout=3600)
        finally:
            stop.set()
            watcher.join()
            if plain.poll() is None:
                plain.kill()
                plain.wait()
        if plain.returncode != 0:
            raise RuntimeError(f"bench.plain_fit failed ({plain.returncode}): {stderr[-2000:]}")
        child = client.get_run(result.best_run_id)
        trial_s = (child.info.end_time - child.info.start_time) / 1000
        ours_cpu, plain_cpu = rotation.cpu_by_name()
        print(f"   CPU seconds, our side: {_top(ours_cpu)}; plain side: {_top(plain_cpu)}")
        plain_s = json.loads(stdout.strip().splitlines()[-1])["seconds_without_data_load"]
        return trial_s, plain_s, trial_spans(client, child)


def _top(cpu: dict[str, float], n: int = 5) -> str:
    ranked = sorted(cpu.items(), key=lambda item: -item[1])[:n]
    return ", ".join(f"{name} {seconds:.1f}" for name, seconds in ranked)


def paired_overhead(
    data: str, fraction: float, epochs: int, repeats: int, pipeline: str = "arrays"
) -> dict[str, Any]:
    """`trial_overhead_ratio` from `repeats` paired runs (see the module docstring); with
    `pipeline="batches"` the keys start with `same_pipeline_`."""
    ratios, ours, plain = [], [], []
    spans: list[dict[str, float]] = []
    for repeat in range(repeats):
        trial_s, plain_s, span = _paired_repeat(data, fraction, epochs, repeat, pipeline)
        print(
            f"   paired ({pipeline}) {repeat + 1}/{repeats}: trial {trial_s:.1f} s, "
            f"plain {plain_s:.1f} s, ratio {trial_s / plain_s:.3f}",
            flush=True,
        )
        spans.append(span)
        ours.append(trial_s)
        plain.append(plain_s)
        ratios.append(trial_s / plain_s)
    prefix = "" if pipeline == "arrays" else "same_pipeline_"
    return {
        f"{prefix}trial_overhead_ratio": _summary(ratios),
        f"{prefix}trial_overhead_ratios": ratios,
        f"{prefix}trial_seconds": _summary(ours),
        f"{prefix}plain_fit_seconds": _summary(plain),
        # Medians over the repeats of where the trial's time went (see trial_spans).
        f"{prefix}trial_span_seconds": {
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
    data: str,
    fraction: float = 0.1,
    epochs: int = 3,
    repeats: int = 1,
    same_pipeline_repeats: int = 0,
    concurrency_trials: int = 4,
) -> dict[str, Any]:
    from jobs.search import init_ray

    init_ray()
    results = paired_overhead(data, fraction, epochs, repeats)
    if same_pipeline_repeats:
        results.update(paired_overhead(data, fraction, epochs, same_pipeline_repeats, "batches"))
    if concurrency_trials:
        results.update(concurrency(data, fraction / 2, 2, concurrency_trials))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FER2013_PATH", ""))
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--same-pipeline-repeats", type=int, default=0)
    parser.add_argument("--concurrency-trials", type=int, default=4, help="0 skips it")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.data:
        parser.error("--data or FER2013_PATH is required")
    results = run(
        args.data,
        args.fraction,
        args.epochs,
        args.repeats,
        args.same_pipeline_repeats,
        args.concurrency_trials,
    )
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
