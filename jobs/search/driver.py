"""The search, phase by phase: prepare data, calibrate, explore, final, ensemble, register.

Each phase is one module with one public function that takes the frozen `SearchContext` (and
the result of the phase before) and returns a frozen result; `run_search` only calls them in
order and marks the parent run FINISHED or FAILED.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from jobs.data import prepare_arrays, resolve_data
from jobs.proposals import Planner
from jobs.search.calibrate import _calibrate
from jobs.search.context import (
    SearchContext,
    SearchData,
    SearchRun,
    init_ray,
    resolve_storage,
    slots,
)
from jobs.search.ensemble import ensemble
from jobs.search.explore import EXPLORE_MIN_ROWS, explore, explore_fraction, plan_trials
from jobs.search.final import final
from jobs.search.register import Champion, register
from jobs.search.strategy import FIXED, Strategy, best_known_plan, decide
from jobs.search.summary import Summary, summarise
from jobs.settings import SearchSettings

log = logging.getLogger("jobs.search")


@dataclass(frozen=True)
class SearchResult:
    """What a search returns: its parent run, best trial, champion and what it cost."""

    parent_run_id: str
    best_run_id: str | None
    best_val_accuracy: float | None
    tune_path: str
    champion_run_id: str | None = None  # the ensemble's run when it is champion, else best
    ensemble_note: str = ""  # why the search has no ensemble, when building it failed
    trials: tuple[dict[str, Any], ...] = ()
    refused: tuple[str, ...] = ()
    wall_seconds: float = 0.0
    strategy: str = ""  # what the search did with its budget and why, in words


def run_search(settings: SearchSettings, strategy: Strategy | None = None) -> SearchResult:
    """Run (or resume) one search; returns the parent run, the best child and its accuracy.

    The strategy (explore or exploit) is decided from the calibration and the budget unless
    one is given (`Strategy.fixed(plans)`: exactly these plans, compared side by side).
    """
    from jobs.cli import configure_s3_retries
    from jobs.tracking.queue import quick_failing_client_env

    started = time.time()
    quick_failing_client_env()
    configure_s3_retries()  # also for callers that bypass the CLI (tests, benchmarks)
    settings, data, planner = _prepare(settings)
    if strategy is None:
        strategy = _decide(settings, planner)
    run = open_run(settings, planner.budget, data, planner.calibration, strategy)
    if run.resumed:
        strategy = resumed_strategy(run, strategy)
    ctx = SearchContext(settings, data, planner.budget, planner, run, started, strategy)
    try:
        explored = explore(ctx)
        final(ctx, explored)
        ensembled = ensemble(ctx)
        summary = summarise(ctx)
        champion = register(ctx, summary, ensembled)
        close_run(run, "FINISHED")
    except BaseException:
        close_run(run, "FAILED")
        raise
    result = _result(run, champion, summary, ensembled.note, time.time() - started)
    return dataclasses.replace(result, strategy=f"{strategy.kind}: {strategy.reason}")


def strategy_for(settings: SearchSettings) -> Strategy:
    """The strategy a search of `settings` would take on this machine now (it loads the data,
    starts Ray and calibrates): what a benchmark sizes a budget from (bench/)."""
    settings, _, planner = _prepare(settings)
    return _decide(settings, planner)


def _prepare(settings: SearchSettings) -> tuple[SearchSettings, SearchData, Planner]:
    """The data (its errors surface before any run or Ray), Ray, the worker budget and the
    calibration, as the planner every phase places trials with."""
    settings, data = prepare_data(settings)
    init_ray(backend=settings.backend)
    budget = worker_budget(settings)
    calibration = _calibrate(budget, settings.cpus_per_trial)
    planner = Planner(budget, settings.cpus_per_trial, data.train_rows, data.val_rows, calibration)
    return settings, data, planner


def _decide(settings: SearchSettings, planner: Planner) -> Strategy:
    return decide(settings, planner, best_known_plan(settings), slots(settings.cpus_per_trial))


def prepare_data(settings: SearchSettings) -> tuple[SearchSettings, SearchData]:
    """Load the data once; the settings with the explore fraction the trials will see."""
    data = resolve_data(settings.data)
    arrays, info = prepare_arrays(data, settings.data_fraction, settings.seed)
    log.info(
        "data: %s (%d train / %d val rows, sha256 %s…)",
        data,
        info["train_rows"],
        info["val_rows"],
        info["sha256"][:12],
    )
    fraction = explore_fraction(settings, int(info["train_rows"]))
    if fraction != settings.explore_fraction:
        log.info(
            "explore_fraction %.3g -> %.3g: an explored trial sees at least %d of the %d "
            "training rows",
            settings.explore_fraction,
            fraction,
            min(EXPLORE_MIN_ROWS, info["train_rows"]),
            info["train_rows"],
        )
        # The effective share is what the trials, ASHA and the parent run's params see.
        settings = dataclasses.replace(settings, explore_fraction=fraction)
    return settings, SearchData(arrays, info)


def worker_budget(settings: SearchSettings) -> Any:
    """The memory one trial may use on the cluster's workers (jobs/resources.py)."""
    import ray

    from jobs.resources import budget_from_nodes

    budget = budget_from_nodes(ray.nodes(), settings.worker_memory_gb)
    log.info("worker budget: %s", budget.describe())
    return budget


