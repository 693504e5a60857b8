"""The trial memory estimate against real trials: our trainable, our placement, our calibration.

One run: the data set (`FER2013_PATH`, every row by default) goes to Ray's object store as the
search sends it; the search's calibration measures the worker (`jobs.timing.calibrate`, two
copies at once, as trials share the cores); then each case is planned and placed by the
search's `Planner` (its estimate: the model's training step plus the calibrated runtime and
the data copies, `jobs.resources.TrialOverhead`) and runs as a Ray Tune trial of
`jobs.trial.train_trial`, two at a time, for `--epochs` epochs. Every measured figure is the
trial's own `peak_memory_mb` (its last result: the peak over the whole trial).

    python -m bench.bench_memory [--json OUT] [--epochs 3] [--data-fraction 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EPOCHS = 3
CONCURRENT = 2
# A quarter of the rows, as the search explores; `rows: 1.0` cases train on every row.
EXPLORE_ROWS = 0.25
_TINY = {"family": "cnn", "filters": [8, 16, 32], "convs_per_block": 1, "dense_units": []}
_RESIDUAL = {
    "family": "cnn",
    "filters": [32, 64, 128],
    "convs_per_block": 2,
    "batch_norm": True,
    "residual": True,
    "head_pooling": "global_avg",
    "dense_units": [128],
    "normalization": "standardize",
    "augmentation": {"flip": True, "crop": 4},
}
_DNN_WIDE = {"family": "dnn", "hidden_units": [2048, 1024], "batch_norm": True}
# name, model ("fast-cnn", "seed2017", "dnn-matched" or a config_to_dict form), training.
DEFAULT_CASES: list[dict[str, Any]] = [
    {"name": "cnn-fast", "model": "fast-cnn", "batch": 64, "optimizer": "adam"},
    {
        "name": "cnn-fast-all-rows",
        "model": "fast-cnn",
        "batch": 64,
        "optimizer": "adam",
        "rows": 1.0,
    },
    {"name": "seed2017", "model": "seed2017", "batch": 64, "optimizer": "adam"},
    {"name": "seed2017-sgd-512", "model": "seed2017", "batch": 512, "optimizer": "sgd"},
    {"name": "dnn-matched", "model": "dnn-matched", "batch": 64, "optimizer": "adam", "rows": 1.0},
    {"name": "dnn-wide-512", "model": _DNN_WIDE, "batch": 512, "optimizer": "adamw"},
    {"name": "cnn-tiny-256", "model": _TINY, "batch": 256, "optimizer": "adamw", "mixup": 0.2},
    {"name": "cnn-residual", "model": _RESIDUAL, "batch": 128, "optimizer": "sgd"},
]


def _model_dict(spec: Any) -> dict[str, Any]:
    from jobs.space import FAST_CNN, matched_dnn
    from model.cnn import SEED2017
    from model.configs import config_to_dict

    named = {"fast-cnn": FAST_CNN, "seed2017": SEED2017, "dnn-matched": matched_dnn()}
    return config_to_dict(named[spec]) if isinstance(spec, str) else dict(spec)


def _plan(case: dict[str, Any], epochs: int) -> Any:
    from jobs.plan import TrainingConfig, TrialPlan

    training = {
        "batch_size": case["batch"],
        "micro_batch_size": case["batch"],
        "optimizer": case["optimizer"],
        "learning_rate": 1e-3,
        "max_epochs": epochs,
        "seed": 2017,
        "train_fraction": case.get("rows", EXPLORE_ROWS),
        "mixup": case.get("mixup", 0.0),
    }
    return TrialPlan(case["name"], _model_dict(case["model"]), TrainingConfig(**training))


def run(
    cases: list[dict[str, Any]] | None = None,
    epochs: int = EPOCHS,
    data: str | None = None,
    data_fraction: float = 1.0,
) -> dict[str, Any]:
    """Calibrate, place and run each case (DEFAULT_CASES if None) as a real trial.

    Returns {"memory_estimate_rows": [...], "memory_estimate_median_abs_err": float, ...}.
    """
    import ray
    from ray import tune

    from jobs.data import prepare_arrays
    from jobs.proposals import Planner
    from jobs.resources import budget_from_nodes
    from jobs.search import init_ray
    from jobs.timing import calibrate
    from jobs.trial import train_trial

    source = data or os.environ.get("FER2013_PATH")
    if not source:
        raise ValueError("data: expected a path (or FER2013_PATH set), found neither")
    cases = DEFAULT_CASES if cases is None else cases
    arrays, info = prepare_arrays(source, data_fraction, 2017)
    init_ray()
    budget = budget_from_nodes(ray.nodes())
    calibration = calibrate({"CPU": 1.0}, copies=CONCURRENT)
    planner = Planner(budget, 1.0, info["train_rows"], info["val_rows"], calibration)
    placed = {case["name"]: planner.place(_plan(case, epochs)) for case in cases}
    print(
        f"calibration: {calibration.reference_images_per_second:.0f} images/s, runtime "
        f"{calibration.runtime_memory_bytes / (1 << 20):.0f} MiB; {len(cases)} trials of "
        f"{epochs} epochs",
        file=sys.stderr,
        flush=True,
    )
    trainable = tune.with_resources(tune.with_parameters(train_trial, data=arrays), {"cpu": 1})
    tuner = tune.Tuner(
        trainable,
        param_space={
            "trial": tune.grid_search([p.tune_config()["trial"] for p in placed.values()])
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=CONCURRENT, reuse_actors=False),
        run_config=tune.RunConfig(
            storage_path=tempfile.mkdtemp(prefix="fer-bench-memory-"), verbose=0
        ),
    )
    rows = []
    for result in tuner.fit():
        name = result.config["trial"]["name"]
        history = result.metrics_dataframe
        if result.error or history is None or "peak_memory_mb" not in history:
            raise RuntimeError(f"case {name}: the trial did not report ({result.error})")
        placement = placed[name].placement
        peaks = [round(float(v), 1) for v in history["peak_memory_mb"]]
        estimate = placement.host_mb
        rows.append(
            {
                "config": name,
                "optimizer": placed[name].plan.training.optimizer,
                "params": placement.param_count,
                "batch": placed[name].plan.training.batch_size,
                "train_fraction": placed[name].plan.training.train_fraction,
                "estimated_mb": round(estimate, 1),
                "measured_mb": peaks[-1],
                "per_epoch_mb": peaks,
                "shared_mb": round(float(history["shared_memory_mb"].iloc[-1]), 1),
                "rel_error": round(estimate / peaks[-1] - 1, 4),
            }
        )
    rows.sort(key=lambda r: [c["name"] for c in cases].index(r["config"]))
    return {
        "memory_estimate_rows": rows,
        "memory_estimate_median_abs_err": statistics.median(abs(r["rel_error"]) for r in rows),
        "memory_runtime_mb": calibration.runtime_memory_bytes / (1 << 20),
        "memory_reference_images_per_second": calibration.reference_images_per_second,
        "memory_epochs": epochs,
    }


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{'config':<18} {'opt':<6} {'params':>10} {'batch':>6} {'rows':>5} {'est MB':>8} "
        f"{'meas MB':>8} {'err':>7}  per epoch"
    )
    lines = [head, "-" * len(head)]
    for r in result["memory_estimate_rows"]:
        lines.append(
            f"{r['config']:<18} {r['optimizer']:<6} {r['params']:>10,} {r['batch']:>6} "
            f"{r['train_fraction']:>5.2f} {r['estimated_mb']:>8.1f} {r['measured_mb']:>8.1f} "
            f"{r['rel_error']:>+7.1%}  {r['per_epoch_mb']}"
        )
    lines.append(f"median |rel err| = {result['memory_estimate_median_abs_err']:.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the result dict here")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--data", help="the data set (default: FER2013_PATH)")
    parser.add_argument("--data-fraction", type=float, default=1.0)
    parser.add_argument("--only", help="comma list of case names")
    args = parser.parse_args(argv)
    cases = DEFAULT_CASES
    if args.only:
        cases = [c for c in DEFAULT_CASES if c["name"] in args.only.split(",")]
    started = time.perf_counter()
    result = run(cases, args.epochs, args.data, args.data_fraction)
    print(format_table(result))
    print(f"bench time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
