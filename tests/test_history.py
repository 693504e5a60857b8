"""The search's history: a search starts from the explored trials of earlier ones in the store.

Earlier searches are written to a SQLite store of the test through the functions the search
uses (the parent run's `open_parent`/`log_parent`, the trials' `MLflowTrialLogger`), with
fake results and no training.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest

from conftest import sqlite_tracking
from jobs.plan import PlacedTrial, TrialPlacement
from jobs.proposals import Planner
from jobs.resources import MIB, WorkerBudget
from jobs.search.context import SearchContext, SearchData, SearchRun
from jobs.search.explore import SpacePlanMaker, _explore_searcher, remembered
from jobs.search.strategy import EXPLORE, Strategy
from jobs.settings import SearchSettings
from jobs.space import KNOWN_GOOD_CNN, NEIGHBOURS, SPACE, Space, space_digest
from jobs.space_points import point_from_config
from jobs.tracking import parent as parent_run
from jobs.tracking.trials import MLflowTrialLogger
from schema import run as layout

BUDGET = WorkerBudget("cpu", int(1e6 * MIB), "test")
DATA = {
    "source": "fer2013.csv",
    "sha256": "a" * 64,
    "data_fraction": 1.0,
    "seed": 2017,
    "train_usage": "Training",
    "val_usage": "PublicTest",
    "train_rows": 28709,
    "val_rows": 3589,
}
# A search of CNNs on 4 epochs at a quarter of the rows: ASHA's first rung is its 4th epoch.
SETTINGS = SearchSettings(families="cnn", max_epochs=4, explore_fraction=0.25, num_samples=10)
FAST = {**KNOWN_GOOD_CNN}
WIDE = {**KNOWN_GOOD_CNN, "cnn.base_filters": 64, "training.batch_size": 128}
SMALL = {**KNOWN_GOOD_CNN, "cnn.blocks": 2, "cnn.base_filters": 16, "cnn.augmentation": "none"}
SGD = {
    **{k: v for k, v in KNOWN_GOOD_CNN.items() if k != "training.learning_rate"},
    "training.optimizer": "sgd",
    "training.sgd_learning_rate": 0.05,
    "training.lr_schedule": "cosine",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store for the module (its schema takes seconds to create): each test has an
    experiment of its own in it, and the memory reads one experiment only."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture
def tracking(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Any]:
    import mlflow

    experiment = request.node.name
    client = sqlite_tracking(monkeypatch, store, experiment)
    client.create_experiment(experiment, artifact_location=(tmp_path / "artifacts").as_uri())
    yield client
    mlflow.set_tracking_uri(None)


class Recorder:
    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, placed: PlacedTrial) -> None:
        self.names.append(placed.plan.name)


def _planner() -> Planner:
    return Planner(BUDGET, 1.0, train_rows=28709, val_rows=3589)


def _placed(point: dict[str, Any], name: str, fraction: float) -> PlacedTrial:
    # As the searcher hands it over: Optuna's parameters and the space's constants (family).
    maker = SpacePlanMaker(SETTINGS.max_epochs, SETTINGS.seed, fraction)
    plan = maker({"family": "cnn", **point}, name)
    placement = TrialPlacement("fits", 100.0, 100.0, 1000, {"CPU": 1.0})
    return PlacedTrial(plan, placement, 1.0)


def _earlier_search(
    client: Any,
    tmp_path: Path,
    trials: list[tuple[str, dict[str, Any], float, int]],
    *,
    settings: SearchSettings = SETTINGS,
    data: dict[str, Any] = DATA,
    fraction: float = 0.25,
    failed: tuple[str, ...] = (),
    status: str = "FINISHED",
) -> str:
    """A parent run with one explored child per (name, point, best accuracy, epochs)."""
    experiment = parent_run.experiment_id(client)
    parent_id, tune_path, _ = parent_run.open_parent(client, experiment, settings, str(tmp_path))
    parent_run.log_parent(client, parent_id, settings, BUDGET, [], data, tune_path, None)
    logger = MLflowTrialLogger(client.tracking_uri, experiment, parent_id, data)
    for index, (name, point, accuracy, epochs) in enumerate(trials):
        config = _placed(point, name, fraction).tune_config()
        trial = SimpleNamespace(trial_id=f"{parent_id[:6]}-{index}", config=config)
        for epoch in range(1, epochs + 1):
            result = {"epoch": epoch, "val_accuracy": accuracy, "best_val_accuracy": accuracy}
            logger.on_trial_result(epoch, [], trial, result)
        error = "a trial error" if name in failed else None
        logger.finish_trial(trial.trial_id, config, None, {"epoch": epochs}, error=error)
    logger.queue.flush()
    client.set_terminated(parent_id, status)
    return parent_id


def _new_search(
    client: Any,
    tmp_path: Path,
    settings: SearchSettings = SETTINGS,
    data: dict[str, Any] = DATA,
) -> tuple[Any, str]:
    """A new search's searcher as `explore` builds it, and its parent run."""
    experiment = parent_run.experiment_id(client)
    parent_id, tune_path, _ = parent_run.open_parent(client, experiment, settings, str(tmp_path))
    parent_run.log_parent(client, parent_id, settings, BUDGET, [], data, tune_path, None)
    run = SearchRun(client.tracking_uri, experiment, parent_id, tune_path, False)
    strategy = Strategy(EXPLORE, settings.final_budget_share, "test")
    ctx = SearchContext(settings, SearchData({}, data), BUDGET, _planner(), run, 0.0, strategy)
    memory = remembered(ctx)
    return _explore_searcher(settings, _planner(), Recorder(), 3600, None, memory), parent_id


