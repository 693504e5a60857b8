"""The searcher side of the search: proposals placed by memory and time before Tune sees them."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from ray.tune.search import Searcher

from jobs.plan import PlacedTrial, TrialPlan
from jobs.proposals import (
    DOES_NOT_FIT,
    MIN_MARGIN_SECONDS,
    OVER_BUDGET,
    REFUSED_SCORE,
    SETUP_SECONDS,
    PlacingSearcher,
    Planner,
    ProposalClock,
    training_seconds,
)
from jobs.resources import GIB, MIB, WorkerBudget
from jobs.search.explore import (
    EXPLORE_MIN_ROWS,
    SpacePlanMaker,
    _explore_searcher,
    explore_fraction,
    observe_explored,
)
from jobs.search.final import FINAL_FILL, FINAL_MAX_GAP, final_plans
from jobs.settings import SearchSettings
from jobs.space import (
    FAST_CNN,
    NEIGHBOURS,
    fast_cnn_point,
    fixed_points,
    model_from_params,
)
from jobs.timing import Calibration
from model.configs import config_to_dict
from schema import run as layout


class Recorder:
    """The searcher's `on_refusal`: keeps refused proposals in memory (no child runs)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.refused: list[PlacedTrial] = []

    def __call__(self, placed: PlacedTrial) -> None:
        self.names.append(placed.plan.name)
        self.refused.append(placed)


class ScriptedSearcher(Searcher):
    """A model-based searcher stand-in: proposes the given points in order, keeps what it is
    told."""

    def __init__(self, points: list[dict[str, Any]]) -> None:
        super().__init__(metric="best_val_accuracy", mode="max")
        self.points = list(points)
        self.asked: list[str] = []
        self.completed: list[tuple[str, dict | None, bool]] = []

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        self.asked.append(trial_id)
        return self.points.pop(0) if self.points else Searcher.FINISHED

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        self.completed.append((trial_id, result, error))


def _point(family: str, **overrides: Any) -> dict[str, Any]:
    """A point of the space: FAST_CNN's, or a small DNN's."""
    if family == "cnn":
        point = fast_cnn_point(("cnn", "dnn"))
    else:
        point = {
            "family": "dnn",
            "dnn.depth": 2,
            "dnn.width": 256,
            "dnn.dropout": 0.2,
            "dnn.batch_norm": True,
            "training.optimizer": "adam",
            "training.learning_rate": 1e-3,
            "training.batch_size": 64,
            "training.weight_decay": 0.0,
            "training.label_smoothing": 0.0,
            "training.mixup": 0.0,
            "training.lr_schedule": "cosine",
        }
    return {**point, **overrides}


def _planner(budget_mb: float, calibration: Calibration | None = None) -> Planner:
    budget = WorkerBudget("cpu", int(budget_mb * MIB), "test")
    return Planner(budget, 1.0, train_rows=28709, val_rows=3589, calibration=calibration)


def test_a_proposal_that_fits_no_worker_is_refused_reported_and_the_search_goes_on() -> None:
    # A CNN at batch 128 with 512-wide hidden layers is several times the DNN's memory.
    huge = _point("cnn", **{"cnn.base_filters": 64, "training.batch_size": 128})
    huge["cnn.dense_units"] = "512,256"
    inner = ScriptedSearcher([huge, _point("dnn")])
    recorder = Recorder()
    probe = _planner(1 / MIB).place(SpacePlanMaker(30, 0, 1.0)(huge, "probe"))
    budget_mb = probe.placement.min_estimated_mb - 1  # too small at every micro-batch
    searcher = PlacingSearcher(
        _planner(budget_mb),
        [None],
        recorder,
        ProposalClock(3600),
        inner=inner,
        make_plan=SpacePlanMaker(30, 0, 1.0),
    )

    config = searcher.suggest("trial-1")

    # The huge one never reached Tune: the DNN did, in the same call.
    assert config["trial"]["model"]["family"] == "dnn"
    assert [p.plan.model["family"] for p in recorder.refused] == ["cnn"]
    (refused,) = recorder.refused
    assert refused.refusal == DOES_NOT_FIT and "largest worker" in refused.reason
    # The searcher was told the refused point scored the worst, under its own id.
    assert inner.completed == [(inner.asked[0], {"best_val_accuracy": REFUSED_SCORE}, False)]
    assert inner.asked[1] != inner.asked[0]
    # Tune's trial id maps to the DNN's proposal: its result reaches the searcher.
    searcher.on_trial_complete("trial-1", {"best_val_accuracy": 0.4})
    assert inner.completed[-1] == (inner.asked[1], {"best_val_accuracy": 0.4}, False)


