"""Strategy: how much of the budget to explore, decided from what one model costs.

A search pays only when it can try configs *and* still train the best of them to a finish.
Where the budget holds fewer than `EXPLORE_MIN_MODELS` finished models of the best known config
per trial slot (the default hour on two CPU cores holds about one), every explored epoch is an
epoch the champion does not get: the search then *exploits*, training copies of the best known
config with different seeds on every row for the whole budget (the baseline a user would run by
hand, and an ensemble of its copies), with the coursework anchors in a short time box of one
slot. Where the budget holds more (a GPU cluster, a small data set), it explores, and its final
phase gets at least one model's time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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
# Exploring pays from this many finished models per slot: one model's time for the final, at
# least as much for trying configs.
EXPLORE_MIN_MODELS = 2.0
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
    # FIXED: exactly these plans ({"name", "model", "training"}), in order, on every row.
    plans: tuple[dict[str, Any], ...] = ()

    @classmethod
    def fixed(cls, plans: list[dict[str, Any]]) -> Strategy:
        """Train exactly `plans` side by side, placed and tracked like any trial, no final phase
        (comparing given configs: bench/bench_search.py, bench/gpu_check.py)."""
        if not plans:
            raise ValueError("Strategy.fixed: expected at least one plan, got none")
        for index, plan in enumerate(plans):
            missing = {"name", "model", "training"} - set(plan)
            if missing:
                raise ValueError(f"Strategy.fixed: plan {index} lacks {sorted(missing)}")
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
        }


def best_known_plan(settings: SearchSettings) -> TrialPlan:
    """The best config known before the search: the known-good CNN (the first fixed point)."""
    from jobs.space import fixed_points, parse_families

    point = fixed_points(parse_families(settings.families), settings.max_epochs, settings.seed)[0]
    training = {**point["training"], "precision": settings.precision}
    return TrialPlan(point["name"], point["model"], training)


def decide(settings: SearchSettings, planner: Any, best_known: TrialPlan, slots: int) -> Strategy:
    """Explore or exploit, from the time `best_known` takes to finish on every row on one slot
    (the planner's estimate from the calibration) against the budget.

    `settings.strategy` other than "auto" forces the kind; the numbers are recorded either way.
    A search without time estimates (the calibration failed) explores, as it always did.
    """
    total_s = settings.time_budget_min * 60
    full = TrialPlan(
        best_known.name, best_known.model, {**best_known.training, "train_fraction": 1.0}
    )
    epoch_s = planner.place(full).estimated_epoch_seconds if planner.calibration else 0.0
    model_s = epoch_s * min(FINISH_EPOCHS, settings.max_epochs)
    per_slot = total_s / model_s if model_s > 0 else float("inf")
    numbers = (
        f"one {best_known.name} model ({min(FINISH_EPOCHS, settings.max_epochs)} epochs of "
        f"every row at {epoch_s:.0f} s) takes {model_s / 60:.1f} min of a slot; the "
        f"{settings.time_budget_min:g}-minute budget holds {per_slot:.2f} per slot "
        f"({slots} slot{'s' if slots != 1 else ''}); exploring pays from {EXPLORE_MIN_MODELS:g}"
    )
    if model_s <= 0:
        numbers = "no time estimate (no calibration)"
    if settings.strategy == "auto":
        kind = EXPLORE if per_slot >= EXPLORE_MIN_MODELS else EXPLOIT
        why = numbers
    else:
        kind = settings.strategy
        why = f"strategy={kind} was asked for; {numbers}"
    final_share = 1.0
    if kind == EXPLORE:
        needed = model_s / total_s if total_s > 0 else 0.0
        final_share = min(MAX_FINAL_SHARE, max(settings.final_budget_share, needed))
        if settings.final_budget_share == 0:
            final_share = 0.0  # asked for: no final phase
    strategy = Strategy(kind, final_share, why, model_s, min(per_slot, 1e6), slots)
    log.info("strategy: %s (final %.0f %% of the budget): %s", kind, final_share * 100, why)
    return strategy
