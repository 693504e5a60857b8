"""Propose trials and place them before Ray sees them: the searcher side of the search.

`PlacingSearcher` is a Ray Tune `Searcher` that hands Tune one trial at a time: first the
fixed points, then what a model-based searcher (Ray Tune's `OptunaSearch`, TPE) proposes from
the results so far. Every proposal is built, its memory estimated and placed (fits / smaller
micro-batch with accumulation / refused) and its epoch time estimated *before* it is returned
to Tune. A proposal that fits no worker, or cannot reach the scheduler's first rung in the
time left, is never started: it is logged as a child run (`does_not_fit` / `over_budget`) and
reported back to the model-based searcher, which then proposes again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ray.tune.search import Searcher

from schema import run as layout

log = logging.getLogger(__name__)

EXPLORE = "explore"
FINAL = "final"
DOES_NOT_FIT = "does_not_fit"
OVER_BUDGET = "over_budget"
# A trial's start-up before its first epoch (Ray actor, TF import, data, model build): about
# 8 s on a laptop core (BENCHMARKS.md, "trial overhead"); kept generous.
SETUP_SECONDS = 20.0
# Proposals refused one after another before the searcher gives up (the time left is then
# too short for anything it proposes, or the space does not fit the workers).
MAX_REFUSALS_IN_A_ROW = 8
# What a refused-for-memory proposal scores for the model-based searcher: the worst accuracy.
REFUSED_SCORE = 0.0


@dataclass(frozen=True)
class TrialPlan:
    """One trial as planned: the model and training configs (plain JSON dicts, as logged)."""

    name: str
    model: dict[str, Any]
    training: dict[str, Any]
    phase: str = EXPLORE
    # A final trial starts from the weights of the explored trial it continues (a Tune
    # checkpoint's path or URI), named in `warm_start_from`.
    warm_start: str = ""
    warm_start_from: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "training": self.training}


@dataclass(frozen=True)
class PlacedTrial:
    """A plan with its placement (see jobs/resources.py) and time estimate."""

    plan: TrialPlan
    placement: dict[str, Any]
    estimated_epoch_seconds: float
    refusal: str = ""  # "", DOES_NOT_FIT or OVER_BUDGET
    reason: str = ""

    def tune_config(self) -> dict[str, Any]:
        """What Tune's trial config holds: everything the trial and the logger need."""
        trial = {
            **self.plan.to_dict(),
            "phase": self.plan.phase,
            "warm_start": self.plan.warm_start,
            "warm_start_from": self.plan.warm_start_from,
            "resources": self.placement["resources"],
            "label_selector": self.placement["label_selector"],
            "gpu_memory_limit_mb": self.placement["gpu_memory_limit_mb"],
            "placement": self.placement,
            "estimated_epoch_seconds": self.estimated_epoch_seconds,
        }
        return {"plan": self.plan.name, "trial": trial}


@dataclass
class Planner:
    """Builds a plan's model once to estimate its memory (placement) and epoch time."""

    budget: Any  # jobs.resources.WorkerBudget
    cpus_per_trial: float
    train_rows: int
    val_rows: int
    calibration: Any = None  # jobs.timing.Calibration; None: no time estimate

    @property
    def overhead(self) -> Any:
        """What a trial holds besides its model's step (jobs.resources.TrialOverhead): the
        calibration's measurement, or the default where there was none."""
        from jobs.resources import TrialOverhead

        if self.calibration is not None and self.calibration.runtime_memory_bytes > 0:
            return TrialOverhead(self.calibration.runtime_memory_bytes, "calibration")
        return TrialOverhead()

    def compute_dtype(self, precision: str) -> str:
        """The activations' dtype a trial of `precision` will use on this budget's workers
        ("auto" is mixed on GPU workers, float32 on CPU ones; see model/precision.py)."""
        from model.precision import check_precision

        if check_precision(precision) == "float32":
            return "float32"
        if precision == "auto" and self.budget.kind != "gpu":
            return "float32"
        return "float16" if precision == "mixed_float16" else "bfloat16"

    def place(self, plan: TrialPlan) -> PlacedTrial:
        import keras
        import numpy as np

        from jobs.resources import place
        from jobs.timing import estimate_epoch_seconds
        from model.configs import build_model, config_from_dict
        from model.preprocessing import pixel_statistics

        dummy_stats = pixel_statistics(np.zeros((2, 48, 48, 1), dtype=np.uint8))
        model = build_model(config_from_dict(plan.model), stats=dummy_stats)
        training = plan.training
        fraction = float(training.get("train_fraction", 1.0))
        rows = max(1, round(self.train_rows * fraction))
        placement = place(
            model,
            training["batch_size"],
            training["optimizer"],
            self.budget,
            self.cpus_per_trial,
            compute_dtype=self.compute_dtype(training.get("precision", "auto")),
            host_overhead_bytes=self.overhead.host_bytes(rows, self.val_rows, fraction),
        )
        training = {**training, "micro_batch_size": placement.micro_batch_size}
        seconds = (
            estimate_epoch_seconds(
                model, rows, self.val_rows, placement.micro_batch_size, self.calibration
            )
            if self.calibration is not None
            else 0.0
        )
        summary = {
            "status": placement.status,
            # What counts against the worker budget (the whole trial on a CPU worker, the card's
            # share on a GPU worker: against gpu_peak_memory_mb) and the host memory reserved
            # (against the trial's peak_memory_mb).
            "estimated_mb": placement.estimated_mb,
            "host_mb": placement.host_mb,
            "param_count": int(model.count_params()),
            "resources": placement.resources,
            "label_selector": placement.label_selector,
            "gpu_memory_limit_mb": placement.gpu_memory_limit_mb,
            "reason": placement.reason,
            "min_estimated_mb": placement.min_estimated_bytes / (1 << 20),
        }
        keras.backend.clear_session()
        placed_plan = TrialPlan(
            plan.name, plan.model, training, plan.phase, plan.warm_start, plan.warm_start_from
        )
        refusal = DOES_NOT_FIT if placement.status == "does_not_fit" else ""
        return PlacedTrial(placed_plan, summary, seconds, refusal, placement.reason)