def test_a_proposal_that_cannot_reach_the_first_rung_in_time_is_not_started() -> None:
    # A worker doing 1 M MAC-equivalents a second: a CNN epoch takes days.
    slow = Calibration(reference_images_per_second=0.01, work_per_second=1e6, threads=1, seconds=1)
    (plan,) = [p for p in fixed_points(("cnn",), 30, 0) if p.name == "cnn-fast"]
    recorder = Recorder()
    searcher = PlacingSearcher(
        _planner(1e6, slow), [plan], recorder, ProposalClock(600), grace_epochs=2
    )

    assert searcher.suggest("trial-1") == Searcher.FINISHED
    (refused,) = recorder.refused
    assert refused.refusal == OVER_BUDGET
    assert "to reach epoch 2" in refused.reason and "of the budget left" in refused.reason
    assert searcher.started == []


def test_an_explored_trial_sees_at_least_explore_min_rows() -> None:
    quarter = SearchSettings(explore_fraction=0.25)
    assert explore_fraction(quarter, 28709) == 0.25  # the full split: the setting holds
    assert explore_fraction(quarter, 14000) == pytest.approx(EXPLORE_MIN_ROWS / 14000)
    assert explore_fraction(quarter, 5742) == 1.0  # 20 % of the data: every row
    assert explore_fraction(SearchSettings(explore_fraction=0.8), 28709) == 0.8


def test_the_fixed_points_run_first_then_the_model_based_searcher() -> None:
    settings = SearchSettings(families="cnn,dnn", max_epochs=4, num_samples=10)
    searcher = _explore_searcher(settings, _planner(1e6), Recorder(), 3600, None)

    configs = [searcher.suggest(f"t{i}") for i in range(7)]

    names = [config["plan"] for config in configs]
    assert names[:3] == ["cnn-fast", "dnn-matched", "seed2017"]
    # Then the known-good CNN's neighbours (the same model, more regularised), then TPE's own.
    assert names[3:6] == [f"cnn-fast-{suffix}" for suffix in NEIGHBOURS]
    assert names[6].startswith(("cnn-", "dnn-")) and names[6] not in names[:6]
    for config, changes in zip(configs[3:6], NEIGHBOURS.values(), strict=True):
        near = model_from_params({**fast_cnn_point(("cnn", "dnn")), **changes})
        assert config["trial"]["model"] == config_to_dict(near)
        assert near.filters == FAST_CNN.filters and near != FAST_CNN
    assert configs[4]["trial"]["training"]["label_smoothing"] == 0.1
    # The known-good CNN is the model-based searcher's first point, and trains as planned.
    fast = configs[0]["trial"]
    assert model_from_params(fast_cnn_point(("cnn", "dnn"))) == FAST_CNN
    (fixed,) = [
        p
        for p in fixed_points(("cnn",), 4, settings.seed, 0.25, settings.precision)
        if p.name == "cnn-fast"
    ]
    assert fast["model"] == fixed.model
    assert fast["training"] == fixed.training.to_dict()
    # Every explored trial on the exploring fraction, but the coursework DNN on every row.
    fractions = {c["plan"]: c["trial"]["training"]["train_fraction"] for c in configs}
    assert fractions.pop("dnn-matched") == 1.0
    assert set(fractions.values()) == {0.25}


def test_a_restored_searcher_continues_where_it_stopped(tmp_path: Path) -> None:
    settings = SearchSettings(families="dnn", max_epochs=2, num_samples=10)
    first = _explore_searcher(settings, _planner(1e6), Recorder(), 3600, None)
    names = [first.suggest(f"t{i}")["plan"] for i in range(3)]
    first.on_trial_result("t1", {"best_val_accuracy": 0.3, "training_iteration": 1})
    first.on_trial_complete("t1", {"best_val_accuracy": 0.3, "training_iteration": 1})
    first.save(str(tmp_path / "searcher.pkl"))

    second = _explore_searcher(settings, _planner(1e6), Recorder(), 3600, None)
    second.restore(str(tmp_path / "searcher.pkl"))
    following = second.suggest("t3")["plan"]

    assert names[0] == "dnn-matched" and following not in names
    study = second.inner._ot_study
    assert [t.value for t in study.trials if t.value is not None] == [0.3]
    assert second.started == [*names, following]


