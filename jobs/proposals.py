"""Propose trials and place them before Ray sees them: the searcher side of the search.

`PlacingSearcher` is a Ray Tune `Searcher` that hands Tune one trial at a time: first the
fixed points, then what a model-based searcher (Ray Tune's `OptunaSearch`, TPE) proposes from
the results so far. Every proposal is built, its memory estimated and placed (fits / smaller
micro-batch with accumulation / refused) and its epoch time estimated *before* it is returned
to Tune. A proposal that fits no worker, or cannot reach the scheduler's first rung in the
time left (at the epoch time the trials so far measured: `jobs.timing.EpochTimeCorrection`),
is never started: it is handed to the `on_refusal` callable the searcher was given
(the driver's logs it as a child run, `does_not_fit` / `over_budget`) and reported back to the
model-based searcher, which then proposes again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray.tune.search import Searcher

from jobs.plan import PlacedTrial, TrainingConfig, TrialPlacement, TrialPlan
from jobs.scheduling import epochs_to_reach, rung_images
from jobs.timing import EpochTimeCorrection
from schema import run as layout

log = logging.getLogger(__name__)

DOES_NOT_FIT = layout.STATUS_DOES_NOT_FIT
OVER_BUDGET = layout.STATUS_OVER_BUDGET
# A trial's start-up before its first epoch (Ray actor, TF import, data, model build): about
# 8 s on a laptop core (BENCHMARKS.md, "trial overhead"); kept generous.
SETUP_SECONDS = 20.0
# The least a trial that fills the time left keeps back, whatever its share: on a short budget
# a share is a few seconds, less than Tune's own start of a phase on a busy machine.
MIN_MARGIN_SECONDS = 15.0
# Proposals refused one after another before the searcher gives up (the time left is then
# too short for anything it proposes, or the space does not fit the workers).
MAX_REFUSALS_IN_A_ROW = 8
# What a refused-for-memory proposal scores for the model-based searcher: the worst accuracy.
REFUSED_SCORE = 0.0


def training_seconds(left: float, fill: float) -> float:
    """What a trial may spend training in `left` seconds: `fill` of them, at least
    MIN_MARGIN_SECONDS short of them, less its start-up."""
    return min(left * fill, left - MIN_MARGIN_SECONDS) - SETUP_SECONDS


@dataclass
class Planner:
    """Builds a plan's model once to estimate its memory (placement) and epoch time.

    The epoch time is the calibration's estimate times `correction`, what the trials placed
    so far measured against their estimates (fed by the searchers that place with it).
    """

    budget: Any  # jobs.resources.WorkerBudget
    cpus_per_trial: float
    train_rows: int
    val_rows: int
    calibration: Any = None  # jobs.timing.Calibration; None: no time estimate
    correction: EpochTimeCorrection = field(default_factory=EpochTimeCorrection)

    def rows(self, train_fraction: float) -> int:
        """The training rows a trial that sees `train_fraction` of them trains on."""
        return max(1, round(self.train_rows * float(train_fraction)))

    def rung_epochs(self, grace_epochs: float, training: TrainingConfig) -> int:
        """The epochs a trial of `training` trains to reach a first rung of `grace_epochs`
        full-data epochs' worth of images (at most its max_epochs): more, the fewer rows it
        sees."""
        rung = rung_images(grace_epochs, self.train_rows)
        return min(epochs_to_reach(rung, self.rows(training.train_fraction)), training.max_epochs)

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
        from model.memory import memory_breakdown
        from model.preprocessing import pixel_statistics

        dummy_stats = pixel_statistics(np.zeros((2, 48, 48, 1), dtype=np.uint8))
        model = build_model(config_from_dict(plan.model), stats=dummy_stats)
        training = plan.training
        fraction = training.train_fraction
        rows = self.rows(fraction)
        saved = memory_breakdown(model, training.batch_size, training.optimizer)
        state = saved["weights"] + saved["optimizer_slots"]
        placement = place(
            model,
            training.batch_size,
            training.optimizer,
            self.budget,
            self.cpus_per_trial,
            compute_dtype=self.compute_dtype(training.precision),
            host_overhead_bytes=self.overhead.host_bytes(rows, self.val_rows, fraction, state),
        )
        training = dataclasses.replace(training, micro_batch_size=placement.micro_batch_size)
        seconds = (
            estimate_epoch_seconds(
                model, rows, self.val_rows, placement.micro_batch_size, self.calibration
            )
            if self.calibration is not None
            else 0.0
        )
        correction = self.correction.factor
        summary = TrialPlacement(
            status=placement.status,
            estimated_mb=placement.estimated_mb,
            host_mb=placement.host_mb,
            param_count=int(model.count_params()),
            resources=placement.resources,
            label_selector=placement.label_selector,
            gpu_memory_limit_mb=placement.gpu_memory_limit_mb,
            reason=placement.reason,
            min_estimated_mb=placement.min_estimated_bytes / (1 << 20),
            epoch_time_correction=correction,
        )
        keras.backend.clear_session()
        placed_plan = TrialPlan(
            plan.name, plan.model, training, plan.phase, plan.warm_start, plan.warm_start_from
        )
        refusal = DOES_NOT_FIT if placement.status == "does_not_fit" else ""
        return PlacedTrial(placed_plan, summary, seconds * correction, refusal, placement.reason)


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
    `inner_names`). `grace_epochs` is the scheduler's first rung in full-data epochs' worth of
    images (jobs/scheduling.py): a proposal whose setup plus the epochs of its own share of the
    rows that take it there, at its estimated epoch time, exceeds the time left (or its own
    `time_budget_s`) is not started. Each started trial's measured epochs correct the planner's
    later estimates. With `fill` > 0, a plan's `time_budget_s` is cut, when it starts, to what
    `training_seconds` gives of the time left: a plan that waited for a slot still ends with the
    budget.
    """

    def __init__(
        self,
        planner: Planner,
        queue: list[TrialPlan | None],
        on_refusal: Callable[[PlacedTrial], None],
        clock: ProposalClock,
        *,
        inner: Searcher | None = None,
        inner_names: list[str] | None = None,
        make_plan: Any = None,  # (params, name) -> TrialPlan, for the inner's proposals
        grace_epochs: float = 1.0,
        fill: float = 0.0,
        metric: str = "best_val_accuracy",
        mode: str = "max",
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.planner = planner
        self.queue = list(queue)
        self.on_refusal = on_refusal  # picklable: the searcher is checkpointed with it
        self.clock = clock
        self.inner = inner
        self.inner_names = list(inner_names or [])
        self.make_plan = make_plan
        self.grace_epochs = grace_epochs
        self.fill = fill
        self.proposed = 0  # from the inner searcher, accepted or not (names its plans)
        self.inner_ids: dict[str, str] = {}  # Tune trial id -> the inner searcher's id
        self.started: list[str] = []
        # Tune trial id -> (plan name, its epoch time estimate before the correction).
        self.estimates: dict[str, tuple[str, float]] = {}

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
            placed = self.planner.place(self._filled(plan))
            if not placed.refusal:
                placed = self._time_check(placed)
            if not placed.refusal:
                if inner_id:
                    self.inner_ids[trial_id] = inner_id
                self.started.append(plan.name)
                self.estimates[trial_id] = (plan.name, placed.uncorrected_epoch_seconds)
                log.info(
                    "trial %s: %s, est %.0f MiB, %.0f s/epoch",
                    plan.name,
                    placed.placement.status,
                    placed.placement.estimated_mb,
                    placed.estimated_epoch_seconds,
                )
                return placed.tune_config()
            log.warning(
                "proposal %s not started (%s): %s", plan.name, placed.refusal, placed.reason
            )
            self.on_refusal(placed)
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

    def _filled(self, plan: TrialPlan) -> TrialPlan:
        box = plan.training.time_budget_s
        if self.fill <= 0 or box <= 0:
            return plan
        fits = round(training_seconds(self.clock.left(), self.fill), 1)
        if fits >= box:
            return plan
        training = dataclasses.replace(plan.training, time_budget_s=max(fits, 0.0))
        return dataclasses.replace(plan, training=training)

    def rung_epochs(self, training: TrainingConfig) -> int:
        """The epochs a trial of `training` trains to reach the first rung (at most its
        max_epochs): more, the fewer rows it sees."""
        return self.planner.rung_epochs(self.grace_epochs, training)

    def _time_check(self, placed: PlacedTrial) -> PlacedTrial:
        if placed.estimated_epoch_seconds <= 0:
            return placed
        training = placed.plan.training
        epochs = self.rung_epochs(training)
        needed = SETUP_SECONDS + epochs * placed.estimated_epoch_seconds
        left = self.clock.left()
        box = training.time_budget_s
        whose = "of the budget"
        if 0 < box and box + SETUP_SECONDS < left:
            left, whose = box + SETUP_SECONDS, "in its time box"
        if needed <= left:
            return placed
        fraction = training.train_fraction
        correction = placed.placement.epoch_time_correction
        corrected = f" x{correction:.2f} as the trials so far measured" if correction != 1 else ""
        reason = (
            f"needs about {needed:.0f} s to reach epoch {epochs} on {fraction:g} of the rows, "
            f"the first rung (setup {SETUP_SECONDS:.0f} s + {epochs} x "
            f"{placed.estimated_epoch_seconds:.0f} s estimated{corrected}), "
            f"{max(left, 0):.0f} s {whose} left"
        )
        return PlacedTrial(
            placed.plan, placed.placement, placed.estimated_epoch_seconds, OVER_BUDGET, reason
        )

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # The first epoch of a trial's process also traces its functions: not its rate.
        if trial_id in self.estimates and layout.METRIC_SETUP_SECONDS not in result:
            name, estimated = self.estimates[trial_id]
            measured = float(result.get("epoch_seconds", 0.0) or 0.0)
            self.planner.correction.observe(name, estimated, measured)
        if trial_id in self.inner_ids and self.metric in result:
            self.inner.on_trial_result(self.inner_ids[trial_id], result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        self.estimates.pop(trial_id, None)
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