def flat_params(placed: PlacedTrial) -> dict[str, str]:
    """A trial's MLflow params: family, size, estimates, training and model config fields."""
    import json

    plan = placed.plan
    params = {
        "family": plan.model["family"],
        "plan_name": plan.name,
        "phase": plan.phase,
        "param_count": str(placed.placement["param_count"]),
        "estimated_memory_mb": f"{placed.placement['estimated_mb']:.1f}",
        "estimated_epoch_seconds": f"{placed.estimated_epoch_seconds:.4g}",
        "placement": placed.placement["status"],
    }
    host = placed.placement.get("host_mb", placed.placement["estimated_mb"])
    params["estimated_host_memory_mb"] = f"{host:.1f}"
    if plan.warm_start_from:
        params["warm_start_from"] = plan.warm_start_from
    for key, value in plan.training.items():
        params[key] = str(value)
    for key, value in plan.model.items():
        if key != "family":
            text = json.dumps(value) if isinstance(value, dict | list | tuple) else str(value)
            params[f"model.{key}"] = text[:6000]
    return params


def placed_from_config(config: dict[str, Any]) -> PlacedTrial:
    """The placed trial a Tune trial config stands for (see `PlacedTrial.tune_config`)."""
    trial = config["trial"]
    plan = TrialPlan(
        trial["name"],
        trial["model"],
        trial["training"],
        trial.get("phase", EXPLORE),
        trial.get("warm_start", ""),
        trial.get("warm_start_from", ""),
    )
    return PlacedTrial(plan, trial["placement"], float(trial.get("estimated_epoch_seconds", 0.0)))


class RefusalRecorder:
    """Logs refused proposals as child runs of the search (never handed to Tune).

    The searcher runs in the driver, so this is the driver writing; its queue keeps the
    writes in order and retries them while the tracking server is down.
    """

    def __init__(
        self, tracking_uri: str, experiment_id: str, parent_run_id: str, data_info: dict
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.data_info = data_info
        self.names: list[str] = []
        self._queue: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_queue"} | {"_queue": None}

    @property
    def queue(self) -> Any:
        if self._queue is None:
            from mlflow.tracking import MlflowClient

            from jobs.tracking import TrackingQueue

            self._queue = TrackingQueue(MlflowClient(self.tracking_uri))
        return self._queue

    def record(self, placed: PlacedTrial) -> None:
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        self.names.append(placed.plan.name)
        client = self.queue.client
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent_run_id,
            layout.TAG_ROLE: layout.ROLE_TRIAL,
            layout.TAG_FAMILY: placed.plan.model["family"],
            layout.TAG_STATUS: placed.refusal,
            layout.TAG_PLAN_NAME: placed.plan.name,
            layout.TAG_REFUSAL: placed.reason,
        }
        params = flat_params(placed)

        def write() -> None:
            run = client.create_run(self.experiment_id, run_name=placed.plan.name, tags=tags)
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
            client.set_terminated(run.info.run_id, "FINISHED")

        self.queue.submit(f"refused proposal {placed.plan.name}", write)


@dataclass
class ProposalClock:
    """Seconds this phase of the search has spent, carried across a driver restart (a resumed
    search gets the budget it had left at its last checkpoint, not a fresh one)."""

    budget_s: float
    spent_before_s: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.budget_s - self.spent_before_s - (time.monotonic() - self.started)

    def __getstate__(self) -> dict[str, Any]:
        spent = self.spent_before_s + time.monotonic() - self.started
        return {"budget_s": self.budget_s, "spent_before_s": spent}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.started = time.monotonic()