def test_the_proposal_clock_carries_what_was_spent_across_a_restore() -> None:
    import pickle

    clock = ProposalClock(100.0, spent_before_s=30.0)
    restored = pickle.loads(pickle.dumps(clock))
    assert 69.0 < restored.left() <= 70.0


def _explored(name: str, accuracy: float, width: int, planner: Planner) -> Any:
    """A trial explored on a quarter of the rows: 6 epochs of 2 s each, checkpointed."""
    plan = SpacePlanMaker(30, 0, 0.25)(_point("dnn", **{"dnn.width": width}), name)
    placed = planner.place(plan)
    metrics = {"best_val_accuracy": accuracy, "epoch": 6, "epoch_seconds": 2.0}
    checkpoint = SimpleNamespace(path=f"/tune/{name}/checkpoint_000005", filesystem=None)
    return SimpleNamespace(config=placed.tune_config(), metrics=metrics, checkpoint=checkpoint)


def test_final_plans_train_the_best_configs_to_the_end_of_the_time_left() -> None:
    rate = Calibration(100.0, 1e10, 1, 1.0)
    planner = _planner(1e6, rate)
    grid = [
        _explored("dnn-a", 0.40, 256, planner),
        _explored("dnn-b", 0.45, 512, planner),
        _explored("dnn-c", 0.30, 1024, planner),
        _explored("dnn-b-again", 0.42, 512, planner),  # the same config: trained once
    ]
    settings = SearchSettings(max_epochs=30, final_max_epochs=200, final_trials=2)
    explored = {g.config["plan"]: g.config["trial"] for g in grid}

    plans = final_plans(settings, grid, planner, seconds_left=600.0, slots=2)

    assert [p.name for p in plans] == ["dnn-b-final", "dnn-a-final"]
    for plan in plans:
        base = explored[plan.name.removesuffix("-final")]
        assert plan.phase == "final" and plan.model == base["model"]
        # It goes on from the explored trial's weights.
        assert plan.warm_start_from == base["name"]
        assert plan.warm_start == f"/tune/{base['name']}/checkpoint_000005"
        assert plan.training.train_fraction == 1.0
        assert plan.training.lr_schedule == "cosine"
        # Epochs up to final_max_epochs (not the explored trials' max_epochs), planned by the
        # trial on its clock within the time left.
        assert plan.training.max_epochs == 200
        assert plan.training.time_budget_s == pytest.approx(600 * FINAL_FILL - SETUP_SECONDS)
    # Whether an epoch fits: the explored trial took 2 s an epoch on a quarter of the rows,
    # against its estimate, and the full-data estimate is scaled by the same ratio.
    best = explored["dnn-b"]
    ratio = 2.0 / best["estimated_epoch_seconds"]
    full = planner.place(plans[0]).estimated_epoch_seconds * ratio
    for epochs, fits in ((0.9, False), (1.1, True)):
        seconds = _seconds_left_to_train(epochs * full)
        found = final_plans(settings, grid, planner, seconds_left=seconds, slots=1)
        assert bool(found) is fits, epochs
    # One slot: only the best; no time for an epoch: none.
    assert [p.name for p in final_plans(settings, grid, planner, 600.0, slots=1)] == ["dnn-b-final"]
    assert final_plans(settings, grid, planner, seconds_left=1.0, slots=2) == []
    # The runner-up ten points behind: the second slot trains the best again, reseeded.
    far = [g for g in grid if g.config["plan"] in ("dnn-b", "dnn-c")]
    twice = final_plans(settings, far, planner, seconds_left=600.0, slots=2)
    assert [p.name for p in twice] == ["dnn-b-final", "dnn-b-final-2"]
    assert twice[1].training.seed == twice[0].training.seed + 1
    assert twice[1].model == twice[0].model
    # The copy is another trajectory: from scratch, not from the explored weights.
    assert twice[0].warm_start and twice[0].warm_start_from == "dnn-b"
    assert twice[1].warm_start == "" and twice[1].warm_start_from == ""


