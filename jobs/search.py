"""The Tune driver: propose and place trials, run them, train the best to the end, track it all.

    python -m jobs.search --data fer2013.csv.gz --num-samples 4 --max-epochs 2 --data-fraction 0.03

A search has two phases inside its time budget. **Explore**: the fixed points, then what
Optuna's TPE (through Ray Tune's `OptunaSearch`) proposes from the results so far, each trial on
`explore_fraction` of the training rows, ASHA stopping the weak ones; every proposal is placed
by memory and time before Ray sees it (`jobs/proposals.py`). **Final**: the last
`final_budget_share` of the budget trains the best explored configs on every row, on a cosine
schedule sized to end with the budget. `run_search(settings)` is the typed entry point; `main()`
is a thin CLI over it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from jobs import parent as parent_run
from jobs.ensemble import EnsembleOutcome
from jobs.ensemble import build_and_log as build_ensemble
from jobs.parent import SearchResult
from jobs.proposals import (
    FINAL,
    SETUP_SECONDS,
    PlacingSearcher,
    Planner,
    ProposalClock,
    RefusalRecorder,
    TrialPlan,
    placed_from_config,
)
from jobs.settings import DATA_HELP, SearchSettings, add_arguments, from_namespace
from schema import run as layout

log = logging.getLogger("jobs.search")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRACKING_DRAIN_S = float(os.environ.get("FER_TRACKING_DRAIN_S", "120"))
# Trial processes: quiet TF. No MALLOC_MMAP_THRESHOLD_: a fixed 1 MiB threshold kept resident
# memory near the live peak but made every activation an mmap/munmap pair, and CPU training
# took 1.7x as long (116 s vs 66 s for the same 3 epochs; BENCHMARKS.md, "Trial overhead").
TRIAL_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}
# Tune's cap on trials waiting for resources (read when a Tuner starts; see _trials_in_plan_order).
PENDING_TRIALS_ENV = "TUNE_MAX_PENDING_TRIALS_PG"
FINAL_SUFFIX = "-final"
# TPE's random start-up proposals before it models the results (Optuna's default is 10: more
# than a CPU budget of an hour starts at all).
TPE_STARTUP_TRIALS = 4
# The final trials' epochs fill this share of the time left. They plan their epochs on their
# measured epoch time (jobs/training.py, `time_budget_s`), so the rest is a margin for the
# last epoch's spread and the ensemble; at 0.92 with epochs planned on the estimate alone, the
# finals ended 3-5 minutes before a 60-minute budget (2026-12-04, BENCHMARKS.md).
FINAL_FILL = 0.95
# A final slot goes to another config only within this of the best explored accuracy.
FINAL_MAX_GAP = 0.05
MAX_CALIBRATION_COPIES = 4
# An explored trial sees at least this many training rows (all of them where there are
# fewer): a quarter of the full Training split, the fidelity that ranked configs in the
# 60-minute searches. On 20 % of the data a quarter is 1,435 rows, and the search explored on
# them to a best of 0.414 where KerasTuner, on all 5,742, reached 0.446 (2026-12-04,
# BENCHMARKS.md).
EXPLORE_MIN_ROWS = 7000

__all__ = ["SearchResult", "init_ray", "plan_trials", "prepare_arrays", "run_search"]


def resolve_data(source: str) -> str:
    """Absolute local path (or the URI unchanged); a clear error where the file is missing."""
    if source.startswith("s3://"):
        return source
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = (Path.cwd() / path).resolve()
    if not path.exists():
        raise FileNotFoundError(
            f"data: {path} does not exist. {DATA_HELP} Then pass -P data=/path/to/fer2013.csv "
            f"(or --data), or set it to an s3:// URI."
        )
    return str(path)


def resolve_storage(storage: str) -> str:
    if "://" in storage:
        return storage.rstrip("/")
    path = Path(storage).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    return str(path.resolve())


def prepare_arrays(data: str, fraction: float, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load, subset and split once in the driver; trials get the arrays via the object store."""
    from model.data import load_fer2013
    from model.preprocessing import pixel_statistics

    dataset = load_fer2013(data)
    subset = dataset.subset(fraction, seed) if fraction < 1.0 else dataset
    x_train, y_train = subset.split("Training")
    x_val, y_val = subset.split("PublicTest")
    mean, variance = pixel_statistics(x_train)
    arrays = {
        "x_train": x_train,
        "y_train": y_train,
        "x_val": x_val,
        "y_val": y_val,
        "mean": mean,
        "variance": variance,
    }
    info = {
        "source": data,
        "sha256": dataset.sha256,
        "data_fraction": fraction,
        "seed": seed,
        "train_usage": "Training",
        "val_usage": "PublicTest",
        "train_rows": int(len(y_train)),
        "val_rows": int(len(y_val)),
    }
    return arrays, info


