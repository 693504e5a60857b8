"""Epoch time estimates that correct themselves, and ASHA's rungs counted in images seen."""

from __future__ import annotations

import math
import pickle
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from ray.tune.search import Searcher

from jobs.plan import PlacedTrial, TrainingConfig
from jobs.proposals import (
    MIN_MARGIN_SECONDS,
    OVER_BUDGET,
    SETUP_SECONDS,
    PlacingSearcher,
    Planner,
    ProposalClock,
)
from jobs.resources import MIB, WorkerBudget
from jobs.scheduling import RUNG_TOLERANCE, ImageRungASHA, grace_epochs, rung_images
from jobs.search.explore import SpacePlanMaker
from jobs.settings import SearchSettings
from jobs.space import UNRANKED_POINTS, fast_cnn_point
from jobs.timing import CORRECTION_RANGE, Calibration, EpochTimeCorrection
from model.batches import stratified_indices
from schema import run as layout

TRAIN_ROWS = 28709  # FER2013's Training split, by class:
CLASS_ROWS = (3995, 436, 4097, 7215, 4830, 3171, 4965)
# The machine as it is, and as a calibration during a load spike measured it: 3x slower.
MACHINE = Calibration(reference_images_per_second=90.0, work_per_second=3e9, threads=1, seconds=1)
SPIKED = Calibration(reference_images_per_second=30.0, work_per_second=1e9, threads=1, seconds=1)


class Scripted(Searcher):
    """A model-based searcher stand-in: proposes the given points in order."""

    def __init__(self, points: list[dict[str, Any]]) -> None:
        super().__init__(metric="best_val_accuracy", mode="max")
        self.points = list(points)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        return self.points.pop(0) if self.points else Searcher.FINISHED

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        pass  # learns nothing: only the order of its proposals matters here


def _planner(calibration: Calibration, train_rows: int = TRAIN_ROWS) -> Planner:
    budget = WorkerBudget("cpu", int(1e6 * MIB), "test")
    return Planner(budget, 1.0, train_rows=train_rows, val_rows=3589, calibration=calibration)


def _cnn(filters: int) -> dict[str, Any]:
    return {**fast_cnn_point(("cnn", "dnn")), "cnn.base_filters": filters}


def _searcher(planner: Planner, points: list[dict[str, Any]], budget_s: float) -> PlacingSearcher:
    refused: list[PlacedTrial] = []
    return PlacingSearcher(
        planner,
        [None],
        refused.append,
        ProposalClock(budget_s),
        inner=Scripted(points),
        make_plan=SpacePlanMaker(30, 0, 0.25),
        grace_epochs=2,
    )


def _measured(config: dict[str, Any], noise: float) -> float:
    """The epoch seconds a trial measures on the machine as it is (its estimate at the true
    rate, off by `noise`)."""
    return _planner(MACHINE).place(_plan(config)).estimated_epoch_seconds * noise


def _plan(config: dict[str, Any]) -> Any:
    from jobs.plan import placed_from_config

    return placed_from_config(config).plan


def _report(searcher: PlacingSearcher, trial_id: str, config: dict, noise: float) -> float:
    """Two epochs of a trial reach the searcher; the first, with the process's start-up, also
    traced the model's functions (slower, and not the trial's rate)."""
    measured = _measured(config, noise)
    first = {"epoch": 1, "epoch_seconds": measured * 4, layout.METRIC_SETUP_SECONDS: 9.0}
    for result in (first, {"epoch": 2, "epoch_seconds": measured}):
        searcher.on_trial_result(trial_id, {**result, "best_val_accuracy": 0.3})
    return measured


