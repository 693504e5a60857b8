"""One Tune trial: the trainable takes only `config` (data arrives through Ray's object store).

The trial never talks to MLflow: it reports metrics and an epoch checkpoint to Tune, and the
driver's `MLflowTrialLogger` callback is the single writer to the tracking store. That keeps a
SQLite store free of lock contention and lets one place buffer while a server is down.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.training import EpochLoop, TrainData, TrainingConfig
from schema import run as layout
from schema.cli import import_tensorflow

WORKDIR_PREFIX = "fer-trial-"
MIB = 1 << 20


def make_workdir() -> Path:
    """A fresh local directory for this trial's epoch files, named after this process.

    Tune stops a trial (ASHA, time budget, a failure) by killing its process, so the trial's
    own cleanup never runs: the directory of a trial whose process is gone is swept here, by
    the next trial on the node, and by the driver when the search ends.
    """
    sweep_workdirs()
    return Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))


def sweep_workdirs(root: Path | None = None) -> int:
    """Remove trial directories under `root` (the temp dir) whose process has exited."""
    removed = 0
    for path in Path(root or tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*-*"):
        pid = path.name[len(WORKDIR_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _memory_status() -> dict[str, int]:
    """Resident (VmRSS), high-water (VmHWM) and shared-memory (RssShmem) bytes of this process
    (Linux; empty where /proc is missing)."""
    found = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssShmem"):
                    found[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return found


def private_resident_bytes() -> int:
    """This process's resident memory now, less the shared-memory pages it maps (0 where /proc
    is missing): the baseline a trial's memory is measured above."""
    status = _memory_status()
    return max(0, status.get("VmRSS", 0) - status.get("RssShmem", 0))


def peak_private_bytes() -> int:
    """This process's resident high-water mark less the shared-memory pages it maps now."""
    status = _memory_status()
    return max(0, status.get("VmHWM", 0) - status.get("RssShmem", 0))


def measured_memory(baseline: int) -> dict[str, float]:
    """Peak memory of this trial so far, in MiB, above `baseline` (`private_resident_bytes`
    before the data and the model): the resident high-water mark (it only grows) less the
    pages of Ray's object store the trial maps (its rows: shared by every trial on the node
    and accounted by Ray's `object_store_memory`, not by a trial's reservation), as
    `peak_memory_mb`, with those shared pages as `shared_memory_mb`; on a GPU, the backend's
    peak allocation (TensorFlow's allocator, or JAX's peak_bytes_in_use) as
    `gpu_peak_memory_mb`."""
    from model.backend import gpu_memory_info

    shared = _memory_status().get("RssShmem", 0)
    found = {
        "peak_memory_mb": max(0, peak_private_bytes() - baseline) / MIB,
        "shared_memory_mb": shared / MIB,
    }
    gpu = gpu_memory_info()
    if gpu is not None:
        found["gpu_peak_memory_mb"] = gpu["peak"] / MIB
    return found


class SystemSampler:
    """The worker's CPU and memory since the previous sample, from /proc (Linux; empty where it
    is missing), under the names MLflow's system-metrics charts show (`system/...`, as
    `system_...` here: Tune would read a `/` as nesting)."""

    def __init__(self) -> None:
        self.last = self._cpu_times()

    @staticmethod
    def _cpu_times() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as handle:
                fields = [int(v) for v in handle.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    def sample(self) -> dict[str, float]:
        found: dict[str, float] = {}
        now = self._cpu_times()
        if now and self.last and now[0] > self.last[0]:
            total, idle = now[0] - self.last[0], now[1] - self.last[1]
            found["system_cpu_utilization_percentage"] = 100.0 * (1 - idle / total)
        self.last = now
        try:
            with open("/proc/meminfo") as handle:
                info = {line.split(":")[0]: int(line.split()[1]) for line in handle}
            used = (info["MemTotal"] - info["MemAvailable"]) * 1024
            found["system_system_memory_usage_megabytes"] = used / MIB
            found["system_system_memory_usage_percentage"] = (
                100.0 * used / (info["MemTotal"] * 1024)
            )
        except (OSError, KeyError, ValueError, IndexError):
            pass
        from model.backend import gpu_memory_info

        gpu = gpu_memory_info()
        if gpu is not None:
            found["system_gpu_0_memory_usage_megabytes"] = gpu["current"] / MIB
        return found


def configure_tensorflow(cpus: float, gpu_memory_mb: float) -> None:
    """Size TF's thread pools to this trial's CPU share and cap its GPU memory to its estimate.

    Must run before TensorFlow executes its first op in this process.
    """
    import tensorflow as tf

    threads = max(1, int(round(cpus)))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:
        pass  # already initialised (process reused): keep its settings
    gpus = tf.config.list_physical_devices("GPU")
    if gpus and gpu_memory_mb > 0:
        try:
            tf.config.set_logical_device_configuration(
                gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=int(gpu_memory_mb))]
            )
        except RuntimeError:
            pass