def test_a_resumed_search_places_its_final_with_what_the_explored_trials_measured() -> None:
    """On a resumed search the explored trials reported to Tune's restored copy of the searcher
    (or to the process that died): the final's planner learns their epoch times from the grid,
    the first epoch of a process (it also traces the model) left out."""
    import pandas as pd

    planner = _planner(1e6, Calibration(100.0, 1e10, 1, 1.0))
    grid = [_explored("dnn-a", 0.40, 256, planner), _explored("dnn-b", 0.45, 512, planner)]
    for result in grid:
        estimated = result.config["trial"]["estimated_epoch_seconds"]
        result.metrics_dataframe = pd.DataFrame(
            {
                "epoch_seconds": [50 * estimated, 2 * estimated, 2 * estimated, 2 * estimated],
                layout.METRIC_SETUP_SECONDS: [30.0, None, None, None],
            }
        )
    grid.append(SimpleNamespace(config={}, metrics={}, metrics_dataframe=None))  # errored
    final_plan = final_plans(SearchSettings(), grid[:2], planner, 600.0, slots=1)[0]
    before = planner.place(final_plan).estimated_epoch_seconds
    assert planner.correction.factor == 1.0

    observe_explored(grid, planner.correction)

    assert planner.correction.factor == pytest.approx(2.0)
    assert planner.place(final_plan).estimated_epoch_seconds == pytest.approx(2 * before)


def test_a_final_slot_goes_to_a_config_close_to_the_best_after_the_same_images() -> None:
    """A trial the first rung stopped is compared with the best trial at that rung, not after
    all the best one's epochs: it takes the second final slot within FINAL_MAX_GAP there."""
    import pandas as pd

    from jobs.scheduling import first_rung_images

    planner = _planner(1e6, Calibration(100.0, 1e10, 1, 1.0))
    settings = SearchSettings(max_epochs=30, final_trials=2)
    rung = first_rung_images(settings, planner.train_rows)
    per_epoch = planner.rows(0.25)
    epochs = range(1, 31)
    # The best trial learns a point an epoch to 0.55 after 30 epochs.
    history = pd.DataFrame(
        {
            layout.METRIC_IMAGES_SEEN: [e * per_epoch for e in epochs],
            "val_accuracy": [0.25 + 0.01 * e for e in epochs],
        }
    )
    at_rung = float(history[history[layout.METRIC_IMAGES_SEEN] <= rung]["val_accuracy"].max())
    leader = _explored("dnn-b", 0.55, 512, planner)
    leader.metrics_dataframe = history
    stopped_at_rung = _explored("dnn-a", at_rung - 0.02, 256, planner)
    stopped_at_rung.metrics[layout.METRIC_IMAGES_SEEN] = rung
    far_behind = _explored("dnn-c", at_rung - 0.10, 1024, planner)
    far_behind.metrics[layout.METRIC_IMAGES_SEEN] = rung
    assert at_rung - 0.02 < 0.55 - FINAL_MAX_GAP  # against the best's last epochs: no slot

    plans = final_plans(settings, [far_behind, stopped_at_rung, leader], planner, 600.0, slots=2)

    assert [p.name for p in plans] == ["dnn-b-final", "dnn-a-final"]
    assert plans[1].warm_start_from == "dnn-a"  # it goes on from its rung's weights
    # Before the rung a trial has not shown how it learns: measured against the best's best.
    early = _explored("dnn-a", 0.27, 256, planner)
    early.metrics[layout.METRIC_IMAGES_SEEN] = per_epoch
    plans = final_plans(settings, [early, leader], planner, 600.0, slots=2)
    assert [p.name for p in plans] == ["dnn-b-final", "dnn-b-final-2"]


def _seconds_left_to_train(training_s: float) -> float:
    """The time left in which a final trial may train `training_s` seconds."""
    return max(
        (training_s + SETUP_SECONDS) / FINAL_FILL, training_s + SETUP_SECONDS + MIN_MARGIN_SECONDS
    )


