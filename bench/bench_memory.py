"""Check `model.memory.estimate_training_memory` against measured peak memory on CPU.

Each case runs in a fresh subprocess (the RSS high-water mark only grows, and TF caches):
import TF, make the batch, build + compile the model, then reset the high-water mark
(`/proc/self/clear_refs` = 5; falls back to the unreset mark) and take the baseline RSS, run
a few `train_on_batch` steps, read VmHWM. measured = VmHWM - baseline + weight bytes: the
weights already sit in the baseline (Keras creates them at build), while the estimate counts
them, so they are added back exactly (sum of variable sizes).

Noise: glibc malloc arenas keep freed blocks, so the mark creeps up from step to step and
repeated runs of one config differ by up to ~40% (e.g. SEED2017 batch 128 sgd: 345-490 MB);
with MALLOC_MMAP_THRESHOLD_=1048576 the same case repeats within 1% at ~225 MB (live peak).
A case may set "env" to try such knobs. The default cases took 7.5 min on the shared 2-core
box at load average ~7 (mostly TF start-up per subprocess); expect about half that when idle.

    python bench/bench_memory.py [--json OUT] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MB = 1 << 20
STEPS = 5  # the estimator's constants were fitted to 5-step peaks
WORKER_TIMEOUT_S = 240

# name, model config (config_to_dict form, or "seed2017"), batch size, optimizer.
_TINY = {"family": "cnn", "filters": [8, 16, 32], "convs_per_block": 1, "dense_units": []}
_BN_AUG = {
    "family": "cnn",
    "filters": [32, 64, 128],
    "batch_norm": True,
    "normalization": "standardize",
    "augmentation": {"flip": True, "shift": 0.1, "rotation": 0.05, "zoom": 0.1},
}
_CNN_10M = {"family": "cnn", "filters": [64, 128, 256, 512], "dense_units": [1024]}
_DNN_3M = {"family": "dnn", "hidden_units": [803, 803, 803]}  # param_matched_dnn(3146503)
_DNN_BN = {"family": "dnn", "hidden_units": [2048, 1024], "batch_norm": True}
# name, model config (config_to_dict form, or "seed2017"), batch size, optimizer.
DEFAULT_CASES: list[dict[str, Any]] = [
    {"name": "cnn-tiny", "model": _TINY, "batch": 32, "optimizer": "adam"},
    {"name": "cnn-tiny", "model": _TINY, "batch": 256, "optimizer": "adam"},
    {"name": "seed2017", "model": "seed2017", "batch": 32, "optimizer": "adam"},
    {"name": "seed2017", "model": "seed2017", "batch": 128, "optimizer": "adam"},
    {"name": "seed2017", "model": "seed2017", "batch": 128, "optimizer": "sgd"},
    {"name": "cnn-bn-aug", "model": _BN_AUG, "batch": 32, "optimizer": "adam"},
    {"name": "cnn-10M", "model": _CNN_10M, "batch": 32, "optimizer": "adam"},
    {"name": "dnn-3M", "model": _DNN_3M, "batch": 32, "optimizer": "adam"},
    {"name": "dnn-3M", "model": _DNN_3M, "batch": 1024, "optimizer": "rmsprop"},
    {"name": "dnn-bn", "model": _DNN_BN, "batch": 256, "optimizer": "adam"},
]


def _config(spec: Any) -> Any:
    from model.cnn import SEED2017
    from model.configs import config_from_dict

    return SEED2017 if spec == "seed2017" else config_from_dict(spec)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _worker(case: dict[str, Any], steps: int) -> dict[str, Any]:
    """Runs inside the fresh subprocess; returns the raw measurement."""
    import gc

    import keras
    import numpy as np
    import tensorflow as tf

    from model.configs import build_model

    keras.utils.set_random_seed(0)
    tf.constant(1.0) + 1.0  # start the TF runtime (thread pools, allocators) before baseline
    batch = int(case["batch"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch, 48, 48, 1), dtype=np.uint8)
    labels = rng.integers(0, 7, size=(batch,), dtype=np.int64)
    config = _config(case["model"])
    stats = (images.mean(0).astype(np.float32), images.var(0).astype(np.float32) + 1.0)
    model = build_model(config, stats)
    model.compile(
        optimizer=case["optimizer"], loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    weight_bytes = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in model.weights)
    gc.collect()
    reset = _reset_peak()
    baseline = _status_kb("VmRSS")
    hwm_before = _status_kb("VmHWM")
    step_peaks = []
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(images, labels)
        step_peaks.append(_status_kb("VmHWM") - baseline)
    return {
        "params": int(model.count_params()),
        "weight_bytes": weight_bytes,
        "baseline_rss": baseline,
        "hwm_reset": reset,
        "hwm_before": hwm_before,
        "peak_above_baseline": step_peaks[-1],
        "step_peaks": step_peaks,
        "measured_bytes": step_peaks[-1] + weight_bytes,
        "train_seconds": time.perf_counter() - started,
    }


def measure(case: dict[str, Any], steps: int = STEPS) -> dict[str, Any]:
    """Run one case in a fresh subprocess and return its raw measurement."""
    # A case may carry extra environment (e.g. MALLOC_* knobs) for experiments.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT), **case.get("env", {}))
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            json.dumps(case),
            "--steps",
            str(steps),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=WORKER_TIMEOUT_S,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"case {case['name']}: worker failed rc={proc.returncode}\n{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def run(configs: list[dict[str, Any]] | None = None, steps: int = STEPS) -> dict[str, Any]:
    """Measure each case (DEFAULT_CASES if None) in a fresh subprocess, compare to the estimate.

    Returns {"memory_estimate_rows": [...], "memory_estimate_median_abs_err": float}.
    """
    from model.configs import build_model
    from model.memory import estimate_training_memory

    cases = DEFAULT_CASES if configs is None else configs
    rows = []
    for case in cases:
        started = time.perf_counter()
        raw = measure(case, steps)
        model = build_model(_config(case["model"]), _dummy_stats())
        estimate = estimate_training_memory(model, int(case["batch"]), case["optimizer"])
        measured = raw["measured_bytes"]
        rows.append(
            {
                "config": case["name"],
                "model": case["model"],
                "optimizer": case["optimizer"],
                "params": raw["params"],
                "batch": int(case["batch"]),
                "estimated_mb": round(estimate / MB, 1),
                "measured_mb": round(measured / MB, 1),
                "rel_error": round((estimate - measured) / measured, 4),
                "raw": raw,
            }
        )
        row = rows[-1]
        print(
            f"[{len(rows)}/{len(cases)}] {row['config']} batch {row['batch']} "
            f"{row['optimizer']}: est {row['estimated_mb']} MB, meas {row['measured_mb']} MB "
            f"({time.perf_counter() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    median = statistics.median(abs(r["rel_error"]) for r in rows)
    return {"memory_estimate_rows": rows, "memory_estimate_median_abs_err": median}


def _dummy_stats() -> Any:
    import numpy as np

    return np.zeros((48, 48, 1), np.float32), np.ones((48, 48, 1), np.float32)


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{'config':<12} {'opt':<8} {'params':>10} {'batch':>6} {'est MB':>9} "
        f"{'meas MB':>9} {'rel err':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in result["memory_estimate_rows"]:
        lines.append(
            f"{r['config']:<12} {r['optimizer']:<8} {r['params']:>10,} {r['batch']:>6} "
            f"{r['estimated_mb']:>9.1f} {r['measured_mb']:>9.1f} "
            f"{r['rel_error']:>+8.1%}"
        )
    lines.append(f"median |rel err| = {result['memory_estimate_median_abs_err']:.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the result dict here")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(_worker(json.loads(args.worker), args.steps)), flush=True)
        return 0
    started = time.perf_counter()
    result = run(steps=args.steps)
    print(format_table(result))
    print(f"bench time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
