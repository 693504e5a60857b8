"""The GPU half of the product, checked in one command (< 8 minutes on one GPU).

    python -m bench.gpu_check [--json bench/results/gpu.json] [--data $FER2013_PATH]

On a GPU it measures, and writes to the JSON:
1. packing: four small trials of a real search (`run_search`, fixed plans) on the one card,
   each with a fractional GPU and `gpu_memory_mb`, each capped by its logical-device memory
   limit; every trial's `gpu_peak_memory_mb` (TensorFlow's allocator peak, read in the trial)
   against its cap, and whether two trials held the card at once;
2. the memory estimate against the measured GPU peak over 8 configs (CNN and DNN, small and
   large batch, float32 and mixed), each in a fresh process: median absolute error;
3. images/s of cnn-fast and SEED2017 through our trial's epoch loop vs plain Keras
   `model.fit`, float32 vs mixed precision.
Without a GPU it says so, names what it skipped and writes the JSON (a test runs it so).

    python -m bench.gpu_check --backend jax [--dry-run] [--json $OUT/gpu.json]

runs the check on Keras's JAX backend instead (bench/gpu_jax.py): no Ray, MLflow or TensorFlow,
for the lent GPU machine (bench/device/gpu_check.sh); `--dry-run` runs it on the CPU.
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
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GPU_PARTS = ("packed_trials", "estimate_vs_gpu_peak", "mixed_precision_throughput")
# name, model (config_to_dict form or a preset name), batch, optimizer, precision
MEMORY_CASES: list[tuple[str, Any, int, str, str]] = [
    ("cnn-fast", "cnn-fast", 64, "adam", "float32"),
    ("cnn-fast", "cnn-fast", 512, "adam", "float32"),
    ("cnn-fast", "cnn-fast", 512, "adam", "mixed_bfloat16"),
    ("seed2017", "seed2017", 64, "sgd", "float32"),
    ("seed2017", "seed2017", 256, "sgd", "mixed_bfloat16"),
    ("dnn-matched", "dnn-matched", 64, "adam", "float32"),
    ("dnn-matched", "dnn-matched", 1024, "adam", "mixed_bfloat16"),
    ("dnn-matched", "dnn-matched", 1024, "rmsprop", "float32"),
]
THROUGHPUT_IMAGES = 8192
STEPS = 5


def _model_config(name: str) -> Any:
    from jobs.space import FAST_CNN, matched_dnn
    from model.cnn import SEED2017

    return {"cnn-fast": FAST_CNN, "seed2017": SEED2017, "dnn-matched": matched_dnn()}[name]


def _random_data(rows: int) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (rows, 48, 48, 1), dtype=np.uint8), rng.integers(0, 7, rows)


def gpu_memory_case(name: str, batch: int, optimizer: str, precision: str) -> dict[str, Any]:
    """In a fresh process: train STEPS steps, read TensorFlow's GPU allocator peak."""
    import tensorflow as tf

    from model.configs import build_model
    from model.memory import estimate_training_memory
    from model.optimizers import build_optimizer
    from model.precision import apply_precision

    apply_precision(precision)
    x, y = _random_data(batch)
    model = build_model(_model_config(name), stats=_stats())
    model.compile(
        optimizer=build_optimizer(optimizer, 1e-3), loss="sparse_categorical_crossentropy"
    )
    tf.config.experimental.reset_memory_stats("GPU:0")
    for _ in range(STEPS):
        model.train_on_batch(x, y)
    peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
    compute = "float32" if precision == "float32" else "bfloat16"
    estimate = estimate_training_memory(model, batch, optimizer, compute_dtype=compute)
    return {"measured_mb": peak / 2**20, "estimated_mb": estimate / 2**20}


def throughput_case(name: str, precision: str, path: str) -> dict[str, Any]:
    """In a fresh process: images/s of one epoch through our loop, and through plain fit."""
    import keras

    from jobs.training import EpochLoop, TrainData, TrainingConfig
    from model.configs import build_model
    from model.precision import apply_precision

    apply_precision(precision)
    x, y = _random_data(THROUGHPUT_IMAGES)
    data = TrainData(x, y, x[:1024], y[:1024])
    config = TrainingConfig(batch_size=64, micro_batch_size=64, max_epochs=2)
    seconds = []
    loop = EpochLoop(
        lambda: build_model(_model_config(name), stats=_stats()), data, config, Path(path)
    )
    loop.run(lambda metrics, _: seconds.append(metrics["images_per_second"]))
    plain = build_model(_model_config(name), stats=_stats())
    plain.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    plain.fit(x, y, batch_size=64, epochs=1, verbose=0)  # warm-up: traces the train function
    started = time.perf_counter()
    plain.fit(x, y, batch_size=64, epochs=1, verbose=0, validation_data=(x[:1024], y[:1024]))
    keras.backend.clear_session()
    return {
        "ours_images_per_second": seconds[-1],
        "plain_images_per_second": len(x) / (time.perf_counter() - started),
    }


def _stats() -> Any:
    import numpy as np

    from model.preprocessing import pixel_statistics

    return pixel_statistics(np.zeros((2, 48, 48, 1), dtype=np.uint8))


def _in_subprocess(function: str, *args: Any) -> dict[str, Any]:
    code = (
        "import json, sys; from bench.gpu_check import " + function + " as f; "
        "print('RESULT ' + json.dumps(f(*json.loads(sys.argv[1]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(list(args))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{function}{args} failed ({done.returncode}): {done.stderr[-2000:]}")