def test_a_trial_that_fills_the_time_left_keeps_a_margin_in_seconds_on_a_short_budget() -> None:
    # An hour's final: the share binds (5 % of 1800 s is 90 s kept back).
    assert training_seconds(1800.0, FINAL_FILL) == pytest.approx(1800 * FINAL_FILL - SETUP_SECONDS)
    # A minute and a quarter (a smoke search's final): 5 % would be under 4 s, less than Tune
    # takes to start the phase on a busy machine; the floor in seconds binds.
    short = training_seconds(75.0, FINAL_FILL)
    assert short == pytest.approx(75.0 - MIN_MARGIN_SECONDS - SETUP_SECONDS)
    assert short < 75.0 * FINAL_FILL - SETUP_SECONDS
    for left in (30.0, 75.0, 300.0, 1800.0):
        assert _seconds_left_to_train(training_seconds(left, FINAL_FILL)) == pytest.approx(left)
    # The same rule cuts the box of a plan that waited for its slot, when it starts.
    (point,) = [p for p in fixed_points(("dnn",), 30, 2017) if p.name == "dnn-matched"]
    training = replace(point.training, time_budget_s=1000.0)
    plan = TrialPlan("late", point.model, training, "final")
    searcher = PlacingSearcher(
        _planner(2e9), [plan], Recorder(), ProposalClock(75.0), fill=FINAL_FILL
    )
    config = searcher.suggest("t0")
    assert config["trial"]["training"]["time_budget_s"] == pytest.approx(round(short, 1))


def test_a_final_trial_starts_from_the_explored_weights(tmp_path: Path) -> None:
    import keras
    import numpy as np

    from jobs.trial import warm_start_file
    from model.configs import DNNConfig, build_model

    config = DNNConfig(hidden_units=(16,), normalization="rescale")
    explored = build_model(config)
    checkpoint = tmp_path / "checkpoint_000005"
    checkpoint.mkdir()
    explored.save(checkpoint / "best.keras")
    fresh = build_model(config)
    fresh.load_weights(warm_start_file(str(checkpoint), tmp_path / "warm"))
    for a, b in zip(fresh.get_weights(), explored.get_weights(), strict=True):
        assert np.array_equal(a, b)
    assert warm_start_file("", tmp_path / "none") is None
    keras.backend.clear_session()


def test_settings_refuse_shares_outside_their_range() -> None:
    with pytest.raises(ValueError, match="final_budget_share"):
        SearchSettings(final_budget_share=1.0)
    with pytest.raises(ValueError, match="final_max_epochs: expected >= 1"):
        SearchSettings(final_max_epochs=0)
    with pytest.raises(ValueError, match="explore_fraction"):
        SearchSettings(explore_fraction=0.0)


def test_worker_budget_sized_placement_is_recorded_on_the_plan() -> None:
    placed = _planner(64 * GIB / MIB).place(SpacePlanMaker(30, 0, 0.25)(_point("cnn"), "cnn-fast"))
    assert placed.placement.status == "fits"
    assert placed.plan.training.micro_batch_size == 64
    assert placed.estimated_epoch_seconds == 0.0  # no calibration, no time estimate
    # Through Tune's trial config and back, the placement is the same typed object; a field
    # the trial config holds that the placement does not know is named.
    from jobs.plan import placed_from_config

    config = placed.tune_config()
    assert placed_from_config(config) == placed
    config["trial"]["placement"]["gpu_share"] = 0.5
    with pytest.raises(
        ValueError, match=r"trial cnn-fast: placement: unknown fields \['gpu_share'\]"
    ):
        placed_from_config(config)


def test_a_coursework_model_the_budget_could_not_train_is_said_so_in_words() -> None:
    from jobs.search.summary import _note_undertrained_coursework
    from schema import run as layout

    def run(name: str, epochs: int, fraction: float) -> Any:
        return SimpleNamespace(
            info=SimpleNamespace(run_name=name, run_id=f"id-{name}"),
            data=SimpleNamespace(
                params={"train_fraction": str(fraction)},
                tags={"fer.epochs_done": str(epochs)},
                metrics={"best_val_accuracy": 0.249},
            ),
        )

    tagged: dict[str, tuple[str, str]] = {}
    client = SimpleNamespace(
        set_tag=lambda run_id, key, value: tagged.update({run_id: (key, value)})
    )
    runs = [run("seed2017", 8, 0.25), run("dnn-matched", 30, 1.0), run("cnn-fast", 2, 0.25)]
    _note_undertrained_coursework(client, runs, SearchSettings(time_budget_min=60))

    assert set(tagged) == {"id-seed2017"}  # 30 full epochs is trained; cnn-fast is no anchor
    key, note = tagged["id-seed2017"]
    assert key == layout.TAG_COURSEWORK_NOTE
    assert "8 epoch(s) on 0.25 of the training rows (2.0 full-data epochs)" in note
    assert "0.249 is what the budget allowed" in note