class PlacingSearcher(Searcher):
    """Fixed plans first, then a model-based searcher's proposals; each placed before launch.

    `queue` holds the fixed plans in launch order; a None in it stands for the model-based
    searcher's next proposal (whose first points are its `points_to_evaluate`, named by
    `inner_names`). `grace_epochs` is the scheduler's first rung: a proposal whose setup plus
    that many estimated epochs exceeds the time left is not started.
    """

    def __init__(
        self,
        planner: Planner,
        queue: list[TrialPlan | None],
        recorder: RefusalRecorder,
        clock: ProposalClock,
        *,
        inner: Searcher | None = None,
        inner_names: list[str] | None = None,
        make_plan: Any = None,  # (params, name) -> TrialPlan, for the inner's proposals
        grace_epochs: int = 1,
        metric: str = "best_val_accuracy",
        mode: str = "max",
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.planner = planner
        self.queue = list(queue)
        self.recorder = recorder
        self.clock = clock
        self.inner = inner
        self.inner_names = list(inner_names or [])
        self.make_plan = make_plan
        self.grace_epochs = grace_epochs
        self.proposed = 0  # from the inner searcher, accepted or not (names its plans)
        self.inner_ids: dict[str, str] = {}  # Tune trial id -> the inner searcher's id
        self.started: list[str] = []

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        return True  # the space is ours (jobs/space.py), not Tune's param_space

    def _next(self, trial_id: str, attempt: int) -> tuple[TrialPlan | None, str]:
        """The next plan to place, and the inner searcher's id for it ("" for fixed plans)."""
        if self.queue:
            item = self.queue.pop(0)
            if item is not None:
                return item, ""
        if self.inner is None:
            return None, ""
        inner_id = trial_id if attempt == 0 else f"{trial_id}-retry{attempt}"
        params = self.inner.suggest(inner_id)
        if params is None or params == Searcher.FINISHED:
            return None, ""
        self.proposed += 1
        if self.inner_names:
            name = self.inner_names.pop(0)
        else:
            name = f"{params.get('family', 'x')}-{self.proposed:03d}"
        return self.make_plan(params, name), inner_id

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        for attempt in range(MAX_REFUSALS_IN_A_ROW):
            plan, inner_id = self._next(trial_id, attempt)
            if plan is None:
                return Searcher.FINISHED
            placed = self.planner.place(plan)
            if not placed.refusal:
                placed = self._time_check(placed)
            if not placed.refusal:
                if inner_id:
                    self.inner_ids[trial_id] = inner_id
                self.started.append(plan.name)
                log.info(
                    "trial %s: %s, est %.0f MiB, %.0f s/epoch",
                    plan.name,
                    placed.placement["status"],
                    placed.placement["estimated_mb"],
                    placed.estimated_epoch_seconds,
                )
                return placed.tune_config()
            log.warning(
                "proposal %s not started (%s): %s", plan.name, placed.refusal, placed.reason
            )
            self.recorder.record(placed)
            if inner_id:
                if placed.refusal == DOES_NOT_FIT:
                    # The worst score: the searcher learns where the workers' memory ends.
                    self.inner.on_trial_complete(inner_id, {self.metric: REFUSED_SCORE})
                else:
                    # Too slow for the time left says nothing of its accuracy.
                    self.inner.on_trial_complete(inner_id, None, error=True)
        log.warning(
            "%d proposals in a row not started: the search stops proposing (%.0f s left)",
            MAX_REFUSALS_IN_A_ROW,
            self.clock.left(),
        )
        return Searcher.FINISHED

    def _time_check(self, placed: PlacedTrial) -> PlacedTrial:
        if placed.estimated_epoch_seconds <= 0:
            return placed
        epochs = min(self.grace_epochs, int(placed.plan.training["max_epochs"]))
        needed = SETUP_SECONDS + epochs * placed.estimated_epoch_seconds
        left = self.clock.left()
        if needed <= left:
            return placed
        reason = (
            f"needs about {needed:.0f} s to reach epoch {epochs} (setup {SETUP_SECONDS:.0f} s + "
            f"{epochs} x {placed.estimated_epoch_seconds:.0f} s estimated), {max(left, 0):.0f} s "
            f"of the budget left"
        )
        return PlacedTrial(
            placed.plan, placed.placement, placed.estimated_epoch_seconds, OVER_BUDGET, reason
        )

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.inner_ids and self.metric in result:
            self.inner.on_trial_result(self.inner_ids[trial_id], result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        inner_id = self.inner_ids.pop(trial_id, None)
        if inner_id is None:
            return
        if result is not None and self.metric not in result:
            result = None
        self.inner.on_trial_complete(inner_id, result, error=error or result is None)

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__, handle)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))
