"""Strategy: how much of the budget to explore, decided from what one model costs.

A search pays only when it can try configs *and* still train the best of them to a finish.
The explore phase must hold the coursework anchors and the first rung of at least
`EXPLORE_MIN_PROPOSALS` proposals besides the known-good CNN (which keeps a slot of its own
while it leads); the final, one finished model of the best known config per slot. Where the
budget holds less (the default hour on two CPU cores holds about one model per slot), every
explored epoch is an epoch the champion does not get: the search then *exploits*, training
copies of the best known config with different seeds on every row for the whole budget (the
baseline a user would run by hand, and an ensemble of its copies), with the coursework anchors
in a short time box of one slot. Where it holds more (a GPU cluster, a small data set against
a long budget), it explores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from jobs.plan import TrialPlan
from jobs.settings import SearchSettings
from schema import run as layout

log = logging.getLogger("jobs.search")

EXPLORE = layout.STRATEGY_EXPLORE
EXPLOIT = layout.STRATEGY_EXPLOIT
FIXED = layout.STRATEGY_FIXED
# Epochs of every row the known-good recipe needs to finish on a cosine (17-20 epochs reached
# 64-65 % PublicTest in the hour benchmarks; more epochs add little on a CPU budget).
FINISH_EPOCHS = 20
# Proposals whose first rung the explore phase must hold besides the anchors and the known-good
# CNN: its neighbours and as many of TPE's own. Fewer, and the explore phase only re-ranks the
# configs the final would train anyway (BENCHMARKS.md, search value, large regime).
EXPLORE_MIN_PROPOSALS = 6
# The final phase of an explored search gets at most this share (the rest explores).
MAX_FINAL_SHARE = 0.8
# What the coursework anchors (the matched DNN, SEED2017) get of one slot when the search
# exploits: a time box each, taken from the last copy's time.
COURSEWORK_SHARE = 0.05


@dataclass(frozen=True)
class Strategy:
    """What the search does with its budget, and why (logged on the parent run)."""

    kind: str  # EXPLORE, EXPLOIT or FIXED
    final_share: float  # of the budget: the final phase (EXPLOIT: all of it)
    reason: str
    model_seconds: float = 0.0  # one finished model of the best known config, on one slot
    models_per_slot: float = 0.0  # the budget over model_seconds
    slots: int = 1
    # Exploring pays from this many models per slot: the final's one and the explore phase's.
    explore_min_models: float = 0.0
    # FIXED: exactly these plans, in order, each on the share of rows its training names.
    plans: tuple[TrialPlan, ...] = ()

    @classmethod
    def fixed(cls, plans: list[TrialPlan]) -> Strategy:
        """Train exactly `plans` side by side, placed and tracked like any trial, no final phase
        (comparing given configs: bench/bench_search.py, bench/gpu_check.py). A plan whose
        precision is "auto" trains at the search's."""
        if not plans:
            raise ValueError("Strategy.fixed: expected at least one plan, got none")
        for index, plan in enumerate(plans):
            if not isinstance(plan, TrialPlan):
                raise ValueError(
                    f"Strategy.fixed: plan {index}: expected a jobs.plan.TrialPlan, "
                    f"got {type(plan).__name__}"
                )
        names = [plan.name for plan in plans]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"Strategy.fixed: expected distinct plan names, got {repeated} twice")
        return cls(FIXED, 0.0, f"{len(plans)} given plans", plans=tuple(plans))

    @property
    def explores(self) -> bool:
        return self.kind != EXPLOIT

    def params(self) -> dict[str, str]:
        """The decision as parent-run params (names in schema/run.py)."""
        return {
            layout.PARAM_STRATEGY: self.kind,
            layout.PARAM_STRATEGY_FINAL_SHARE: f"{self.final_share:.3f}",
            layout.PARAM_STRATEGY_MODEL_MINUTES: f"{self.model_seconds / 60:.1f}",
            layout.PARAM_STRATEGY_MODELS_PER_SLOT: f"{self.models_per_slot:.2f}",
            layout.PARAM_STRATEGY_EXPLORE_MIN_MODELS: f"{self.explore_min_models:.2f}",
        }


def search_fixed_points(settings: SearchSettings, train_fraction: float) -> list[TrialPlan]:
    """The fixed points of the search's families (`jobs.space.fixed_points`), at its epochs,
    seed and precision, on `train_fraction` of the rows: the explored share in the explore
    phase, every row in the final."""
    from jobs.space import fixed_points, parse_families

    families = parse_families(settings.families)
    return fixed_points(
        families, settings.max_epochs, settings.seed, train_fraction, settings.precision
    )


def best_known_plan(settings: SearchSettings) -> TrialPlan:
    """The best config known before the search: the known-good CNN (the first fixed point)."""
    return search_fixed_points(settings, 1.0)[0]


@dataclass(frozen=True)
class ExploreCost:
    """What the explore phase must hold before it pays, estimated from the calibration."""

    seconds: float  # of one slot: the work below spread over the slots it runs on
    words: str


