"""What every phase of a search shares: the typed context, the cluster, and the environment policy.

The driver builds one frozen `SearchContext` after the data, the cluster and the parent run
exist; each phase takes it (and the result of the phase before) and returns a frozen result.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.proposals import Planner
from jobs.search.strategy import Strategy
from jobs.settings import SearchSettings
from schema.cli import tf_log_level

log = logging.getLogger("jobs.search")
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
FINAL_SUFFIX = "-final"
# Tune's cap on trials waiting for resources (read when a Tuner starts; see
# jobs/search/tune_phase.py, trials_in_plan_order).
PENDING_TRIALS_ENV = "TUNE_MAX_PENDING_TRIALS_PG"
_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


# Trial processes: TF's log level (above). No MALLOC_MMAP_THRESHOLD_: a fixed threshold keeps
# resident memory near the live peak but makes every activation an mmap/munmap pair, and CPU
# training took 1.7x as long (BENCHMARKS.md, "Trial overhead").
TRIAL_ENV = {"TF_CPP_MIN_LOG_LEVEL": tf_log_level()}


@dataclass(frozen=True)
class SearchData:
    """The arrays trials train on (through Ray's object store) and what the runs log of them."""

    arrays: dict[str, Any]
    info: dict[str, Any]

    @property
    def train_rows(self) -> int:
        return int(self.info["train_rows"])

    @property
    def val_rows(self) -> int:
        return int(self.info["val_rows"])


@dataclass(frozen=True)
class SearchRun:
    """Where the search writes: the tracking store, its parent run, and Tune's experiment path."""

    tracking_uri: str
    experiment_id: str
    parent_id: str
    tune_path: str
    resumed: bool


@dataclass(frozen=True)
class SearchContext:
    """Everything a phase needs; built once by the driver, read by every phase."""

    settings: SearchSettings  # the effective settings (explore_fraction as the trials see it)
    data: SearchData
    budget: Any  # jobs.resources.WorkerBudget
    planner: Planner
    run: SearchRun
    started: float  # wall time the search started (time.time())
    strategy: Strategy

    @property
    def total_s(self) -> float:
        return self.settings.time_budget_min * 60

    @property
    def final_share(self) -> float:
        return self.strategy.final_share

    @property
    def explore_s(self) -> float:
        return self.total_s * (1 - self.final_share)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def resolve_storage(storage: str) -> str:
    """Tune's storage as an absolute path (or the URI without a trailing slash)."""
    if "://" in storage:
        return storage.rstrip("/")
    path = Path(storage).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    return str(path.resolve())


def init_ray(num_cpus: int | None = None, backend: str = "tensorflow") -> None:
    """Start a local Ray (or join $RAY_ADDRESS's cluster, shipping this checkout); its worker
    processes import Keras on `backend`."""
    import ray

    if ray.is_initialized():
        if backend != "tensorflow":
            log.warning("Ray was started elsewhere: trials use its workers' KERAS_BACKEND")
        return
    trial_env = {**TRIAL_ENV, "KERAS_BACKEND": backend}  # set before a trial imports Keras
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster: ship the code (workers may not have this checkout).
        runtime_env = {
            "working_dir": str(PROJECT_ROOT),
            "excludes": [
                ".venv",
                ".git",
                "/data",  # the data set beside the project, not the model/data package
                "tune_results",
                "mlruns",
                "*.db",
                "bench/results",
                ".stack",
            ],
            "env_vars": trial_env,
        }
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # Ray's notice that a new local cluster uses token authentication is for operators;
        # the search's console is for its progress (the token stays on).
        with _quiet(_RAY_AUTH_LOGGER):
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=True,
                runtime_env={"env_vars": {**trial_env, "PYTHONPATH": str(PROJECT_ROOT)}},
            )


def cluster_cpus() -> float:
    """The CPUs of the running Ray cluster (all nodes; the one place the search asks Ray)."""
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def slots(cpus_per_trial: float) -> int:
    """How many trials run at once on the cluster's CPUs."""
    return max(1, int(cluster_cpus() // max(cpus_per_trial, 1e-9)))


def local_concurrency(cpus_per_trial: float) -> int | None:
    """On a local Ray, no more trials than run at once: Tune asks the searcher for a trial
    only when one can start, so the time check sees the time it will really have (a trial
    proposed while others run can wait long enough to miss its first rung). A cluster
    (RAY_ADDRESS) keeps Tune's default: its autoscaler adds workers for the trials that wait."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    return slots(cpus_per_trial)