def configure_backend(
    cpus: float, gpu_memory_mb: float, gpu_share: float = 0.0, backend: str = ""
) -> str:
    """Set this process's Keras backend up for a trial's share; returns the backend.

    `backend` "" means KERAS_BACKEND (the search sets it in every worker's environment; default
    tensorflow). Must run before Keras is imported. TensorFlow: thread pools and a logical
    device capped at `gpu_memory_mb`. JAX: its GPU allocator capped at `gpu_share` of the card,
    grown on demand, and one intra-op thread on a CPU share of one.
    """
    from model.backend import DEFAULT_BACKEND, require_backend, select_backend

    backend = backend or os.environ.get("KERAS_BACKEND") or DEFAULT_BACKEND
    if backend == "jax":
        select_backend(backend, gpu_share)
        if max(1, int(round(cpus))) == 1 and "intra_op" not in os.environ.get("XLA_FLAGS", ""):
            flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
        return require_backend(backend)
    select_backend(backend)
    import_tensorflow()  # a Ray worker's first import of it: without its load-time noise
    configure_tensorflow(cpus, gpu_memory_mb)
    return require_backend(backend)


def placed_on() -> dict[str, str]:
    """Where Ray runs this trial: its node id and the GPU ids it was given ("" on CPU).

    Reported with every result (the driver tags the child run `fer.node_id`, `fer.gpu_ids`).
    """
    import ray

    context = ray.get_runtime_context()
    gpus = context.get_accelerator_ids().get("GPU", [])
    return {"node_id": context.get_node_id(), "gpu_ids": ",".join(str(g) for g in gpus)}


def _training_config(config: dict[str, Any]) -> TrainingConfig:
    return TrainingConfig(**config["training"])


def plan_of(config: dict[str, Any]) -> dict[str, Any]:
    """The placed trial a Tune config carries (`jobs.plan.PlacedTrial.tune_config`)."""
    return config["trial"]


def warm_start_file(location: str, directory: Path) -> Path | None:
    """The best-epoch model file of the Tune checkpoint at `location` (None without one)."""
    if not location:
        return None
    from ray import tune

    from jobs.training import BEST_MODEL, LAST_MODEL

    local = Path(tune.Checkpoint(location).to_directory(str(directory)))
    best = local / BEST_MODEL
    return best if best.exists() else local / LAST_MODEL


def train_trial(config: dict[str, Any], data: dict[str, Any] | None = None) -> None:
    """Tune trainable: trains the placed trial `plan_of(config)` (see jobs/plan.py)."""
    from ray import tune

    # Ray logs every persisted checkpoint at INFO (two lines per epoch per trial on the
    # console); the trial's own results say what was saved.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    entered = time.perf_counter()
    trial = plan_of(config)
    resources = trial["resources"]
    backend = configure_backend(
        resources.get("CPU", 1.0), trial.get("gpu_memory_limit_mb", 0.0), resources.get("GPU", 0.0)
    )

    import keras

    from model.configs import build_model, config_from_dict
    from model.precision import apply_precision, resolve_precision

    # Before the model exists: its layers take the policy they are built under.
    policy = resolve_precision(trial["training"].get("precision", "auto"))
    apply_precision(policy)

    if data is None:
        raise ValueError("train_trial needs the data through tune.with_parameters(data=...)")
    keras.utils.set_random_seed(int(trial["training"]["seed"]))
    # What this process holds once TF is up, before the data and the model: the trial's own
    # memory is measured above it (peak_memory_mb, next to the estimate it was placed by).
    baseline = private_resident_bytes()
    # Pixels stay uint8 (the model casts on entry): a float32 copy of the training rows was
    # 264 MiB per trial on the full data set, none of it in the trial's memory reservation.
    arrays = TrainData(
        x_train=data["x_train"], y_train=data["y_train"], x_val=data["x_val"], y_val=data["y_val"]
    )
    stats = (data["mean"], data["variance"])
    model_config = config_from_dict(trial["model"])

    workdir = make_workdir()
    checkpoint = tune.get_checkpoint()
    # A restarted trial (its process or the driver was killed) goes on from its last epoch.
    restored = Path(checkpoint.to_directory(str(workdir / "restored"))) if checkpoint else None
    warm = warm_start_file(trial.get("warm_start", ""), workdir / "warm")

    def build() -> Any:
        model = build_model(model_config, stats=stats)
        if warm is not None:
            model.load_weights(warm)  # the explored trial's best epoch; a fresh optimizer
        return model

    loop = EpochLoop(
        build,
        arrays,
        _training_config(trial),
        workdir / "current",
        resume_from=restored,
    )

    where = {**placed_on(), "precision": policy, "backend": backend}
    # Start-up cost of this (re)start: Keras import, data from the object store, model build.
    once: dict[str, Any] = {layout.METRIC_SETUP_SECONDS: time.perf_counter() - entered}

    system = SystemSampler()

    def report(metrics: dict[str, Any], directory: Path) -> None:
        tune.report(
            {**metrics, **where, **once, **measured_memory(baseline), **system.sample()},
            checkpoint=tune.Checkpoint.from_directory(str(directory)),
        )
        once.clear()

    try:
        loop.run(report)
    finally:
        # Each report already copied its checkpoint into Tune's storage.
        shutil.rmtree(workdir, ignore_errors=True)