def init_ray(num_cpus: int | None = None, backend: str = "tensorflow") -> None:
    import ray

    if ray.is_initialized():
        if backend != "tensorflow":
            log.warning("Ray was started elsewhere: trials use its workers' KERAS_BACKEND")
        return
    trial_env = {**TRIAL_ENV, "KERAS_BACKEND": backend}  # set before a trial imports Keras
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster: ship the code (workers may not have this checkout).
        runtime_env = {
            "working_dir": str(PROJECT_ROOT),
            "excludes": [
                ".venv",
                ".git",
                "/data",  # the data set beside the project, not the model/data package
                "tune_results",
                "mlruns",
                "*.db",
                "bench/results",
                ".stack",
            ],
            "env_vars": trial_env,
        }
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"env_vars": {**trial_env, "PYTHONPATH": str(PROJECT_ROOT)}},
        )


def _plans(
    dicts: list[dict[str, Any]], train_fraction: float, precision: str = "auto"
) -> list[TrialPlan]:
    return [
        TrialPlan(
            p["name"],
            p["model"],
            {"train_fraction": train_fraction, "precision": precision, **p["training"]},
        )
        for p in dicts
    ]


def explore_fraction(settings: SearchSettings, train_rows: int) -> float:
    """The share of the training rows an explored trial sees: `explore_fraction`, raised to
    EXPLORE_MIN_ROWS rows (every row where there are fewer)."""
    if train_rows <= 0:
        return settings.explore_fraction
    return max(settings.explore_fraction, min(1.0, EXPLORE_MIN_ROWS / train_rows))


def plan_trials(
    settings: SearchSettings, budget: Any, plans: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Place the fixed points (or `plans`) on `budget`: entries {"plan", "placement"}.

    What the search launches first, and what its parent run's `search/space.json` lists.
    """
    from jobs.space import fixed_points, parse_families

    if plans is None:
        fixed = fixed_points(parse_families(settings.families), settings.max_epochs, settings.seed)
        plans = fixed[: settings.num_samples]
        fraction = settings.explore_fraction
    else:
        fraction = 1.0
    planner = Planner(budget, settings.cpus_per_trial, 1, 0)
    entries = []
    for plan in _plans(plans, fraction, settings.precision):
        placed = planner.place(plan)
        entries.append({"plan": placed.plan.to_dict(), "placement": placed.placement})
    return entries


def _trial_resources(config: dict[str, Any]) -> Any:
    """One bundle with the planned resources (and label selector, where it has one)."""
    from ray.tune.execution.placement_groups import PlacementGroupFactory

    from jobs.trial import plan_of

    trial = plan_of(config)
    selector = trial.get("label_selector")
    if selector:
        return PlacementGroupFactory([trial["resources"]], bundle_label_selector=[selector])
    return PlacementGroupFactory([trial["resources"]])


def _calibrate(budget: Any, cpus: float) -> Any:
    """The worker's throughput on the reference CNN, or None (no time estimates) if it fails:
    a search without time estimates still runs."""
    from jobs.timing import calibrate

    resources = {"CPU": cpus, "GPU": 0.25 if budget.kind == "gpu" else 0.0}
    try:
        # As many at once as trials will run at once (a few at most: it is a sample).
        calibration = calibrate(resources, copies=min(_slots(cpus), MAX_CALIBRATION_COPIES))
    except Exception as error:  # a worker that cannot run the probe must not stop the search
        log.warning("calibration failed, no time estimates: %s", error)
        return None
    log.info(
        "calibration: reference CNN %.0f images/s on %d thread(s)",
        calibration.reference_images_per_second,
        calibration.threads,
    )
    return calibration


def _explore_searcher(
    settings: SearchSettings,
    planner: Planner,
    recorder: RefusalRecorder,
    budget_s: float,
    plans: list[dict[str, Any]] | None,
) -> PlacingSearcher:
    """Fixed points first (the known-good CNN as the model-based searcher's first point), then
    TPE's proposals; or exactly `plans`, in order (benchmarks comparing fixed configs)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from jobs.space import (
        Space,
        adaptive_families,
        fast_cnn_point,
        fixed_points,
        parse_families,
    )

    clock = ProposalClock(budget_s)
    if plans is not None:
        fixed_plans = _plans(plans, 1.0, settings.precision)
        return PlacingSearcher(
            planner, fixed_plans, recorder, clock, grace_epochs=grace_epochs(settings, 1.0)
        )
    common = {"grace_epochs": grace_epochs(settings, settings.explore_fraction)}
    families = parse_families(settings.families)
    fixed = fixed_points(families, settings.max_epochs, settings.seed)
    queue: list[TrialPlan | None] = []
    for plan in _plans(fixed, settings.explore_fraction, settings.precision):
        # The known-good CNN is a point of the space: the model-based searcher runs it first.
        queue.append(None if plan.name == "cnn-fast" else plan)
    searched = adaptive_families(families)
    points = [fast_cnn_point(searched)] if "cnn" in searched else []
    inner = OptunaSearch(
        space=Space(searched),
        metric="best_val_accuracy",
        mode="max",
        points_to_evaluate=points,
        sampler=optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=TPE_STARTUP_TRIALS),
    )
    return PlacingSearcher(
        planner,
        queue[: settings.num_samples],
        recorder,
        clock,
        inner=inner,
        inner_names=["cnn-fast"] if points else [],
        make_plan=SpacePlanMaker(
            settings.max_epochs, settings.seed, settings.explore_fraction, settings.precision
        ),
        **common,
    )