def _evaluated(searcher: Any) -> list[float]:
    study = searcher.inner._ot_study
    complete = optuna.trial.TrialState.COMPLETE
    return sorted(t.value for t in study.trials if t.state == complete)


def _first_plan(searcher: Any) -> dict[str, Any]:
    return searcher.suggest("new-0")["trial"]


def test_the_neighbours_an_earlier_search_evaluated_are_not_proposed_again(
    tracking: Any, tmp_path: Path
) -> None:
    crop = {**FAST, **NEIGHBOURS["crop"]}
    _earlier_search(tracking, tmp_path, [("cnn-fast", FAST, 0.50, 4), ("c", crop, 0.45, 4)])
    searcher, _ = _new_search(tracking, tmp_path)

    names = [searcher.suggest(f"new-{i}")["plan"] for i in range(4)]

    # The best earlier config is the known-good CNN itself: it comes first under its own name,
    # then SEED2017 (a fixed point), then the neighbours no earlier search trained.
    assert names == ["cnn-fast", "seed2017", "cnn-fast-smooth", "cnn-fast-strong"]


def test_a_search_starts_from_the_trials_of_a_finished_one(tracking: Any, tmp_path: Path) -> None:
    earlier = _earlier_search(
        tracking,
        tmp_path,
        [
            ("cnn-fast", FAST, 0.40, 4),
            ("cnn-001", WIDE, 0.52, 4),
            ("cnn-002", SMALL, 0.31, 4),
            ("cnn-003", SGD, 0.45, 4),
            ("cnn-004", SGD, 0.60, 2),  # stopped before the first rung: says little
            ("cnn-005", WIDE, 0.70, 4),  # failed
        ],
        failed=("cnn-005",),
    )
    searcher, parent_id = _new_search(tracking, tmp_path)

    # TPE is told the earlier trials as evaluated, and proposes none of them to be rerun.
    assert _evaluated(searcher) == [0.31, 0.40, 0.45, 0.52]
    # The best of them, not the hand-written CNN, is the first point trained.
    first = _first_plan(searcher)
    wide = _placed(WIDE, "x", 0.25).plan
    assert first["name"] == "cnn-remembered"
    assert first["model"] == wide.model
    assert first["training"]["batch_size"] == 128
    assert first["training"]["train_fraction"] == 0.25
    # The parent run says what it reused and from which search.
    logged = tracking.get_run(parent_id).data
    assert logged.metrics[layout.METRIC_REUSED_TRIALS] == 4
    assert logged.tags[layout.TAG_REUSED_FROM] == earlier
    best_child = logged.tags[layout.TAG_REMEMBERED_BEST]
    assert tracking.get_run(best_child).data.tags[layout.TAG_PLAN_NAME] == "cnn-001"
    listed_file = tracking.download_artifacts(parent_id, layout.REUSED_TRIALS_FILE, str(tmp_path))
    listed = json.loads(Path(listed_file).read_text())
    assert listed["reused_trials"] == 4 and listed["parents"] == [earlier]
    names = sorted(t["name"] for t in listed["trials"])
    assert names == ["cnn-001", "cnn-002", "cnn-003", "cnn-fast"]
    assert logged.params[layout.PARAM_SPACE_SHA] == space_digest(("cnn",))


def test_searches_of_several_earlier_runs_are_all_reused(tracking: Any, tmp_path: Path) -> None:
    first = _earlier_search(tracking, tmp_path, [("cnn-fast", FAST, 0.40, 4)])
    # A search that failed after exploring still taught something; a running one does not.
    failed = _earlier_search(tracking, tmp_path, [("cnn-001", SGD, 0.48, 4)], status="FAILED")
    _earlier_search(tracking, tmp_path, [("cnn-001", WIDE, 0.9, 4)], status="RUNNING")
    searcher, parent_id = _new_search(tracking, tmp_path)

    assert _evaluated(searcher) == [0.40, 0.48]
    assert tracking.get_run(parent_id).data.tags[layout.TAG_REUSED_FROM] == f"{first},{failed}"
    assert _first_plan(searcher)["training"]["optimizer"] == "sgd"