def test_a_calibration_3x_slow_is_corrected_by_the_first_trials_and_refuses_nothing_that_fits() -> (
    None
):
    searcher = _searcher(_planner(SPIKED), [_cnn(16), _cnn(20), _cnn(24), _cnn(16)], 3600.0)
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(3)}
    assert all(isinstance(c, dict) for c in configs.values())  # an hour: all three start
    # The spiked calibration put each estimate about 3x the machine's epoch.
    for config in configs.values():
        assert config["trial"]["estimated_epoch_seconds"] > 2.5 * _measured(config, 1.0)

    noise = {"t0": 1.15, "t1": 0.9, "t2": 1.05}  # trials differ from any estimate
    _report(searcher, "t0", configs["t0"], noise["t0"])
    plan = SpacePlanMaker(30, 0, 0.25)(_cnn(18), "next")
    after_one = searcher.planner.place(plan).estimated_epoch_seconds
    truth = _planner(MACHINE).place(plan).estimated_epoch_seconds
    assert after_one == pytest.approx(truth, rel=0.25)
    for trial_id in ("t1", "t2"):
        _report(searcher, trial_id, configs[trial_id], noise[trial_id])
    for trial_id, config in configs.items():
        corrected = searcher.planner.place(_plan(config)).estimated_epoch_seconds
        assert corrected == pytest.approx(_measured(config, noise[trial_id]), rel=0.25)

    # Later, with less time left: the next CNN reaches its first rung (8 epochs of a quarter
    # of the rows) at the machine's speed, not at the spiked one's.
    fourth = SpacePlanMaker(30, 0, 0.25)(_cnn(16), "fourth")
    true_s = _planner(MACHINE).place(fourth).estimated_epoch_seconds
    spiked_s = _planner(SPIKED).place(fourth).estimated_epoch_seconds
    left = SETUP_SECONDS + 8 * (1.3 * true_s)  # fits with a margin; the spiked one does not
    assert SETUP_SECONDS + 8 * spiked_s > left
    searcher.clock = ProposalClock(left)
    started = searcher.suggest("t3")
    assert isinstance(started, dict) and started["trial"]["model"] == fourth.model
    # Without the trials' measurements, the same proposal in the same time is refused.
    uncorrected = _searcher(_planner(SPIKED), [_cnn(16)], left)
    assert uncorrected.suggest("u0") == Searcher.FINISHED
    assert uncorrected.started == []


def test_the_correction_is_the_median_trial_by_its_latest_epoch_within_its_range() -> None:
    correction = EpochTimeCorrection()
    assert correction.factor == 1.0
    correction.observe("a", 30.0, 0.0)  # nothing measured: nothing learned
    correction.observe("b", 0.0, 10.0)  # nothing estimated (no calibration)
    assert correction.factor == 1.0
    correction.observe("a", 30.0, 30.0)  # its first epoch, tracing included
    for measured in (12.0, 9.0, 10.0):  # its latest epochs replace it
        correction.observe("a", 30.0, measured)
    assert correction.factor == pytest.approx(1 / 3)
    correction.observe("b", 10.0, 4.0)
    correction.observe("c", 20.0, 40.0)  # one trial far off does not move the median much
    assert correction.factor == pytest.approx(0.4)
    low, high = CORRECTION_RANGE
    assert EpochTimeCorrection({"x": [100.0]}).factor == high
    assert EpochTimeCorrection({"x": [1e-3]}).factor == low


def test_the_correction_survives_a_searcher_save_and_restore(tmp_path: Path) -> None:
    first = _searcher(_planner(SPIKED), [_cnn(16), _cnn(20), _cnn(16)], 3600.0)
    configs = [first.suggest("t0"), first.suggest("t1")]
    _report(first, "t0", configs[0], 1.0)
    factor = first.planner.correction.factor
    assert factor < 0.5
    first.save(str(tmp_path / "searcher.pkl"))

    second = _searcher(_planner(SPIKED), [_cnn(16), _cnn(20), _cnn(16)], 3600.0)
    assert second.planner.correction.factor == 1.0
    second.restore(str(tmp_path / "searcher.pkl"))
    assert second.planner.correction.factor == factor
    # A trial running across the restart keeps reporting against its own estimate.
    _report(second, "t1", configs[1], 1.0)
    assert len(second.planner.correction.ratios) == 2
    following = second.suggest("t2")
    assert following["trial"]["placement"]["epoch_time_correction"] == pytest.approx(
        second.planner.correction.factor
    )
    assert pickle.loads(pickle.dumps(second.planner.correction)) == second.planner.correction