def explore_cost(
    settings: SearchSettings, planner: Any, best_known: TrialPlan, slots: int
) -> ExploreCost:
    """The explore phase's least work: the coursework anchors (the matched DNN trained to its
    end, SEED2017 to its first rung) and EXPLORE_MIN_PROPOSALS first rungs (fewer where
    `num_samples` is) at the cost of `best_known`'s (its neighbours cost as much), on the slots
    `best_known` leaves free: ASHA lets the leader train on, so with one slot its whole
    explored run comes first."""
    from jobs.proposals import SETUP_SECONDS
    from jobs.scheduling import grace_epochs
    from jobs.space import COURSEWORK_POINTS, UNRANKED_POINTS

    grace = grace_epochs(settings, settings.explore_fraction, planner.train_rows)

    def seconds(plan: TrialPlan, ranked: bool) -> float:
        epochs = plan.training.max_epochs  # the fixed points': settings.max_epochs
        if ranked:
            epochs = planner.rung_epochs(grace, plan.training)
        return SETUP_SECONDS + epochs * planner.place(plan).estimated_epoch_seconds

    leader = TrialPlan(
        best_known.name,
        best_known.model,
        replace(
            best_known.training,
            train_fraction=settings.explore_fraction,
            precision=settings.precision,
        ),
    )
    proposal_s = seconds(leader, ranked=True)
    # What the explore phase starts first, as many as `num_samples` allows (explore.py).
    points = search_fixed_points(settings, settings.explore_fraction)[: settings.num_samples]
    anchors = {
        point.name: seconds(point, ranked=point.name not in UNRANKED_POINTS)
        for point in points
        if point.name in COURSEWORK_POINTS and point.name != best_known.name
    }
    proposals = min(EXPLORE_MIN_PROPOSALS, max(0, settings.num_samples - len(points)))
    work = sum(anchors.values()) + proposals * proposal_s
    if slots <= 1:
        work += seconds(leader, ranked=False)
    free = max(1, slots - 1)
    parts = ", ".join(f"{name} {s / 60:.1f}" for name, s in anchors.items())
    words = (
        f"the explore phase needs {work / free / 60:.1f} min of a slot: "
        f"{proposals} first rung{'s' if proposals != 1 else ''} of {proposal_s / 60:.1f} min"
        + (f", the anchors ({parts} min)" if parts else "")
        + (f", {best_known.name}'s explored run first" if slots <= 1 else "")
        + f", on {free} slot{'s' if free != 1 else ''}"
        + (f" ({best_known.name} keeps one)" if slots > 1 else "")
    )
    return ExploreCost(work / free, words)


def decide(settings: SearchSettings, planner: Any, best_known: TrialPlan, slots: int) -> Strategy:
    """Explore or exploit, from the time `best_known` takes to finish on every row on one slot
    (the planner's estimate from the calibration) against the budget: exploring pays from one
    such model per slot for the final plus the explore phase's least work (`explore_cost`).

    `settings.strategy` other than "auto" forces the kind; the numbers are recorded either way.
    A search without time estimates (the calibration failed) explores, as it always did.
    """
    total_s = settings.time_budget_min * 60
    full = TrialPlan(
        best_known.name, best_known.model, replace(best_known.training, train_fraction=1.0)
    )
    timed = planner.calibration is not None
    epoch_s = planner.place(full).estimated_epoch_seconds if timed else 0.0
    model_s = epoch_s * min(FINISH_EPOCHS, settings.max_epochs)
    per_slot = total_s / model_s if model_s > 0 else float("inf")
    if model_s > 0:
        cost = explore_cost(settings, planner, best_known, slots)
        min_models = 1.0 + cost.seconds / model_s
        numbers = (
            f"one {best_known.name} model ({min(FINISH_EPOCHS, settings.max_epochs)} epochs of "
            f"every row at {epoch_s:.0f} s) takes {model_s / 60:.1f} min of a slot; the "
            f"{settings.time_budget_min:g}-minute budget holds {per_slot:.2f} per slot "
            f"({slots} slot{'s' if slots != 1 else ''}); exploring pays from {min_models:.2f} "
            f"({cost.words}, and one model for the final)"
        )
    else:
        cost, min_models = ExploreCost(0.0, ""), 0.0
        numbers = "no time estimate (no calibration)"
    if settings.strategy == "auto":
        kind = EXPLORE if per_slot >= min_models else EXPLOIT
        why = numbers
    else:
        kind = settings.strategy
        why = f"strategy={kind} was asked for; {numbers}"
    final_share = 1.0
    if kind == EXPLORE:
        final_share = _final_share(settings, model_s, cost.seconds, total_s)
    strategy = Strategy(
        kind, final_share, why, model_s, min(per_slot, 1e6), slots, explore_min_models=min_models
    )
    log.info("strategy: %s (final %.0f %% of the budget): %s", kind, final_share * 100, why)
    return strategy


def _final_share(
    settings: SearchSettings, model_s: float, explore_s: float, total_s: float
) -> float:
    """The final's share of an explored budget: `final_budget_share`, less where the explore
    phase needs more, but at least one model's time (at most MAX_FINAL_SHARE); 0 where asked."""
    if settings.final_budget_share == 0 or total_s <= 0:
        return 0.0
    wanted = min(settings.final_budget_share, 1.0 - explore_s / total_s)
    return min(MAX_FINAL_SHARE, max(wanted, model_s / total_s))