def packed_trials(data: str, card_mb: int, workdir: Path) -> dict[str, Any]:
    """Four small trials of a real search packed on one card, each within its cap."""
    import mlflow
    import ray

    from jobs.resources import GPU_MEMORY_RESOURCE
    from jobs.search import TRIAL_ENV, Strategy, run_search
    from jobs.settings import SearchSettings
    from jobs.space import fixed_points
    from schema.run import RESULT_TAG_PREFIX

    ray.init(
        num_gpus=1,
        resources={GPU_MEMORY_RESOURCE: card_mb},
        include_dashboard=False,
        runtime_env={"env_vars": {**TRIAL_ENV, "PYTHONPATH": str(ROOT)}},
    )
    uri = f"sqlite:///{workdir}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    base = fixed_points(("cnn", "dnn"), 2, 0)[:2]
    plans = [replace(plan, name=f"{plan.name}-{i}") for i in range(2) for plan in base]
    settings = SearchSettings(
        data=data,
        max_epochs=2,
        data_fraction=0.2,
        time_budget_min=6,
        register=False,
        storage=str(workdir / "tune"),
        name="gpu-check",
        cpus_per_trial=2,
    )
    result = run_search(settings, Strategy.fixed(plans))
    client = mlflow.tracking.MlflowClient(uri)
    space = json.loads(
        mlflow.artifacts.load_text(f"runs:/{result.parent_run_id}/search/space.json")
    )
    placements = {e["plan"]["name"]: e["placement"] for e in space["plans"]}
    rows = []
    for run in client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
    ):
        placement = placements[run.info.run_name]
        rows.append(
            {
                "name": run.info.run_name,
                "gpu_share": placement["resources"].get("GPU"),
                "estimated_mb": placement["estimated_mb"],
                "cap_mb": placement["gpu_memory_limit_mb"],
                "gpu_peak_memory_mb": run.data.metrics.get("gpu_peak_memory_mb"),
                "gpu_ids": run.data.tags.get(RESULT_TAG_PREFIX + "gpu_ids"),
                "start": run.info.start_time,
                "end": run.info.end_time,
            }
        )
    overlap = any(
        a["start"] < b["end"] and b["start"] < a["end"]
        for a in rows
        for b in rows
        if a is not b and a["end"] and b["end"]
    )
    within = all(
        r["gpu_peak_memory_mb"] is not None and r["gpu_peak_memory_mb"] <= r["cap_mb"] for r in rows
    )
    ray.shutdown()
    return {"trials": rows, "two_at_once": overlap, "all_within_cap": within}


def run(data: str | None) -> dict[str, Any]:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    found: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "tensorflow": tf.__version__,
        "gpus": [gpu.name for gpu in gpus],
    }
    if not gpus:
        found["skipped"] = {part: "TensorFlow sees no GPU on this machine" for part in GPU_PARTS}
        print("gpu_check: no GPU visible to TensorFlow; skipped " + ", ".join(GPU_PARTS))
        return found
    from model.precision import resolve_precision

    found["auto_precision"] = resolve_precision("auto")
    memory = []
    for name, model, batch, optimizer, precision in MEMORY_CASES:
        row = _in_subprocess("gpu_memory_case", model, batch, optimizer, precision)
        row |= {"config": name, "batch": batch, "optimizer": optimizer, "precision": precision}
        row["error"] = row["estimated_mb"] / row["measured_mb"] - 1
        memory.append(row)
        print(f"memory {name} b{batch} {precision}: {row}", flush=True)
    found["estimate_vs_gpu_peak"] = memory
    found["gpu_memory_estimate_median_abs_err"] = statistics.median(abs(r["error"]) for r in memory)
    speed = {}
    for name in ("cnn-fast", "seed2017"):
        for precision in ("float32", found["auto_precision"]):
            with tempfile.TemporaryDirectory() as tmp:
                speed[f"{name}/{precision}"] = _in_subprocess(
                    "throughput_case", name, precision, tmp
                )
    found["throughput"] = speed
    seed_mixed = speed[f"seed2017/{found['auto_precision']}"]["ours_images_per_second"]
    found["seed2017_mixed_over_float32"] = (
        seed_mixed / speed["seed2017/float32"]["ours_images_per_second"]
    )
    if data:
        card_mb = int(
            subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[0]
        )
        with tempfile.TemporaryDirectory() as tmp:
            found["packed_trials"] = packed_trials(data, card_mb, Path(tmp))
    else:
        found["skipped"] = {"packed_trials": "no --data (or FER2013_PATH) to search on"}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    parser.add_argument("--data", default=os.environ.get("FER2013_PATH", ""))
    parser.add_argument("--backend", choices=("tensorflow", "jax"), default="tensorflow")
    parser.add_argument("--dry-run", action="store_true", help="jax: on the CPU, tiny sizes")
    parser.add_argument("--budget-s", type=float, default=420.0, help="jax: no case starts later")
    args = parser.parse_args(argv)
    if args.backend == "jax":
        from bench.gpu_jax import run as run_jax

        found = run_jax(args.json, args.dry_run, args.budget_s)
        print(json.dumps(found, indent=2))
        return 1 if found["failed_cases"] else 0
    found = run(args.data or None)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(found, indent=2))
    print(json.dumps(found, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