def grace_epochs(settings: SearchSettings, train_fraction: float) -> int:
    """ASHA's first rung in epochs of `train_fraction` of the rows: `grace_epochs` full-data
    epochs' worth of images (a quarter of the rows takes four times the epochs to see as many
    images, and a CNN needs that many before it ranks above a DNN)."""
    epochs = math.ceil(settings.grace_epochs / train_fraction - 1e-9)
    return max(1, min(epochs, settings.max_epochs))


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
        training["train_fraction"] = self.train_fraction
        training["precision"] = self.precision
        return TrialPlan(name, config_to_dict(model_from_params(params)), training)


def final_plans(
    settings: SearchSettings, grid: Any, planner: Planner, seconds_left: float, slots: int
) -> list[TrialPlan]:
    """The best explored configs go on from their explored weights, on every row, for as many
    epochs as fit in the time left (planned again after each epoch on its measured time), on a
    cosine schedule that ends on the last of them.

    The slots go to distinct configs within FINAL_MAX_GAP of the best; a slot left over trains
    the best config again with another shuffle seed (a second model of the best config is
    worth more than a config ten points worse).
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
    ranked.sort(key=lambda pair: -pair[0])
    wanted = min(settings.final_trials, slots)
    picks: list[tuple[Any, int]] = []  # (explored result, copy number)
    seen: set[str] = set()
    for accuracy, result in ranked:
        explored = placed_from_config(result.config)
        key = json.dumps([explored.plan.model, _without_fidelity(explored.plan.training)])
        if len(picks) < wanted and key not in seen and accuracy >= ranked[0][0] - FINAL_MAX_GAP:
            seen.add(key)
            picks.append((result, 0))
    while picks and len(picks) < wanted:
        picks.append((picks[0][0], len(picks)))
    chosen = []
    for result, copy in picks:
        plan = _final_plan(settings, result, copy, planner, seconds_left)
        if plan is not None:
            chosen.append(plan)
    return chosen


def _final_plan(
    settings: SearchSettings, result: Any, copy: int, planner: Planner, seconds_left: float
) -> TrialPlan | None:
    explored = placed_from_config(result.config)
    measured = float(result.metrics.get("epoch_seconds", 0.0))
    training = {
        **explored.plan.training,
        "train_fraction": 1.0,
        "lr_schedule": "cosine",
        "max_epochs": settings.max_epochs,
        "seed": int(explored.plan.training["seed"]) + copy,
    }
    full = planner.place(TrialPlan(explored.plan.name, explored.plan.model, training, FINAL))
    # What the explored trial measured corrects the estimate (same worker kind, same load).
    estimated = explored.estimated_epoch_seconds
    ratio = measured / estimated if estimated > 0 and measured > 0 else 1.0
    per_epoch = full.estimated_epoch_seconds * min(max(ratio, 0.5), 2.0)
    budget_s = seconds_left * FINAL_FILL - SETUP_SECONDS
    epochs = settings.max_epochs
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
    warm = _checkpoint_uri(result.checkpoint)
    return TrialPlan(
        name,
        explored.plan.model,
        # The estimate decides whether an epoch fits; the trial plans the rest on its clock.
        {**training, "time_budget_s": round(budget_s, 1)},
        FINAL,
        warm,
        explored.plan.name,
    )


def _checkpoint_uri(checkpoint: Any) -> str:
    """Where a Tune checkpoint lives, as a path or URI a trial can open ("" if none)."""
    if checkpoint is None:
        return ""
    filesystem = getattr(checkpoint, "filesystem", None)
    kind = getattr(filesystem, "type_name", "local") if filesystem is not None else "local"
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def _without_fidelity(training: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in training.items()
        if k not in ("train_fraction", "max_epochs", "micro_batch_size", "time_budget_s")
    }


def _local_concurrency(cpus_per_trial: float) -> int | None:
    """On a local Ray, no more trials than run at once: Tune asks the searcher for a trial
    only when one can start, so the time check sees the time it will really have (a trial
    proposed while two others ran waited 9 minutes, then could not reach its first rung:
    2026-12-03 budget search). A cluster (RAY_ADDRESS) keeps Tune's default: its autoscaler
    adds workers for the trials that wait."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    return _slots(cpus_per_trial)


