"""The GPU check on Keras's JAX backend, without Ray, MLflow or TensorFlow (the lent GPU machine
has none of them): `python -m bench.gpu_check --backend jax`, or bench/device/gpu_check.sh.

Each case runs in a fresh process (KERAS_BACKEND=jax, XLA_PYTHON_CLIENT_PREALLOCATE=false, so
JAX takes memory as it needs it and its peak is the case's own):
1. `memory`: the estimate (model/memory.py) against JAX's measured GPU peak (memory_stats()
   peak_bytes_in_use) over CNN and DNN configs, batch 64 and 512, float32 and mixed_bfloat16;
2. `throughput`: images/s of cnn-fast and SEED2017 through our epoch loop, float32 vs
   mixed_bfloat16, from the last epoch (the first one compiles), with whether TF32 was on;
3. `oom`: a trial whose cap (XLA_PYTHON_CLIENT_MEM_FRACTION) is below its estimate, to show the
   out-of-memory fallback (halved micro-batch) on a real card.
`dry_run`: JAX on the CPU, tiny sizes, a few cases, and an injected out-of-memory error in place
of the cap (a CPU has none): the same code, quick enough for the test suite.
The JSON is rewritten after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

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
MIB = 1 << 20
# name, batch, optimizer, precision
MEMORY_CASES: list[tuple[str, int, str, str]] = [
    ("cnn-fast", 64, "adam", "float32"),
    ("cnn-fast", 512, "adam", "float32"),
    ("cnn-fast", 512, "adam", "mixed_bfloat16"),
    ("seed2017", 64, "sgd", "float32"),
    ("seed2017", 512, "sgd", "mixed_bfloat16"),
    ("dnn-matched", 64, "adam", "float32"),
    ("dnn-matched", 512, "adam", "mixed_bfloat16"),
    ("dnn-matched", 512, "rmsprop", "float32"),
]
# The dry run: the same cases on models small enough to compile in seconds on a CPU.
DRY_MEMORY_CASES = [("tiny-cnn", 8, "adam", "float32"), ("tiny-dnn", 8, "adam", "float32")]
THROUGHPUT_MODELS = {False: ("cnn-fast", "seed2017"), True: ("tiny-cnn",)}
PRECISIONS = ("float32", "mixed_bfloat16")
STEPS = 5
# (images, epochs) of a throughput case, on a GPU and in the dry run.
THROUGHPUT_SIZE = {False: (8192, 3), True: (64, 2)}
# The capped case: SEED2017 at this batch, capped at this share of the smaller of its estimate
# and its measured uncapped peak (so it runs out of memory even where the estimate is high).
OOM_MODEL, OOM_BATCH, OOM_CAP = "seed2017", 1024, 0.6
DRY_OOM_MODEL, DRY_OOM_BATCH = "tiny-cnn", 16
CASE_TIMEOUT_S = 240
# A case may run this long past the budget (no case starts after it).
OVERRUN_S = 45


def _model_config(name: str) -> Any:
    from jobs.space import FAST_CNN, matched_dnn
    from model.cnn import SEED2017, CNNConfig
    from model.dnn import DNNConfig

    if name == "tiny-cnn":
        return CNNConfig(filters=(4, 8), convs_per_block=1, dense_units=(8,))
    if name == "tiny-dnn":
        return DNNConfig(hidden_units=(16,))
    return {"cnn-fast": FAST_CNN, "seed2017": SEED2017, "dnn-matched": matched_dnn()}[name]


def _random_data(rows: int) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (rows, 48, 48, 1), dtype=np.uint8), rng.integers(0, 7, rows)


def _build(name: str) -> Any:
    import numpy as np

    from model.configs import build_model
    from model.preprocessing import pixel_statistics

    return build_model(
        _model_config(name), stats=pixel_statistics(np.zeros((2, 48, 48, 1), np.uint8))
    )


def _estimate_mb(model: Any, batch: int, optimizer: str, precision: str) -> float:
    from model.memory import estimate_training_memory

    compute = "float32" if precision == "float32" else "bfloat16"
    return estimate_training_memory(model, batch, optimizer, compute_dtype=compute) / MIB


def device_facts() -> dict[str, Any]:
    """Versions, devices, the precision `auto` resolves to, and whether float32 matrix work
    may run as TF32 (JAX's default matmul precision on a GPU of compute capability >= 8.0)."""
    import jax
    import keras

    from model.backend import compute_capability, gpu_devices
    from model.precision import resolve_precision

    gpus = gpu_devices()
    capability = compute_capability(gpus[0]) if gpus else None
    setting = jax.config.jax_default_matmul_precision
    return {
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "gpus": [getattr(d, "device_kind", str(d)) for d in gpus],
        "compute_capability": list(capability) if capability else None,
        "auto_precision": resolve_precision("auto"),
        "matmul_precision": str(setting),
        "tf32": bool(
            capability
            and capability >= (8, 0)
            and setting in (None, "default", "tensorfloat32", "bfloat16")
        ),
    }


def memory_case(name: str, batch: int, optimizer: str, precision: str) -> dict[str, Any]:
    """Train STEPS steps at `batch`; JAX's peak bytes in use (None on a CPU) vs the estimate."""
    from model.backend import gpu_memory_info
    from model.optimizers import build_optimizer
    from model.precision import apply_precision

    apply_precision(precision)
    x, y = _random_data(batch)
    model = _build(name)
    model.compile(
        optimizer=build_optimizer(optimizer, 1e-3), loss="sparse_categorical_crossentropy"
    )
    for _ in range(STEPS):
        model.train_on_batch(x, y)
    gpu = gpu_memory_info()
    return {
        "measured_mb": gpu["peak"] / MIB if gpu else None,
        "estimated_mb": _estimate_mb(model, batch, optimizer, precision),
    }


def throughput_case(name: str, precision: str, images: int, epochs: int) -> dict[str, Any]:
    """images/s of each epoch of `name` through our epoch loop at batch 64."""
    from jobs.training import EpochLoop, TrainData, TrainingConfig
    from model.precision import apply_precision

    apply_precision(precision)
    x, y = _random_data(images)
    val = max(1, images // 8)
    data = TrainData(x, y, x[:val], y[:val])
    config = TrainingConfig(batch_size=64, micro_batch_size=64, max_epochs=epochs)
    rates: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        loop = EpochLoop(lambda: _build(name), data, config, Path(tmp))
        loop.run(lambda metrics, _: rates.append(metrics["images_per_second"]))
    return {"images_per_second": rates[-1], "by_epoch": rates}


def oom_case(name: str, batch: int, inject: bool) -> dict[str, Any]:
    """Two epochs of `name` at `batch` under the cap the parent set (or, with `inject`, an
    out-of-memory error raised while the micro-batch is still `batch`): what the loop did."""
    from jobs.training import EpochLoop, TrainData, TrainingConfig
    from model.backend import gpu_memory_info

    x, y = _random_data(2 * batch)
    data = TrainData(x, y, x[:batch], y[:batch])
    config = TrainingConfig(batch_size=batch, micro_batch_size=batch, max_epochs=2)
    reported: list[dict[str, Any]] = []
    loop_class = _injecting_loop(batch) if inject else EpochLoop
    with tempfile.TemporaryDirectory() as tmp:
        loop = loop_class(lambda: _build(name), data, config, Path(tmp))
        try:
            state = loop.run(lambda metrics, _: reported.append(metrics))
            gave_up = None
        except RuntimeError as failed:  # could not halve far enough
            state, gave_up = loop.state, str(failed)[:500]
    gpu = gpu_memory_info()
    return {
        "injected": inject,
        "epochs": [m["epoch"] for m in reported],
        "micro_batch_sizes": [m["micro_batch_size"] for m in reported],
        "oom_retries": state.oom_retries,
        "gpu_peak_mb": gpu["peak"] / MIB if gpu else None,
        "gpu_limit_mb": gpu["limit"] / MIB if gpu and "limit" in gpu else None,
        "gave_up": gave_up,
    }


def _injecting_loop(batch: int) -> type:
    """The epoch loop raising JAX's out-of-memory error while the micro-batch is `batch`."""
    import jax

    from jobs.training import EpochLoop

    class Injecting(EpochLoop):
        def _one_epoch(self, epoch: int) -> Any:
            if self.state.micro_batch_size >= batch:
                raise jax.errors.JaxRuntimeError(
                    f"RESOURCE_EXHAUSTED: Out of memory (injected at micro-batch {batch})"
                )
            return super()._one_epoch(epoch)

    return Injecting


def _case_env(dry_run: bool, mem_fraction: float = 0.0) -> dict[str, str]:
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    if mem_fraction > 0:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{mem_fraction:.6f}"
    if dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    return env


def in_fresh_process(
    function: str, args: list[Any], env: dict[str, str], timeout_s: float = CASE_TIMEOUT_S
) -> dict[str, Any]:
    """`function(*args)` of this module in a new Python; its result, or {"error": ...}."""
    code = (
        "import json, sys; from bench.gpu_jax import " + function + " as f; "
        "print('RESULT ' + json.dumps(f(*json.loads(sys.argv[1]))))"
    )
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, json.dumps(args)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT ") :]), "seconds": time.perf_counter() - started}
    return {"error": f"exit {done.returncode}: {done.stderr[-1500:]}"}


def card_mb() -> float:
    """The first GPU's memory from nvidia-smi (before JAX starts: its cap is set from it)."""
    done = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.split()[0])


class Check:
    """The cases, in order, each result saved to `json_path` as it comes."""

    def __init__(self, json_path: Path, dry_run: bool, budget_s: float) -> None:
        self.json_path = json_path
        self.dry_run = dry_run
        self.deadline = time.monotonic() + budget_s
        self.found: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "mode": "jax-dry-run-cpu" if dry_run else "jax-gpu",
            "skipped": {},
            "failed_cases": [],
        }

    def save(self) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(self.found, indent=2))

    def case(self, label: str, function: str, args: list[Any], fraction: float = 0.0) -> Any:
        if time.monotonic() > self.deadline:
            self.found["skipped"][label] = "out of time"
            return None
        left = self.deadline + OVERRUN_S - time.monotonic()
        row = in_fresh_process(
            function, args, _case_env(self.dry_run, fraction), min(CASE_TIMEOUT_S, left)
        )
        if row.get("error") or row.get("gave_up"):
            self.found["failed_cases"].append(label)
        print(f"{label}: {json.dumps(row)[:400]}", flush=True)
        return row

    def run(self) -> dict[str, Any]:
        facts = self.case("facts", "device_facts", [])
        self.found["facts"] = facts
        self.save()
        on_gpu = bool(facts and facts.get("gpus"))
        if facts is None or facts.get("error"):
            self.found["skipped"]["all"] = "the facts case failed: Keras on JAX did not start"
            self.save()
            return self.found
        if not on_gpu and not self.dry_run:
            self.found["skipped"]["all"] = "JAX sees no GPU on this machine"
            self.save()
            return self.found
        # The one capped trial first: the fallback is what most needs a real card.
        self._oom(on_gpu)
        self._memory()
        self._throughput(facts.get("tf32") if facts else None)
        return self.found

    def _memory(self) -> None:
        rows = []
        for name, batch, optimizer, precision in DRY_MEMORY_CASES if self.dry_run else MEMORY_CASES:
            label = f"memory {name} b{batch} {optimizer} {precision}"
            row = self.case(label, "memory_case", [name, batch, optimizer, precision])
            if row is None:
                continue
            row |= {"config": name, "batch": batch, "optimizer": optimizer, "precision": precision}
            if row.get("measured_mb"):
                row["relative_error"] = row["estimated_mb"] / row["measured_mb"] - 1
            rows.append(row)
            self.found["estimate_vs_gpu_peak"] = rows
            self.save()
        errors = [abs(r["relative_error"]) for r in rows if "relative_error" in r]
        self.found["gpu_memory_estimate_median_abs_err"] = (
            statistics.median(errors) if errors else None
        )
        self.save()

    def _throughput(self, tf32: Any) -> None:
        images, epochs = THROUGHPUT_SIZE[self.dry_run]
        models = THROUGHPUT_MODELS[self.dry_run]
        speed: dict[str, Any] = {"tf32": tf32, "images": images, "epochs": epochs}
        for name in models:
            for precision in PRECISIONS:
                row = self.case(
                    f"throughput {name} {precision}",
                    "throughput_case",
                    [name, precision, images, epochs],
                )
                if row is not None:
                    speed[f"{name}/{precision}"] = row
                    self.found["throughput"] = speed
                    self.save()
        for name in models:
            f32, mixed = speed.get(f"{name}/float32", {}), speed.get(f"{name}/mixed_bfloat16", {})
            if f32.get("images_per_second") and mixed.get("images_per_second"):
                speed[f"{name}/mixed_over_float32"] = (
                    mixed["images_per_second"] / f32["images_per_second"]
                )
        self.save()

    def _oom(self, on_gpu: bool) -> None:
        if not on_gpu:  # the dry run: no cap on a CPU, an injected error instead
            row = self.case("oom injected", "oom_case", [DRY_OOM_MODEL, DRY_OOM_BATCH, True])
            if row is not None:
                self.found["oom_fallback"] = row
            self.save()
            return
        # Uncapped first: the cap is below both the estimate and what the step really takes.
        uncapped = self.case(
            "oom uncapped", "memory_case", [OOM_MODEL, OOM_BATCH, "adam", "float32"]
        )
        if not uncapped or not uncapped.get("measured_mb"):
            self.found["skipped"]["oom_fallback"] = f"no uncapped peak: {uncapped}"
            self.save()
            return
        cap_mb = OOM_CAP * min(uncapped["estimated_mb"], uncapped["measured_mb"])
        try:
            fraction = cap_mb / card_mb()
        except (OSError, subprocess.CalledProcessError, ValueError, IndexError) as error:
            self.found["skipped"]["oom_fallback"] = f"no card size from nvidia-smi: {error}"
            self.save()
            return
        row = self.case("oom capped", "oom_case", [OOM_MODEL, OOM_BATCH, False], fraction)
        if row is not None:
            row |= {
                "estimated_mb": uncapped["estimated_mb"],
                "uncapped_peak_mb": uncapped["measured_mb"],
                "cap_mb": cap_mb,
                "mem_fraction": fraction,
            }
            self.found["oom_fallback"] = row
        self.save()


def run(json_path: Path, dry_run: bool, budget_s: float) -> dict[str, Any]:
    check = Check(json_path, dry_run, budget_s)
    found = check.run()
    check.save()
    return found
