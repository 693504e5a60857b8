"""Final: the best configs trained on every row to the end of the budget.

An explored search's final share (jobs/search/strategy.py) continues the best explored configs
from their explored weights; an exploiting search spends its whole budget here, on seeded copies
of the best known config (and the coursework anchors in a short time box). Every final trial
trains on a cosine schedule sized to end with the budget, planning its epochs on its measured
epoch time (jobs/training.py).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from jobs.plan import FINAL, TrainingConfig, TrialPlan, placed_from_config
from jobs.proposals import PlacingSearcher, Planner, ProposalClock, training_seconds
from jobs.scheduling import first_rung_images
from jobs.search.context import FINAL_SUFFIX, SearchContext, slots
from jobs.search.explore import ExploreResult
from jobs.search.strategy import EXPLOIT
from jobs.search.tune_phase import TuneSpec, fit
from jobs.settings import SearchSettings
from jobs.timing import CORRECTION_RANGE
from jobs.tracking.queue import drain_seconds
from jobs.tracking.refusals import RefusalRecorder
from jobs.tracking.trials import MLflowTrialLogger
from schema import run as layout

log = logging.getLogger("jobs.search")
# The final trials' epochs fill this share of the time left. They plan their epochs on their
# measured epoch time, so the rest is a margin for the last epoch's spread and the ensemble.
FINAL_FILL = 0.95
# A final slot goes to another config only within this of the best explored trial's accuracy
# after the same images.
FINAL_MAX_GAP = 0.05


@dataclass(frozen=True)
class FinalResult:
    """What the final phase trained (empty where nothing fit, or nothing was left to train)."""

    names: tuple[str, ...]
    seconds_left: float


def final(ctx: SearchContext, explored: ExploreResult) -> FinalResult | None:
    """Train the best explored configs in the time left; None where the search has no final."""
    from ray import tune

    if ctx.final_share <= 0:
        return None
    run = ctx.run
    # A resumed search cannot tell how long it was down: its final gets its share.
    if run.resumed:
        seconds_left = ctx.final_share * ctx.total_s
    else:
        seconds_left = ctx.total_s - (time.time() - ctx.started)
    final_path = run.tune_path + FINAL_SUFFIX
    restore = run.resumed and tune.Tuner.can_restore(final_path)
    settings = ctx.settings
    free = slots(settings.cpus_per_trial)
    if restore:
        plans: list[TrialPlan] = []
    elif ctx.strategy.kind == EXPLOIT:
        plans = exploit_plans(settings, seconds_left, free)
    else:
        plans = final_plans(settings, explored.grid, ctx.planner, seconds_left, free)
    if not restore and not plans:
        log.info("final: nothing to train (%.0f s left)", seconds_left)
        return FinalResult((), seconds_left)
    log.info("final: %s in %.0f s", ", ".join(p.name for p in plans) or "resumed", seconds_left)
    recorder = RefusalRecorder(run.tracking_uri, run.experiment_id, run.parent_id, ctx.data.info)
    searcher = PlacingSearcher(
        ctx.planner,
        list(plans),
        recorder,
        ProposalClock(seconds_left),
        grace_epochs=1,
        fill=FINAL_FILL,
    )
    logger = MLflowTrialLogger(
        run.tracking_uri, run.experiment_id, run.parent_id, ctx.data.info, seconds_left
    )
    spec = TuneSpec(
        path=final_path,
        searcher=searcher,
        logger=logger,
        budget_s=seconds_left,
        num_samples=max(1, len(plans)),
        restore=restore,
        phase=FINAL,
    )
    fit(ctx, spec)
    recorder.queue.drain(drain_seconds())
    return FinalResult(tuple(p.name for p in plans), seconds_left)


def final_plans(
    settings: SearchSettings, grid: Any, planner: Planner, seconds_left: float, slots: int
) -> list[TrialPlan]:
    """The best explored configs go on from their explored weights, on every row, for as many
    epochs as fit in the time left (planned again after each epoch on its measured time), on a
    cosine schedule that ends on the last of them.

    The best explored trial takes the first slot. The others go to distinct configs within
    FINAL_MAX_GAP of it after the same images: a trial the first rung stopped is compared with
    where the best one stood at that rung, not with where it stood after all its epochs (at the
    rung the more regularised configs trail, and they are the ones that gain on a long final).
    A slot left over trains the best config again from scratch with another seed (a second
    model of the best config is worth more than a config ten points worse, and an independent
    one more to the ensemble than a second run from the same weights).
    """
    from jobs.space import COURSEWORK_POINTS

    ranked = []
    for result in grid:
        metrics = result.metrics or {}
        if not result.config or "best_val_accuracy" not in metrics:
            continue
        if result.config["plan"] in COURSEWORK_POINTS:
            continue  # trained for the coursework comparison, not a candidate
        ranked.append((float(metrics["best_val_accuracy"]), result))
    if not ranked:
        return []
    ranked.sort(key=lambda pair: -pair[0])
    leader_accuracy, leader = ranked[0]
    first_rung = first_rung_images(settings, planner.train_rows)
    behind = [(0.0, leader)] + sorted(
        (
            (_par(leader, leader_accuracy, result, first_rung) - accuracy, result)
            for accuracy, result in ranked[1:]
        ),
        key=lambda pair: pair[0],
    )
    wanted = min(settings.final_trials, slots)
    picks: list[tuple[Any, int]] = []  # (explored result, copy number)
    seen: set[str] = set()
    for gap, result in behind:
        explored = placed_from_config(result.config)
        key = json.dumps([explored.plan.model, _without_fidelity(explored.plan.training)])
        if len(picks) < wanted and key not in seen and gap <= FINAL_MAX_GAP:
            seen.add(key)
            picks.append((result, 0))
            if result is leader:
                log.info("final: a slot for %s, the best explored", explored.plan.name)
            else:
                log.info(
                    "final: a slot for %s, %.3f behind the best explored after the same images",
                    explored.plan.name,
                    gap,
                )
    while picks and len(picks) < wanted:
        picks.append((picks[0][0], len(picks)))
    chosen = []
    for result, copy in picks:
        plan = _final_plan(settings, result, copy, planner, seconds_left)
        if plan is not None:
            chosen.append(plan)
    return chosen


def _par(leader: Any, leader_accuracy: float, result: Any, first_rung: int) -> float:
    """The accuracy `result` is measured against: the leader's best after as many images as
    `result` saw, where `result` reached the first rung and the leader's epochs are at hand;
    the leader's best over all its epochs otherwise (a trial that stopped before the rung has
    not shown how it learns)."""
    images = float((result.metrics or {}).get(layout.METRIC_IMAGES_SEEN, 0) or 0)
    history = getattr(leader, "metrics_dataframe", None)
    if images < first_rung or history is None or layout.METRIC_IMAGES_SEEN not in history:
        return leader_accuracy
    before = history[history[layout.METRIC_IMAGES_SEEN] <= images]["val_accuracy"]
    return float(before.max()) if len(before) else leader_accuracy


def exploit_plans(settings: SearchSettings, seconds_left: float, slots: int) -> list[TrialPlan]:
    """Seeded copies of the best known config on every row, one per slot, each on a cosine to
    the end of the budget; the coursework anchors (the matched DNN, SEED2017) in a time box of
    COURSEWORK_SHARE of the budget each, on the last slot before its copy starts (that copy
    then fills what is left: `PlacingSearcher(fill=...)`). An anchor that cannot reach its first
    epoch in its box is refused `over_budget` with the numbers, as in an explored search."""
    from jobs.search.strategy import COURSEWORK_SHARE, best_known_plan, search_fixed_points
    from jobs.space import COURSEWORK_POINTS

    best = best_known_plan(settings)
    budget_s = round(training_seconds(seconds_left, FINAL_FILL), 1)
    copies = []
    for copy in range(max(1, slots)):
        training = replace(
            best.training,
            train_fraction=1.0,
            lr_schedule="cosine",
            max_epochs=settings.final_max_epochs,
            seed=best.training.seed + copy,
            time_budget_s=budget_s,
        )
        name = best.name + FINAL_SUFFIX + (f"-{copy + 1}" if copy else "")
        copies.append(TrialPlan(name, best.model, training, FINAL))
    box_s = round(settings.time_budget_min * 60 * COURSEWORK_SHARE, 1)
    anchors = [
        replace(
            point,
            training=replace(point.training, lr_schedule="cosine", time_budget_s=box_s),
            phase=FINAL,
        )
        for point in search_fixed_points(settings, 1.0)
        if point.name in COURSEWORK_POINTS and point.name != best.name
    ]
    return copies[:-1] + anchors + copies[-1:]


def _final_plan(
    settings: SearchSettings, result: Any, copy: int, planner: Planner, seconds_left: float
) -> TrialPlan | None:
    explored = placed_from_config(result.config)
    measured = float(result.metrics.get("epoch_seconds", 0.0))
    training = replace(
        explored.plan.training,
        train_fraction=1.0,
        lr_schedule="cosine",
        max_epochs=settings.final_max_epochs,
        seed=explored.plan.training.seed + copy,
    )
    full = planner.place(TrialPlan(explored.plan.name, explored.plan.model, training, FINAL))
    # What the explored trial measured corrects the estimate (same worker kind, same load), on
    # both estimates before the planner's correction (each was placed with the one of its time).
    estimated = explored.uncorrected_epoch_seconds
    correction = full.placement.epoch_time_correction
    ratio = measured / estimated if estimated > 0 and measured > 0 else correction
    low, high = CORRECTION_RANGE
    per_epoch = full.estimated_epoch_seconds / correction * min(max(ratio, low), high)
    budget_s = training_seconds(seconds_left, FINAL_FILL)
    epochs = settings.final_max_epochs
    if per_epoch > 0:
        epochs = min(epochs, int(budget_s // per_epoch))
    if epochs < 1:
        log.info("final: no epoch of %s fits in %.0f s", explored.plan.name, seconds_left)
        return None
    log.info(
        "final: %s, about %d epochs of %.0f s estimated in %.0f s",
        explored.plan.name,
        epochs,
        per_epoch,
        budget_s,
    )
    name = explored.plan.name + FINAL_SUFFIX + (f"-{copy + 1}" if copy else "")
    # A second copy starts afresh with its own seed: a copy of the same explored weights would
    # follow nearly the same trajectory, and the ensemble gains little from it.
    warm = "" if copy else _checkpoint_uri(result.checkpoint)
    return TrialPlan(
        name,
        explored.plan.model,
        # The estimate decides whether an epoch fits; the trial plans the rest on its clock.
        replace(training, time_budget_s=round(budget_s, 1)),
        FINAL,
        warm,
        "" if copy else explored.plan.name,
    )


def _checkpoint_uri(checkpoint: Any) -> str:
    """Where a Tune checkpoint lives, as a path or URI a trial can open ("" if none)."""
    if checkpoint is None:
        return ""
    filesystem = getattr(checkpoint, "filesystem", None)
    kind = getattr(filesystem, "type_name", "local") if filesystem is not None else "local"
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def _without_fidelity(training: TrainingConfig) -> dict[str, Any]:
    return {
        k: v
        for k, v in training.to_dict().items()
        if k not in ("train_fraction", "max_epochs", "micro_batch_size", "time_budget_s")
    }
