"""Explore: the fixed points, the known-good CNN's neighbours, then TPE's proposals, on a share of
the rows, ASHA stopping the weak.

Every proposal is placed by memory and time before Ray sees it (`jobs/proposals.py`); the
refused ones reach MLflow through the `on_refusal` callable the searcher is given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from jobs.plan import TrainingConfig, TrialPlan, placed_from_config
from jobs.proposals import PlacingSearcher, Planner, ProposalClock
from jobs.scheduling import epochs_to_reach, first_rung_images, grace_epochs
from jobs.search.context import SearchContext
from jobs.search.strategy import FIXED, search_fixed_points
from jobs.search.tune_phase import TuneSpec, fit
from jobs.settings import SearchSettings
from jobs.timing import EpochTimeCorrection
from jobs.tracking.history import Memory
from jobs.tracking.queue import drain_seconds
from jobs.tracking.refusals import RefusalRecorder
from jobs.tracking.trials import MLflowTrialLogger
from schema import run as layout

# Trials TPE waits for before it models the results (Optuna's default is 10: more than a CPU
# budget of an hour starts at all): the known-good CNN and its neighbours, where no earlier
# search evaluated them, so TPE's own proposals are modelled from the first.
TPE_STARTUP_TRIALS = 4
# An explored trial sees at least this many training rows (all of them where there are
# fewer): a quarter of the full Training split, the fidelity that ranked configs in the
# 60-minute searches; on fewer rows the explored ranking fell behind KerasTuner's on all of
# them (BENCHMARKS.md).
EXPLORE_MIN_ROWS = 7000
# The plan name of the known-good CNN as the searcher's first point, and the suffix of the
# best config of earlier searches where it takes that place.
FAST_CNN_NAME = "cnn-fast"
REMEMBERED_SUFFIX = "remembered"

log = logging.getLogger("jobs.search")


@dataclass(frozen=True)
class ExploreResult:
    """The explored trials (Tune's result grid), what the final phase picks from."""

    grid: Any  # ray.tune.ResultGrid; None where the search did not explore (it exploits)


def explore(ctx: SearchContext) -> ExploreResult:
    """Run (or resume) the explore phase within its share of the budget (none where the
    strategy exploits)."""
    if not ctx.strategy.explores:
        return ExploreResult(None)
    settings, run = ctx.settings, ctx.run
    recorder = RefusalRecorder(run.tracking_uri, run.experiment_id, run.parent_id, ctx.data.info)
    plans = list(ctx.strategy.plans) if ctx.strategy.kind == FIXED else None
    memory = remembered(ctx) if plans is None else None
    searcher = _explore_searcher(settings, ctx.planner, recorder, ctx.explore_s, plans, memory)
    logger = MLflowTrialLogger(
        run.tracking_uri,
        run.experiment_id,
        run.parent_id,
        ctx.data.info,
        time_budget_s=ctx.explore_s,
    )
    spec = TuneSpec(
        path=run.tune_path,
        searcher=searcher,
        logger=logger,
        budget_s=ctx.explore_s,
        num_samples=settings.num_samples if plans is None else len(plans),
        restore=run.resumed,
        ranked=True,
    )
    grid = fit(ctx, spec)
    recorder.queue.drain(drain_seconds())
    if run.resumed:
        # The restored trials reported to Tune's own copy of the searcher, and the trials before
        # the restart to the process that died: the final places with what they measured.
        observe_explored(grid, ctx.planner.correction)
    return ExploreResult(grid)


def observe_explored(grid: Any, correction: EpochTimeCorrection) -> None:
    """Feed `correction` with the epochs each explored trial measured against its estimate
    before any correction, as the explore searcher does while its trials report (the first
    epoch of a process, which also traces the model, left out)."""
    for result in grid:
        history = getattr(result, "metrics_dataframe", None)
        if not result.config or history is None or "epoch_seconds" not in history:
            continue
        placed = placed_from_config(result.config)
        if layout.METRIC_SETUP_SECONDS in history:
            history = history[history[layout.METRIC_SETUP_SECONDS].isna()]
        for measured in history["epoch_seconds"].dropna():
            correction.observe(placed.plan.name, placed.uncorrected_epoch_seconds, float(measured))


def remembered(ctx: SearchContext) -> Memory | None:
    """The explored trials of earlier searches this one starts from (logged on its parent run);
    None with `remember` off, or on a resumed search (its searcher comes back from Tune's
    checkpoint, already seeded)."""
    from mlflow.tracking import MlflowClient

    from jobs.space import adaptive_families, parse_families, space_digest
    from jobs.tracking.history import MemoryQuery, log_memory, recall

    settings, run = ctx.settings, ctx.run
    if not settings.remember or run.resumed:
        return None
    families = parse_families(settings.families)
    query = MemoryQuery(
        experiment_id=run.experiment_id,
        parent_run_id=run.parent_id,
        data_info=ctx.data.info,
        space_sha256=space_digest(families),
        families=adaptive_families(families),
        train_fraction=settings.explore_fraction,
        # The first rung, in epochs of the explored share of the rows.
        min_epochs=epochs_to_reach(
            first_rung_images(settings, ctx.data.train_rows),
            ctx.planner.rows(settings.explore_fraction),
        ),
        max_epochs=settings.max_epochs,
    )
    client = MlflowClient(run.tracking_uri)
    try:
        memory = recall(client, query)
        log_memory(client, run.parent_id, memory)
    except Exception as error:  # the memory saves time; a search does not need it to run
        log.warning("could not read earlier searches from the tracking store: %s", error)
        return None
    if memory.best is not None:
        log.info(
            "memory: %d explored trials of %d earlier searches; first point %s (%.3f)",
            len(memory.trials),
            len(memory.parents),
            memory.best.name,
            memory.best.best_val_accuracy,
        )
    return memory


def _given(plans: list[TrialPlan], precision: str) -> list[TrialPlan]:
    """Given plans, at the search's precision where theirs is "auto"."""
    return [
        replace(p, training=replace(p.training, precision=precision))
        if p.training.precision == "auto"
        else p
        for p in plans
    ]


def explore_fraction(settings: SearchSettings, train_rows: int) -> float:
    """The share of the training rows an explored trial sees: `explore_fraction`, raised to
    EXPLORE_MIN_ROWS rows (every row where there are fewer)."""
    if train_rows <= 0:
        return settings.explore_fraction
    return max(settings.explore_fraction, min(1.0, EXPLORE_MIN_ROWS / train_rows))


def plan_trials(
    settings: SearchSettings, budget: Any, plans: list[TrialPlan] | None = None
) -> list[dict[str, Any]]:
    """Place the fixed points (or `plans`) on `budget`: entries {"plan", "placement"}.

    What the search launches first, and what its parent run's `search/space.json` lists.
    """
    if plans is None:
        plans = search_fixed_points(settings, settings.explore_fraction)[: settings.num_samples]
    planner = Planner(budget, settings.cpus_per_trial, 1, 0)
    entries = []
    for plan in _given(plans, settings.precision):
        placed = planner.place(plan)
        entries.append({"plan": placed.plan.to_dict(), "placement": placed.placement.to_dict()})
    return entries


def _explore_searcher(
    settings: SearchSettings,
    planner: Planner,
    on_refusal: Any,
    budget_s: float,
    plans: list[TrialPlan] | None,
    memory: Memory | None = None,
) -> PlacingSearcher:
    """Fixed points first (the known-good CNN, or with `memory` the best config of earlier
    searches, as the model-based searcher's first point), then TPE's proposals, TPE told the
    trials in `memory` as evaluated; or exactly `plans`, in order (benchmarks comparing fixed
    configs)."""
    import optuna

    from jobs.space import Space, adaptive_families, parse_families

    clock = ProposalClock(budget_s)
    if plans is not None:
        return PlacingSearcher(
            planner,
            _given(plans, settings.precision),
            on_refusal,
            clock,
            grace_epochs=grace_epochs(settings, 1.0),
        )
    common = {"grace_epochs": grace_epochs(settings, settings.explore_fraction, planner.train_rows)}
    families = parse_families(settings.families)
    queue: list[TrialPlan | None] = []
    for plan in search_fixed_points(settings, settings.explore_fraction):
        # The known-good CNN is a point of the space: the model-based searcher runs it first.
        queue.append(None if plan.name == FAST_CNN_NAME else plan)
    searched = adaptive_families(families)
    points, names = _first_points(searched, memory)
    inner = RememberingOptunaSearch(
        space=Space(searched),
        metric="best_val_accuracy",
        mode="max",
        points_to_evaluate=points,
        sampler=optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=TPE_STARTUP_TRIALS),
        evaluated=[(t.point, t.best_val_accuracy) for t in memory.trials] if memory else [],
    )
    return PlacingSearcher(
        planner,
        queue[: settings.num_samples],
        on_refusal,
        clock,
        inner=inner,
        inner_names=names,
        make_plan=SpacePlanMaker(
            settings.max_epochs, settings.seed, settings.explore_fraction, settings.precision
        ),
        **common,
    )