def _without_memory(searcher: Any) -> None:
    assert _evaluated(searcher) == []
    first = _first_plan(searcher)
    assert first["name"] == "cnn-fast"
    assert first["model"] == _placed(FAST, "x", 0.25).plan.model


def test_other_data_is_not_reused(tracking: Any, tmp_path: Path) -> None:
    _earlier_search(tracking, tmp_path, [("cnn-001", WIDE, 0.52, 4)])
    searcher, parent_id = _new_search(tracking, tmp_path, data={**DATA, "sha256": "b" * 64})
    _without_memory(searcher)
    assert tracking.get_run(parent_id).data.metrics[layout.METRIC_REUSED_TRIALS] == 0


def test_other_rows_of_the_same_data_are_not_reused(tracking: Any, tmp_path: Path) -> None:
    tenth = {**DATA, "data_fraction": 0.1}
    earlier = SearchSettings(**{**vars(SETTINGS), "data_fraction": 0.1})
    _earlier_search(tracking, tmp_path, [("cnn-001", WIDE, 0.52, 4)], settings=earlier, data=tenth)
    # The same share drawn with another seed is other rows.
    other_seed = SearchSettings(**{**vars(earlier), "seed": 1})
    searcher, _ = _new_search(tracking, tmp_path, other_seed, {**tenth, "seed": 1})
    _without_memory(searcher)
    searcher, _ = _new_search(tracking, tmp_path)  # every row
    _without_memory(searcher)
    searcher, _ = _new_search(tracking, tmp_path, earlier, tenth)
    assert _evaluated(searcher) == [0.52]


def test_another_space_is_not_reused(
    tracking: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _earlier_search(tracking, tmp_path, [("cnn-001", WIDE, 0.52, 4)])
    before = space_digest(("cnn",))
    # A wider batch range: the earlier trials are still points of it, but were proposed from
    # another space.
    monkeypatch.setitem(SPACE["training"], "batch_size", [32, 64, 128, 256])
    assert space_digest(("cnn",)) != before
    searcher, _ = _new_search(tracking, tmp_path)
    _without_memory(searcher)


def test_remember_false_starts_afresh(tracking: Any, tmp_path: Path) -> None:
    _earlier_search(tracking, tmp_path, [("cnn-001", WIDE, 0.52, 4)])
    settings = SearchSettings(**{**vars(SETTINGS), "remember": False})
    searcher, parent_id = _new_search(tracking, tmp_path, settings)
    _without_memory(searcher)
    assert layout.METRIC_REUSED_TRIALS not in tracking.get_run(parent_id).data.metrics


def test_another_fidelity_is_not_reused(tracking: Any, tmp_path: Path) -> None:
    _earlier_search(tracking, tmp_path, [("cnn-001", WIDE, 0.52, 4)], fraction=0.5)
    searcher, _ = _new_search(tracking, tmp_path)
    _without_memory(searcher)


def test_a_trial_on_a_cosine_rate_is_reused_only_with_the_same_max_epochs(
    tracking: Any, tmp_path: Path
) -> None:
    # Trained with max_epochs 4 (SETTINGS); the new search trains to 5, and its first rung is
    # 5 quarter-row epochs, which every earlier trial reached.
    _earlier_search(tracking, tmp_path, [("a", WIDE, 0.52, 5), ("b", SGD, 0.55, 5)])
    longer = SearchSettings(**{**vars(SETTINGS), "max_epochs": 5})

    searcher, _ = _new_search(tracking, tmp_path, longer)
    same, _ = _new_search(tracking, tmp_path)

    # SGD's cosine would have stood elsewhere at the same epoch: only the constant rate counts.
    assert _evaluated(searcher) == [0.52]
    assert _evaluated(same) == [0.52, 0.55]


@pytest.mark.parametrize("families", [("cnn",), ("dnn",), ("cnn", "dnn")])
def test_every_point_comes_back_from_the_configs_it_was_trained_with(
    families: tuple[str, ...],
) -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    space, maker = Space(families), SpacePlanMaker(30, 1, 0.25)
    for index in range(60):
        trial = study.ask()
        constants = space(trial)
        plan = maker({**trial.params, **constants}, f"p{index}")
        logged_model = json.loads(json.dumps(plan.model))  # as the params read back
        point = point_from_config(logged_model, plan.training, families)
        # The same point, at the precision the plan keeps (dropout 3 digits, rate 6).
        expected = {
            key: round(value, 3 if key.endswith("dropout") else 6)
            if isinstance(value, float)
            else value
            for key, value in trial.params.items()
        }
        assert point == expected
        study.tell(trial, 0.5)
    # A config outside the space (SEED2017's filters) is no point of it.
    from jobs.space import fixed_points

    seed2017 = next(p for p in fixed_points(("cnn",), 30, 1) if p.name == "seed2017")
    assert point_from_config(seed2017.model, seed2017.training, ("cnn",)) is None