def _slots(cpus_per_trial: float) -> int:
    """How many trials run at once on the cluster's CPUs."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1, int(cpus // max(cpus_per_trial, 1e-9)))


def run_search(
    settings: SearchSettings,
    plans: list[dict[str, Any]] | None = None,
) -> SearchResult:
    """Run (or resume) one search; returns the parent run, the best child and its accuracy.

    `plans` replaces the adaptive search by exactly these plans, in order, with no final
    phase (benchmarks compare fixed configs).
    """
    import mlflow
    import ray
    from mlflow.tracking import MlflowClient

    from jobs.cli import configure_s3_retries
    from jobs.resources import budget_from_nodes
    from jobs.tracking import MLflowTrialLogger, quick_failing_client_env

    started = time.time()
    quick_failing_client_env()
    configure_s3_retries()  # also for callers that bypass the CLI (tests, benchmarks)
    data = resolve_data(settings.data)
    storage = resolve_storage(settings.storage)
    # Data errors surface here, before any run or Ray process exists.
    arrays, data_info = prepare_arrays(data, settings.data_fraction, settings.seed)
    log.info(
        "data: %s (%d train / %d val rows, sha256 %s…)",
        data,
        data_info["train_rows"],
        data_info["val_rows"],
        data_info["sha256"][:12],
    )

    fraction = explore_fraction(settings, int(data_info["train_rows"]))
    if fraction != settings.explore_fraction:
        log.info(
            "explore_fraction %.3g -> %.3g: an explored trial sees at least %d of the %d "
            "training rows",
            settings.explore_fraction,
            fraction,
            min(EXPLORE_MIN_ROWS, data_info["train_rows"]),
            data_info["train_rows"],
        )
        # The effective share is what the trials, ASHA and the parent run's params see.
        settings = dataclasses.replace(settings, explore_fraction=fraction)

    init_ray(backend=settings.backend)
    budget = budget_from_nodes(ray.nodes(), settings.worker_memory_gb)
    log.info("worker budget: %s", budget.describe())
    calibration = _calibrate(budget, settings.cpus_per_trial)
    planner = Planner(
        budget,
        settings.cpus_per_trial,
        data_info["train_rows"],
        data_info["val_rows"],
        calibration,
    )

    client = MlflowClient()
    tracking_uri = mlflow.get_tracking_uri()
    experiment_id = parent_run.experiment_id(client)
    parent_id, tune_path, resumed = parent_run.open_parent(client, experiment_id, settings, storage)
    if not resumed:
        planned = plan_trials(settings, budget, plans)
        parent_run.log_parent(
            client, parent_id, settings, budget, planned, data_info, tune_path, calibration
        )

    total_s = settings.time_budget_min * 60
    final_share = settings.final_budget_share if plans is None else 0.0
    explore_s = total_s * (1 - final_share)
    result = SearchResult(parent_id, None, None, tune_path)
    try:
        recorder = RefusalRecorder(tracking_uri, experiment_id, parent_id, data_info)
        searcher = _explore_searcher(settings, planner, recorder, explore_s, plans)
        logger = MLflowTrialLogger(
            tracking_uri, experiment_id, parent_id, data_info, time_budget_s=explore_s
        )
        grid = _fit(
            settings,
            arrays,
            tune_path,
            logger,
            searcher,
            explore_s,
            num_samples=settings.num_samples if plans is None else len(plans),
            restore=resumed,
            ranked_fraction=settings.explore_fraction if plans is None else 1.0,
        )
        recorder.queue.drain(TRACKING_DRAIN_S)
        if final_share > 0:
            # A resumed search cannot tell how long it was down: its final gets its share.
            left = final_share * total_s if resumed else total_s - (time.time() - started)
            _final_phase(
                settings,
                arrays,
                tune_path,
                grid,
                planner,
                recorder,
                data_info,
                left,
                resumed,
                (tracking_uri, experiment_id, parent_id),
            )
        outcome = _ensemble(
            client, experiment_id, parent_id, arrays, data_info, settings.seed, result
        )
        parent_run.finalise(client, parent_id, settings, result, outcome)
        client.set_terminated(parent_id, "FINISHED")
    except BaseException:
        try:
            client.set_terminated(parent_id, "FAILED")
        except Exception as error:
            log.error("could not mark the parent run FAILED: %s", error)
        raise
    result.wall_seconds = time.time() - started
    return result


def _ensemble(
    client: Any,
    experiment_id: str,
    parent_id: str,
    arrays: dict[str, Any],
    data_info: dict[str, Any],
    seed: int,
    result: SearchResult,
) -> EnsembleOutcome | None:
    """The ensemble of the finished trials (jobs/ensemble.py); a failure leaves the best single
    model champion and never fails the search."""
    try:
        return build_ensemble(
            client,
            experiment_id,
            parent_id,
            parent_run.children(client, parent_id),
            arrays["x_val"],
            arrays["y_val"],
            data_info,
            seed,
        )
    except Exception as error:
        log.exception("ensemble: not built (%s); the champion is the best single model", error)
        result.ensemble_note = f"no ensemble: {error}"[:2000]
        return None


def _final_phase(
    settings: SearchSettings,
    arrays: dict[str, Any],
    tune_path: str,
    grid: Any,
    planner: Planner,
    recorder: RefusalRecorder,
    data_info: dict[str, Any],
    seconds_left: float,
    resumed: bool,
    tracking: tuple[str, str, str],
) -> None:
    from ray import tune

    from jobs.tracking import MLflowTrialLogger

    final_path = tune_path + FINAL_SUFFIX
    restore = resumed and tune.Tuner.can_restore(final_path)
    plans = (
        []
        if restore
        else final_plans(settings, grid, planner, seconds_left, _slots(settings.cpus_per_trial))
    )
    if not restore and not plans:
        log.info("final: nothing to train (%.0f s left)", seconds_left)
        return
    log.info(
        "final: %s in %.0f s",
        ", ".join(p.name for p in plans) or "resumed",
        seconds_left,
    )
    searcher = PlacingSearcher(
        planner, list(plans), recorder, ProposalClock(seconds_left), grace_epochs=1
    )
    tracking_uri, experiment_id, parent_id = tracking
    logger = MLflowTrialLogger(
        tracking_uri, experiment_id, parent_id, data_info, time_budget_s=seconds_left
    )
    _fit(
        settings,
        arrays,
        final_path,
        logger,
        searcher,
        seconds_left,
        num_samples=max(1, len(plans)),
        restore=restore,
        ranked_fraction=None,
    )
    recorder.queue.drain(TRACKING_DRAIN_S)


def _fit(
    settings: SearchSettings,
    arrays: dict[str, Any],
    tune_path: str,
    logger: Any,
    searcher: PlacingSearcher,
    budget_s: float,
    *,
    num_samples: int,
    restore: bool,
    ranked_fraction: float | None,
) -> Any:
    """One Tune run (a phase of the search): new, or restored from `tune_path`.

    `ranked_fraction`: ASHA stops the weak trials among those on this share of the rows
    (`jobs/scheduling.py`); None: every trial runs to its end (the final phase).
    """
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from jobs.restore import CheckpointRepair
    from jobs.scheduling import SameFidelityASHA
    from jobs.space import UNRANKED_POINTS
    from jobs.trial import sweep_workdirs, train_trial

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, data=arrays), resources=_trial_resources
    )
    if restore:
        # The searcher, the callback and the trials come back from the experiment state.
        tuner = tune.Tuner.restore(
            tune_path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        storage, name = tune_path.rsplit("/", 1)
        trial_scheduler: Any = FIFOScheduler()
        if ranked_fraction is not None:
            trial_scheduler = SameFidelityASHA(
                ranked_fraction,
                UNRANKED_POINTS,
                metric="val_accuracy",
                mode="max",
                time_attr="training_iteration",
                max_t=settings.max_epochs,
                grace_period=searcher.grace_epochs,
                reduction_factor=3,
            )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=trial_scheduler,
                num_samples=num_samples,
                time_budget_s=budget_s,
                reuse_actors=False,
                max_concurrent_trials=_local_concurrency(settings.cpus_per_trial),
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                # Saved with the experiment: a restored search repairs its checkpoints too.
                callbacks=[CheckpointRepair(), logger],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                verbose=1,
            ),
        )
    with _trials_in_plan_order(max(1, min(num_samples, _slots(settings.cpus_per_trial)))):
        grid = tuner.fit()
    sweep_workdirs()  # the local trials Tune stopped (their processes are gone)
    if restore:
        # Tune ran the callback restored from its experiment state, not `logger`: attach this
        # one to the child runs that one made, or closing them here would make new ones.
        logger.setup()
    _reconcile(grid, logger)
    if restore:
        _remove_orphans(grid, logger)
    logger.queue.drain(TRACKING_DRAIN_S)
    return grid


@contextlib.contextmanager
def _trials_in_plan_order(cluster_pending: int) -> Any:
    """How many trials may wait for resources at once (Tune's TUNE_MAX_PENDING_TRIALS_PG).

    On a local Ray, one: trials start strictly in plan order (cheap fixed points first). Tune
    asks Ray for an actor for every pending trial at once and starts whichever request Ray
    grants first: in the 60-minute benchmark a 4.9 M-parameter CNN (one epoch in 40 min)
    took the free core before SEED2017. On a cluster (RAY_ADDRESS), `cluster_pending` (its
    trial slots): the autoscaler sizes itself on the pending requests, and Tune's own default
    with a searcher is one, which would start a cluster's trials one by one. A value the user
    set is kept.
    """
    if PENDING_TRIALS_ENV in os.environ:
        yield
        return
    os.environ[PENDING_TRIALS_ENV] = str(cluster_pending if os.environ.get("RAY_ADDRESS") else 1)
    try:
        yield
    finally:
        os.environ.pop(PENDING_TRIALS_ENV, None)


def _remove_orphans(grid: Any, logger: Any) -> None:
    """Child runs of trials the restored experiment never knew: a trial proposed and started
    after Tune's last snapshot before the driver died. The resumed searcher proposed it again,
    and its new run holds the work; the orphan is closed, tagged and (soft) deleted."""
    known = {(result.metrics or {}).get("trial_id") for result in grid}
    for trial_id, run_id in logger.run_ids.items():
        if trial_id in known:
            continue
        try:
            if logger.client.get_run(run_id).info.status != "RUNNING":
                continue
            logger.client.set_tag(run_id, layout.TAG_STATUS, "superseded")
            logger.client.set_terminated(run_id, "KILLED")
            logger.client.delete_run(run_id)
            log.warning(
                "resume: closed child run %s of trial %s, unknown to Tune", run_id, trial_id
            )
        except Exception as error:  # a failed clean-up must not fail a finished search
            log.warning("resume: could not close orphan child run %s: %s", run_id, error)


def _reconcile(grid: Any, logger: Any) -> None:
    """Close every child run the callback could not (budget stop, restored search)."""
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id")
        if not trial_id or trial_id in logger.completed:
            continue
        if not result.config:
            # Interrupted before Tune recorded the trial's config: close its run, keep going.
            logger.close_run(trial_id, "KILLED")
            continue
        logger.finish_trial(
            trial_id,
            result.config,
            result.checkpoint,
            result.metrics,
            error=str(result.error) if result.error else None,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, SearchSettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import run_cli

    args = build_parser().parse_args(argv)
    settings = from_namespace(SearchSettings, args)

    def work() -> int:
        result = run_search(settings)
        print(
            json.dumps(
                {
                    "parent_run_id": result.parent_run_id,
                    "best_run_id": result.best_run_id,
                    "best_val_accuracy": result.best_val_accuracy,
                    "refused": result.refused,
                    "tune_path": result.tune_path,
                    "wall_seconds": round(result.wall_seconds, 1),
                },
                indent=2,
            )
        )
        return 0 if result.best_run_id else 1

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
