"""What Tune leaves to reconcile with MLflow after a phase: runs its callback could not close."""

from __future__ import annotations

import logging
from typing import Any

from jobs.tracking.trials import MLflowTrialLogger
from schema import run as layout

log = logging.getLogger(__name__)


def after_phase(grid: Any, logger: MLflowTrialLogger, restored: bool) -> None:
    """Close what the callback could not, and on a restored phase the orphans, then drain."""
    if restored:
        # Tune ran the callback restored from its experiment state, not `logger`: attach this
        # one to the child runs that one made, or closing them here would make new ones.
        logger.setup()
    reconcile(grid, logger)
    if restored:
        remove_orphans(grid, logger)


def remove_orphans(grid: Any, logger: MLflowTrialLogger) -> None:
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
            logger.client.set_tag(run_id, layout.TAG_STATUS, layout.STATUS_SUPERSEDED)
            logger.client.set_terminated(run_id, "KILLED")
            logger.client.delete_run(run_id)
            log.warning(
                "resume: closed child run %s of trial %s, unknown to Tune", run_id, trial_id
            )
        except Exception as error:  # a failed clean-up must not fail a finished search
            log.warning("resume: could not close orphan child run %s: %s", run_id, error)


def reconcile(grid: Any, logger: MLflowTrialLogger) -> None:
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
