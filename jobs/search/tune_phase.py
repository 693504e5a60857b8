"""One Tune run of a phase: the trainable, the scheduler, the Tuner, then MLflow reconciled."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from jobs.proposals import PlacingSearcher
from jobs.search.context import (
    PENDING_TRIALS_ENV,
    SearchContext,
    local_concurrency,
    slots,
)
from jobs.search.progress import ProgressLog
from jobs.tracking.queue import drain_seconds
from jobs.tracking.reconcile import after_phase
from jobs.tracking.trials import MLflowTrialLogger
from schema import run as layout

# Tune forces an experiment snapshot whenever a trial has checkpointed `num_to_keep` times
# since the last one: with one checkpoint kept per trial, every epoch. That keeps the state a
# restored search reads in step with the one checkpoint on disk (jobs/restore.py), and on
# local storage a snapshot takes milliseconds, so Tune's warning about snapshots less than
# its threshold apart (once per short epoch) is switched off, unless the user set it.
SNAPSHOT_WARNING_ENV = "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"


@dataclass(frozen=True)
class TuneSpec:
    """What differs between the phases' Tune runs."""

    path: str  # Tune's experiment path (storage/name)
    searcher: PlacingSearcher
    logger: MLflowTrialLogger
    budget_s: float
    num_samples: int
    restore: bool
    # True: ASHA stops the weak trials at rungs counted in images seen (jobs/scheduling.py);
    # False: every trial runs to its end (the final phase).
    ranked: bool = False
    phase: str = "explore"


def fit(ctx: SearchContext, spec: TuneSpec) -> Any:
    """One Tune run (a phase of the search): new, or restored from `spec.path`; then what Tune
    left open in MLflow is closed, and the tracking writes are drained."""
    from ray import tune

    from jobs.trial import sweep_workdirs, train_trial

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, data=ctx.data.arrays), resources=_trial_resources
    )
    if spec.restore:
        # The searcher, the callback and the trials come back from the experiment state.
        tuner = tune.Tuner.restore(
            spec.path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = _new_tuner(ctx, spec, trainable)
    os.environ.setdefault(SNAPSHOT_WARNING_ENV, "0")
    cpus = ctx.settings.cpus_per_trial
    with trials_in_plan_order(max(1, min(spec.num_samples, slots(cpus)))):
        grid = tuner.fit()
    sweep_workdirs()  # the local trials Tune stopped (their processes are gone)
    after_phase(grid, spec.logger, spec.restore)
    _record_correction(spec)
    spec.logger.queue.drain(drain_seconds())
    return grid


def _record_correction(spec: TuneSpec) -> None:
    """The epoch time correction the trials measured so far, on the parent run (step 0 after
    the explore phase, 1 after the final). Nothing where no trial reported to this searcher:
    a restored phase's trials report to Tune's own copy of it."""
    correction = spec.searcher.planner.correction
    if not correction.ratios:
        return
    logger, factor = spec.logger, correction.factor
    step = 1 if spec.phase == layout.PHASE_FINAL else 0
    logger.queue.submit(
        "epoch time correction",
        lambda: logger.client.log_metric(
            logger.parent_run_id, layout.METRIC_EPOCH_TIME_CORRECTION, factor, step=step
        ),
    )


def _new_tuner(ctx: SearchContext, spec: TuneSpec, trainable: Any) -> Any:
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from jobs.restore import CheckpointRepair
    from jobs.scheduling import ImageRungASHA, rung_images
    from jobs.space import UNRANKED_POINTS

    settings = ctx.settings
    storage, name = spec.path.rsplit("/", 1)
    trial_scheduler: Any = FIFOScheduler()
    if spec.ranked:
        # The searcher refuses what cannot reach this rung in time (the same images).
        rows = spec.searcher.planner.train_rows
        trial_scheduler = ImageRungASHA(
            UNRANKED_POINTS,
            grace_images=rung_images(spec.searcher.grace_epochs, rows),
            max_images=rung_images(settings.max_epochs, rows),
            metric="val_accuracy",
            mode="max",
            reduction_factor=3,
        )
    progress = ProgressLog(spec.phase, spec.budget_s)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=spec.searcher,
            scheduler=trial_scheduler,
            num_samples=spec.num_samples,
            time_budget_s=spec.budget_s,
            reuse_actors=False,
            max_concurrent_trials=local_concurrency(settings.cpus_per_trial),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            # Saved with the experiment: a restored search repairs its checkpoints too.
            callbacks=[CheckpointRepair(), spec.logger, progress],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            # The search's own progress lines (ProgressLog) replace Tune's status table.
            verbose=0,
        ),
    )


def _trial_resources(config: dict[str, Any]) -> Any:
    """One bundle with the planned resources (and label selector, where it has one)."""
    from ray.tune.execution.placement_groups import PlacementGroupFactory

    from jobs.trial import plan_of

    trial = plan_of(config)
    selector = trial.get("label_selector")
    if selector:
        return PlacementGroupFactory([trial["resources"]], bundle_label_selector=[selector])
    return PlacementGroupFactory([trial["resources"]])


@contextlib.contextmanager
def trials_in_plan_order(cluster_pending: int) -> Any:
    """How many trials may wait for resources at once (Tune's TUNE_MAX_PENDING_TRIALS_PG).

    On a local Ray, one: trials start strictly in plan order (cheap fixed points first). Tune
    asks Ray for an actor for every pending trial at once and starts whichever request Ray
    grants first, so a large proposal can take the free core before a cheap fixed point. On a
    cluster (RAY_ADDRESS), `cluster_pending` (its
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