def test_the_correction_is_recorded_on_the_parent_run_after_a_phase() -> None:
    from jobs.search.tune_phase import _record_correction

    logged: list[tuple] = []
    client = SimpleNamespace(log_metric=lambda *args, **kw: logged.append((*args, kw)))
    queue = SimpleNamespace(submit=lambda what, operation: operation())
    logger = SimpleNamespace(client=client, queue=queue, parent_run_id="parent")
    searcher = _searcher(_planner(SPIKED), [], 60.0)
    spec = SimpleNamespace(searcher=searcher, logger=logger, phase=layout.PHASE_EXPLORE)
    _record_correction(spec)
    assert logged == []  # no trial reported: nothing to record
    searcher.planner.correction.observe("a", 30.0, 10.0)
    _record_correction(spec)
    assert logged == [
        ("parent", layout.METRIC_EPOCH_TIME_CORRECTION, pytest.approx(1 / 3), {"step": 0})
    ]


def _trial(name: str, fraction: float) -> SimpleNamespace:
    training = {"train_fraction": fraction}
    return SimpleNamespace(trial_id=name, config={"trial": {"name": name, "training": training}})


def test_the_first_rung_is_counted_in_images_seen_whatever_the_row_share() -> None:
    # The rows a quarter-row trial sees: a stratified share, a few rows off a quarter.
    labels = np.repeat(np.arange(7), CLASS_ROWS)
    quarter_rows = len(stratified_indices(labels, 0.25, 0))
    settings = SearchSettings(max_epochs=30, grace_epochs=2)
    grace = grace_epochs(settings, 0.25, TRAIN_ROWS)
    assert grace == 2.0  # full-data epochs' worth of images
    asha = ImageRungASHA(
        UNRANKED_POINTS,
        grace_images=rung_images(grace, TRAIN_ROWS),
        max_images=rung_images(settings.max_epochs, TRAIN_ROWS),
        metric="val_accuracy",
        mode="max",
        reduction_factor=3,
    )
    full, quarter = _trial("cnn-full", 1.0), _trial("cnn-quarter", 0.25)
    for trial in (full, quarter):
        asha.on_trial_add(None, trial)

    def result(epoch: int, rows: int, accuracy: float) -> dict[str, Any]:
        return {"val_accuracy": accuracy, layout.METRIC_IMAGES_SEEN: epoch * rows}

    assert asha.on_trial_result(None, full, result(1, TRAIN_ROWS, 0.40)) == "CONTINUE"
    assert asha.on_trial_result(None, full, result(2, TRAIN_ROWS, 0.45)) == "CONTINUE"
    # Far behind at every epoch before the rung, yet not ranked: it has seen fewer images.
    for epoch in range(1, 8):
        assert asha.on_trial_result(None, quarter, result(epoch, quarter_rows, 0.2)) == "CONTINUE"
    # Four times the full-row trial's epochs: ranked at the same rung, and stopped there.
    assert asha.on_trial_result(None, quarter, result(8, quarter_rows, 0.30)) == "STOP"
    first_rung = asha._brackets[0]._rungs[-1][1]
    assert set(first_rung) == {"cnn-full", "cnn-quarter"}

    # The searcher's over-budget check counts the same rung: 8 quarter epochs, 2 full ones.
    searcher = PlacingSearcher(
        _planner(MACHINE), [], lambda placed: None, ProposalClock(60), grace_epochs=grace
    )
    assert searcher.rung_epochs(TrainingConfig(train_fraction=0.25, max_epochs=30)) == 8
    assert searcher.rung_epochs(TrainingConfig(train_fraction=1.0, max_epochs=30)) == 2
    assert searcher.rung_epochs(TrainingConfig(train_fraction=0.25, max_epochs=5)) == 5
    # A short search: the rung is what a quarter-row trial can reach in its max_epochs.
    assert grace_epochs(SearchSettings(max_epochs=4, grace_epochs=2), 0.25, TRAIN_ROWS) == 1.0