def _first_points(
    searched: tuple[str, ...], memory: Memory | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The model-based searcher's first points and their plan names: the best config of earlier
    searches where there is one, else the known-good CNN (where CNNs are searched); then its
    neighbours (`jobs.space.NEIGHBOURS`) that no earlier search evaluated."""
    from jobs.space import fast_cnn_point, neighbours

    known_good = fast_cnn_point(searched)
    best = memory.best if memory is not None else None
    if best is not None:
        first = dict(best.point)
        name = FAST_CNN_NAME
        if best.point != known_good:
            name = f"{first.get('family', searched[0])}-{REMEMBERED_SUFFIX}"
    elif "cnn" in searched:
        first, name = known_good, FAST_CNN_NAME
    else:
        return [], []
    evaluated = [trial.point for trial in memory.trials] if memory is not None else []
    near = [(suffix, point) for suffix, point in neighbours(first) if point not in evaluated]
    points = [first, *(point for _, point in near)]
    return points, [name, *(f"{name}-{suffix}" for suffix, _ in near)]


class RememberingOptunaSearch(OptunaSearch):
    """Ray Tune's `OptunaSearch` over our define-by-run space that also takes trials already
    evaluated (Ray's own `evaluated_rewards` refuses a define-by-run space): each is added to
    the study as a complete trial, so TPE models it from the start instead of running it."""

    def __init__(self, *args: Any, evaluated: list[tuple[dict[str, Any], float]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        for point, value in evaluated:
            self.add_evaluated_point(point, value)

    def add_evaluated_point(
        self,
        parameters: dict[str, Any],
        value: float,
        error: bool = False,
        pruned: bool = False,
        intermediate_values: list[float] | None = None,
    ) -> None:
        import optuna

        from jobs.space_points import point_distributions

        state = optuna.trial.TrialState
        status = state.FAIL if error else state.PRUNED if pruned else state.COMPLETE
        trial = optuna.trial.create_trial(
            state=status,
            value=value if status == state.COMPLETE else None,
            params=parameters,
            distributions=point_distributions(parameters, self._space.families),
            intermediate_values=dict(enumerate(intermediate_values or [])),
        )
        self._ot_study.add_trial(trial)


class SpacePlanMaker:
    """Turns a point of the space into a trial plan (picklable: the searcher is checkpointed)."""

    def __init__(
        self, max_epochs: int, seed: int, train_fraction: float, precision: str = "auto"
    ) -> None:
        self.max_epochs = max_epochs
        self.seed = seed
        self.train_fraction = train_fraction
        self.precision = precision

    def __call__(self, params: dict[str, Any], name: str) -> TrialPlan:
        from jobs.space import model_from_params, training_from_params
        from model.configs import config_to_dict

        training = training_from_params(params, self.max_epochs, self.seed)
        training.update(train_fraction=self.train_fraction, precision=self.precision)
        return TrialPlan(
            name, config_to_dict(model_from_params(params)), TrainingConfig.from_dict(training)
        )
