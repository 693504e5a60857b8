"""The strategy sized to the budget: explore where models are cheap against it, else exploit."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
from ray.tune.search import Searcher

from jobs.plan import PlacedTrial, TrainingConfig, TrialPlan
from jobs.proposals import OVER_BUDGET, SETUP_SECONDS, PlacingSearcher, Planner, ProposalClock
from jobs.resources import GIB, WorkerBudget
from jobs.search.final import FINAL_FILL, exploit_plans
from jobs.search.strategy import (
    COURSEWORK_SHARE,
    EXPLOIT,
    EXPLORE,
    EXPLORE_MIN_PROPOSALS,
    FINISH_EPOCHS,
    MAX_FINAL_SHARE,
    Strategy,
    best_known_plan,
    decide,
)
from jobs.settings import SearchSettings
from jobs.space import COURSEWORK_POINTS
from jobs.timing import Calibration
from schema import run as layout


def _planner(work_per_second: float) -> Planner:
    calibration = Calibration(
        reference_images_per_second=100.0, work_per_second=work_per_second, threads=1, seconds=1
    )
    return Planner(WorkerBudget("cpu", 8 * GIB, "test"), 1.0, 28709, 3589, calibration)


def _model_seconds(planner: Planner, settings: SearchSettings) -> float:
    """What one finished model of the known-good CNN costs on one slot, from the planner."""
    best = best_known_plan(settings)
    full = dataclasses.replace(best.training, train_fraction=1.0)
    placed = planner.place(type(best)(best.name, best.model, full))
    return placed.estimated_epoch_seconds * min(FINISH_EPOCHS, settings.max_epochs)


def test_a_budget_holding_about_one_model_per_slot_exploits_and_says_why() -> None:
    planner = _planner(2e9)
    probe = SearchSettings()
    model_s = _model_seconds(planner, probe)
    settings = SearchSettings(time_budget_min=model_s / 60)  # one model per slot

    strategy = decide(settings, planner, best_known_plan(settings), slots=2)

    assert strategy.kind == EXPLOIT and not strategy.explores
    assert strategy.final_share == 1.0
    assert strategy.models_per_slot == pytest.approx(1.0, rel=1e-6)
    assert strategy.model_seconds == pytest.approx(model_s, rel=1e-6)
    assert "cnn-fast" in strategy.reason and "1.00 per slot" in strategy.reason
    params = strategy.params()
    assert params[layout.PARAM_STRATEGY] == EXPLOIT
    assert params[layout.PARAM_STRATEGY_MODELS_PER_SLOT] == "1.00"


def test_a_budget_holding_many_models_explores_and_keeps_a_final_of_one_model() -> None:
    planner = _planner(2e9)
    probe = SearchSettings()
    model_s = _model_seconds(planner, probe)
    bar = decide(probe, planner, best_known_plan(probe), slots=2).explore_min_models
    wide = SearchSettings(time_budget_min=3 * bar * model_s / 60)  # far above the bar
    above = SearchSettings(time_budget_min=bar * model_s / 60 * 1.01)
    below = SearchSettings(time_budget_min=bar * model_s / 60 * 0.99)

    many = decide(wide, planner, best_known_plan(wide), slots=2)
    few = decide(above, planner, best_known_plan(above), slots=2)
    short = decide(below, planner, best_known_plan(below), slots=2)

    assert bar > 1.0 and many.explore_min_models == bar
    assert f"exploring pays from {bar:.2f}" in many.reason
    assert many.kind == EXPLORE and many.final_share == wide.final_budget_share
    # Just above the bar it explores: the final gets one model's time, the explore phase the
    # rest, which holds its least work; just below, it exploits.
    assert few.kind == EXPLORE and short.kind == EXPLOIT
    total_s = above.time_budget_min * 60
    assert few.final_share * total_s >= model_s * 0.999
    assert (1 - few.final_share) * total_s >= (bar - 1) * model_s * 0.999
    assert few.final_share <= MAX_FINAL_SHARE
    assert few.params()[layout.PARAM_STRATEGY_EXPLORE_MIN_MODELS] == f"{bar:.2f}"


def test_the_bar_counts_the_anchors_the_first_rungs_and_the_slot_the_leader_keeps() -> None:
    planner = _planner(2e9)
    settings = SearchSettings()
    both = decide(settings, planner, best_known_plan(settings), slots=2)
    cnn_only = replace(settings, families="cnn")
    without_dnn = decide(cnn_only, planner, best_known_plan(cnn_only), slots=2)
    one_slot = decide(settings, planner, best_known_plan(settings), slots=1)
    three = decide(settings, planner, best_known_plan(settings), slots=3)

    assert "seed2017" in both.reason and "dnn-matched" in both.reason
    assert f"{EXPLORE_MIN_PROPOSALS} first rungs" in both.reason
    # Less work without the matched DNN; on one slot the known-good CNN's explored run comes
    # first; a third slot halves what the two free ones must each hold.
    assert without_dnn.explore_min_models < both.explore_min_models
    assert one_slot.explore_min_models > both.explore_min_models
    assert (three.explore_min_models - 1) == pytest.approx((both.explore_min_models - 1) / 2)
    # No more proposals than `num_samples` leaves after the fixed points.
    few = replace(settings, num_samples=4)
    one = decide(few, planner, best_known_plan(few), slots=2)
    assert "1 first rung of" in one.reason
    assert one.explore_min_models < both.explore_min_models


def test_on_a_small_data_set_the_rung_floor_keeps_a_short_budget_from_exploring() -> None:
    # As measured on 10 % of the rows in 20 minutes on two CPU cores (BENCHMARKS.md): 2.3
    # models per slot, and no proposal started. A rung of 20,000 images is 7 epochs there.
    small = Planner(
        WorkerBudget("cpu", 8 * GIB, "test"), 1.0, 2871, 3589, _planner(2e9).calibration
    )
    settings = replace(SearchSettings(), explore_fraction=1.0)
    model_s = _model_seconds(small, settings)
    budget = replace(settings, time_budget_min=2.3 * model_s / 60)

    strategy = decide(budget, small, best_known_plan(budget), slots=2)

    assert strategy.kind == EXPLOIT
    assert strategy.explore_min_models > 2.3
    floorless = replace(budget, min_rung_images=0)
    assert decide(floorless, small, best_known_plan(floorless), slots=2).explore_min_models < (
        strategy.explore_min_models
    )


def test_the_kind_can_be_forced_and_the_numbers_are_still_recorded() -> None:
    planner = _planner(2e9)
    model_s = _model_seconds(planner, SearchSettings())
    settings = SearchSettings(time_budget_min=model_s / 60, strategy="explore")

    strategy = decide(settings, planner, best_known_plan(settings), slots=2)

    assert strategy.kind == EXPLORE
    assert strategy.reason.startswith("strategy=explore was asked for")
    assert strategy.models_per_slot == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="strategy: expected one of auto, explore, exploit"):
        SearchSettings(strategy="greedy")


def test_without_a_calibration_the_search_explores() -> None:
    budget = WorkerBudget("cpu", 8 * GIB, "test")
    planner = Planner(budget, 1.0, 28709, 3589, calibration=None)
    settings = SearchSettings()

    strategy = decide(settings, planner, best_known_plan(settings), slots=2)

    assert strategy.kind == EXPLORE and "no time estimate" in strategy.reason


def test_fixed_plans_are_checked() -> None:
    with pytest.raises(ValueError, match="at least one plan"):
        Strategy.fixed([])
    with pytest.raises(ValueError, match=r"plan 0: expected a jobs.plan.TrialPlan, got dict"):
        Strategy.fixed([{"name": "a", "model": {}}])
    plan = TrialPlan("a", {}, TrainingConfig())
    with pytest.raises(ValueError, match=r"distinct plan names, got \['a'\] twice"):
        Strategy.fixed([plan, plan])


def test_exploit_trains_seeded_copies_on_every_row_and_boxes_the_coursework_anchors() -> None:
    settings = SearchSettings(time_budget_min=60)
    seconds_left = 3600.0

    plans = exploit_plans(settings, seconds_left, slots=2)

    names = [plan.name for plan in plans]
    assert names == ["cnn-fast-final", "dnn-matched", "seed2017", "cnn-fast-final-2"]
    copies = [plans[0], plans[-1]]
    assert [copy.training.seed for copy in copies] == [settings.seed, settings.seed + 1]
    for copy in copies:
        assert copy.training.train_fraction == 1.0
        assert copy.training.lr_schedule == "cosine"
        assert copy.training.time_budget_s == round(seconds_left * FINAL_FILL - SETUP_SECONDS, 1)
        assert copy.model == best_known_plan(settings).model
        assert copy.phase == layout.PHASE_FINAL and not copy.warm_start
        # The budget decides a copy's epochs: its cap is the final's, not an explored trial's.
        assert copy.training.max_epochs == settings.final_max_epochs > settings.max_epochs
    anchors = [plan for plan in plans if plan.name in COURSEWORK_POINTS]
    assert {plan.training.time_budget_s for plan in anchors} == {3600 * COURSEWORK_SHARE}
    # The anchors are trained for the coursework comparison in their box, to max_epochs.
    assert {plan.training.max_epochs for plan in anchors} == {settings.max_epochs}


def test_a_plan_that_waited_for_a_slot_still_ends_with_the_budget() -> None:
    planner = _planner(2e9)
    settings = SearchSettings(time_budget_min=60)
    plans = exploit_plans(settings, 3600.0, slots=1)  # [dnn-matched, seed2017, cnn-fast-final]
    clock = ProposalClock(3600.0, spent_before_s=600.0)  # the anchors took ten minutes
    refused: list[PlacedTrial] = []
    searcher = PlacingSearcher(planner, plans[2:], refused.append, clock, fill=FINAL_FILL)

    config = searcher.suggest("trial-1")

    budget_s = config["trial"]["training"]["time_budget_s"]
    assert budget_s == pytest.approx(3000 * FINAL_FILL - SETUP_SECONDS, abs=2)
    assert refused == []


def test_an_anchor_that_cannot_reach_its_first_epoch_in_its_box_is_refused_in_words() -> None:
    # A slow worker: SEED2017's full epoch is far longer than its three-minute box.
    planner = _planner(2e8)
    settings = SearchSettings(time_budget_min=60)
    seed2017 = [p for p in exploit_plans(settings, 3600.0, slots=1) if p.name == "seed2017"]
    refused: list[PlacedTrial] = []
    searcher = PlacingSearcher(
        planner, seed2017, refused.append, ProposalClock(3600.0), fill=FINAL_FILL
    )

    assert searcher.suggest("trial-1") == Searcher.FINISHED

    (placed,) = refused
    assert placed.refusal == OVER_BUDGET
    assert "in its time box" in placed.reason and "to reach epoch 1" in placed.reason