def test_the_first_rung_holds_enough_images_to_rank_on_a_small_data_set() -> None:
    # A tenth of FER2013's rows: 2 epochs are 5,742 images, where every model is near chance.
    settings = SearchSettings(max_epochs=30, grace_epochs=2)
    small = TRAIN_ROWS // 10
    grace = grace_epochs(settings, 1.0, small)
    assert rung_images(grace, small) >= settings.min_rung_images * (1 - RUNG_TOLERANCE)
    assert 6 <= grace <= 8  # epochs of the small set
    searcher = PlacingSearcher(
        _planner(MACHINE, small), [], lambda placed: None, ProposalClock(60), grace_epochs=grace
    )
    assert searcher.rung_epochs(TrainingConfig(train_fraction=1.0, max_epochs=30)) == math.ceil(
        grace
    )
    # Where a trial cannot see that many images in max_epochs, the rung is its last epoch.
    assert grace_epochs(SearchSettings(max_epochs=5, grace_epochs=2), 1.0, small) == 5.0
    # Every row of FER2013: the setting's 2 epochs already hold more.
    assert grace_epochs(settings, 1.0, TRAIN_ROWS) == 2.0
    # Asked for: no floor.
    assert grace_epochs(replace(settings, min_rung_images=0), 1.0, small) == 2.0
    with pytest.raises(ValueError, match="min_rung_images"):
        SearchSettings(min_rung_images=-1)


def test_the_coursework_dnn_is_never_ranked_even_at_the_same_images() -> None:
    asha = ImageRungASHA(
        UNRANKED_POINTS,
        grace_images=rung_images(1, 1000),
        max_images=rung_images(10, 1000),
        metric="val_accuracy",
        mode="max",
        reduction_factor=3,
    )
    dnn, cnn = _trial("dnn-matched", 1.0), _trial("cnn-fast", 1.0)
    for trial in (dnn, cnn):
        asha.on_trial_add(None, trial)
    rung = {layout.METRIC_IMAGES_SEEN: 1000}
    assert asha.on_trial_result(None, dnn, {**rung, "val_accuracy": 0.34}) == "CONTINUE"
    assert asha.on_trial_result(None, cnn, {**rung, "val_accuracy": 0.20}) == "CONTINUE"
    asha.on_trial_complete(None, dnn, {**rung, "val_accuracy": 0.48})
    assert "dnn-matched" not in asha._trial_info


def test_a_refusal_for_time_names_the_rung_and_the_correction() -> None:
    searcher = _searcher(_planner(SPIKED), [_cnn(16), _cnn(16)], 3600.0)
    config = searcher.suggest("t0")
    _report(searcher, "t0", config, 1.0)
    searcher.clock = ProposalClock(SETUP_SECONDS + 1.0)
    refused: list[PlacedTrial] = []
    searcher.on_refusal = refused.append
    assert searcher.suggest("t1") == Searcher.FINISHED
    (placed,) = refused
    assert placed.refusal == OVER_BUDGET
    assert "to reach epoch 8 on 0.25 of the rows, the first rung" in placed.reason
    assert "as the trials so far measured" in placed.reason


def test_the_final_phase_scales_its_estimate_once_by_what_its_explored_trial_measured() -> None:
    from jobs.search.final import FINAL_FILL, final_plans

    searcher = _searcher(_planner(SPIKED), [_cnn(16), _cnn(20)], 3600.0)
    explored = searcher.suggest("t0")  # placed before any trial reported: uncorrected
    other = searcher.suggest("t1")
    measured = _report(searcher, "t0", explored, 1.0)
    _report(searcher, "t1", other, 1.0)
    planner = searcher.planner
    assert planner.correction.factor < 0.5
    checkpoint = SimpleNamespace(path="/tune/t0/checkpoint_000001", filesystem=None)
    grid = [
        SimpleNamespace(
            config=explored,
            metrics={"best_val_accuracy": 0.5, "epoch_seconds": measured},
            checkpoint=checkpoint,
        )
    ]
    settings = SearchSettings(max_epochs=30, final_trials=1)
    # An epoch on every row takes the machine's time, not the spiked estimate's nor a third of
    # it again (the planner's correction and the explored trial's ratio are the same news).
    full = SpacePlanMaker(30, 0, 1.0)(_cnn(16), "full")
    truth = _planner(MACHINE).place(full).estimated_epoch_seconds
    for epochs, fits in ((0.8, False), (1.2, True)):
        seconds = max(
            (SETUP_SECONDS + epochs * truth) / FINAL_FILL,
            SETUP_SECONDS + epochs * truth + MIN_MARGIN_SECONDS,
        )
        found = final_plans(settings, grid, planner, seconds_left=seconds, slots=1)
        assert bool(found) is fits, epochs