def test_the_runtime_memory_measured_at_calibration_is_applied() -> None:
    """A trial's host estimate is its model's step plus what the calibration measured on the
    worker plus its checkpoints and data copies; the placement reserves all of it with Ray."""
    from jobs.resources import CHECKPOINT_FACTOR, DEFAULT_RUNTIME_BYTES, TrialOverhead
    from model.configs import build_model, config_from_dict
    from model.memory import memory_breakdown
    from model.preprocessing import pixel_statistics

    plan = SpacePlanMaker(30, 0, 0.25)(_point("cnn"), "cnn-fast")
    runtime = 300 * MIB
    measured = Calibration(100.0, 1e10, 1, 1.0, runtime_memory_bytes=runtime)
    calibrated = _planner(8000, measured).place(plan).placement
    uncalibrated = _planner(8000).place(plan).placement

    stats = pixel_statistics(np.zeros((2, 48, 48, 1), np.uint8))
    parts = memory_breakdown(build_model(config_from_dict(plan.model), stats), 64)
    step = sum(parts.values())
    checkpoint = CHECKPOINT_FACTOR * (parts["weights"] + parts["optimizer_slots"])
    rows = round(28709 * 0.25)
    data = TrialOverhead().data_bytes(rows, 3589, 0.25)
    assert data == (2 * rows + 2 * 3589) * 48 * 48  # its share and tensor; val and mirror
    assert calibrated.host_mb == pytest.approx((step + runtime + checkpoint + data) / MIB)
    assert calibrated.estimated_mb == calibrated.host_mb  # a CPU worker holds it all
    assert calibrated.resources["memory"] == pytest.approx(calibrated.host_mb * MIB)
    assert calibrated.host_mb - uncalibrated.host_mb == pytest.approx(
        (runtime - DEFAULT_RUNTIME_BYTES) / MIB
    )
    # The same trial on a worker that holds its step but not the rest is downsized, not fitted.
    tight = _planner((step + runtime) / MIB, measured).place(plan).placement
    assert tight.status != "fits"


def test_on_a_gpu_worker_the_card_holds_the_step_and_host_memory_the_rest() -> None:
    from jobs.resources import GPU_MEMORY_RESOURCE, TrialOverhead, place
    from model.cnn import SEED2017, build_cnn
    from model.memory import estimate_training_memory

    model = build_cnn(SEED2017)
    step = estimate_training_memory(model, 64)
    host = TrialOverhead(200 * MIB).host_bytes(7177, 3589, 0.25)
    # A card just big enough for the step: the host side does not count against it.
    gpu = place(
        model, 64, "adam", WorkerBudget("gpu", step + MIB, "t"), 1.0, host_overhead_bytes=host
    )
    assert gpu.status == "fits" and gpu.estimated_bytes == step
    assert gpu.resources[GPU_MEMORY_RESOURCE] == math.ceil(step / MIB)
    assert gpu.resources["memory"] == float(host) and gpu.host_bytes == host
    # On a CPU worker of the same size the whole trial does not fit at batch 64.
    cpu = place(
        model, 64, "adam", WorkerBudget("cpu", step + MIB, "t"), 1.0, host_overhead_bytes=host
    )
    assert cpu.status != "fits"
    assert cpu.host_bytes == cpu.estimated_bytes


def test_a_trial_over_its_reservation_is_told_apart_host_and_card() -> None:
    from jobs.plan import TrialPlacement
    from jobs.tracking.trials import memory_over_reservation

    cpu = TrialPlacement("fits", 100.0, 100.0, 1000, {"CPU": 1, "memory": 1.0})
    assert memory_over_reservation({"peak_memory_mb": 119.0}, cpu) == ""
    assert "host: measured peak 130 MiB" in memory_over_reservation({"peak_memory_mb": 130.0}, cpu)
    gpu = TrialPlacement("fits", 100.0, 400.0, 1000, {"CPU": 1, "GPU": 0.1})
    # 300 MiB of host memory is within its 400 MiB host reservation; the card is over.
    found = memory_over_reservation({"peak_memory_mb": 300.0, "gpu_peak_memory_mb": 150.0}, gpu)
    assert found.startswith("GPU: measured peak 150 MiB") and "host" not in found