def open_run(
    settings: SearchSettings,
    budget: Any,
    data: SearchData,
    calibration: Any,
    strategy: Strategy,
) -> SearchRun:
    """The parent run (an earlier one on resume) and, for a new search, what it plans and the
    strategy it chose."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from jobs.tracking import parent as parent_run

    client = MlflowClient()
    experiment_id = parent_run.experiment_id(client)
    storage = resolve_storage(settings.storage)
    parent_id, tune_path, resumed = parent_run.open_parent(client, experiment_id, settings, storage)
    if not resumed:
        plans = list(strategy.plans) if strategy.kind == FIXED else None
        planned = plan_trials(settings, budget, plans)
        parent_run.log_parent(
            client, parent_id, settings, budget, planned, data.info, tune_path, calibration
        )
        parent_run.log_strategy(client, parent_id, strategy.params(), strategy.reason)
    return SearchRun(mlflow.get_tracking_uri(), experiment_id, parent_id, tune_path, resumed)


def resumed_strategy(run: SearchRun, decided: Strategy) -> Strategy:
    """A resumed search keeps the strategy its parent run recorded (a new calibration must not
    turn an explored search into an exploiting one halfway)."""
    from mlflow.tracking import MlflowClient

    from schema import run as layout

    params = MlflowClient(run.tracking_uri).get_run(run.parent_id).data.params
    kind = params.get(layout.PARAM_STRATEGY)
    if kind is None or kind == decided.kind:
        return decided
    share = float(params.get(layout.PARAM_STRATEGY_FINAL_SHARE, decided.final_share))
    log.info("resume: the search keeps its recorded strategy %s", kind)
    return dataclasses.replace(decided, kind=kind, final_share=share, reason="as recorded")


def close_run(run: SearchRun, status: str) -> None:
    """End the parent run; a failure to mark it FAILED is logged, not raised over the cause."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(run.tracking_uri)
    if status == "FINISHED":
        client.set_terminated(run.parent_id, status)
        return
    try:
        client.set_terminated(run.parent_id, status)
    except Exception as error:
        log.error("could not mark the parent run FAILED: %s", error)


def _result(
    run: SearchRun, champion: Champion, summary: Summary, note: str, seconds: float
) -> SearchResult:
    result = SearchResult(
        parent_run_id=run.parent_id,
        best_run_id=champion.best_run_id,
        best_val_accuracy=champion.best_val_accuracy,
        tune_path=run.tune_path,
        champion_run_id=champion.champion_run_id,
        ensemble_note=note,
        trials=summary.trials,
        refused=summary.refused,
        wall_seconds=seconds,
    )
    if champion.best_run_id:
        log.info(
            "search done in %.0f s: best trial %s at val_accuracy %.3f; champion %s (%s)",
            seconds,
            champion.best_run_id,
            champion.best_val_accuracy,
            champion.champion_run_id,
            champion.kind,
        )
    return result
