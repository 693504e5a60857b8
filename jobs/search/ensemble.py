"""Ensemble: the finished trials combined (jobs/ensemble.py), or a note on why not."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from jobs.ensemble import EnsembleOutcome
from jobs.ensemble import build_and_log as build_ensemble
from jobs.search.context import SearchContext
from jobs.tracking.parent import children

log = logging.getLogger("jobs.search")


@dataclass(frozen=True)
class EnsembleResult:
    """The ensemble run, or None with the reason the champion is the best single model."""

    outcome: EnsembleOutcome | None
    note: str = ""


def ensemble(ctx: SearchContext) -> EnsembleResult:
    """The ensemble of the finished trials; a failure leaves the best single model champion
    and never fails the search."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ctx.run.tracking_uri)
    run = ctx.run
    try:
        outcome = build_ensemble(
            client,
            run.experiment_id,
            run.parent_id,
            children(client, run.parent_id),
            ctx.data.arrays["x_val"],
            ctx.data.arrays["y_val"],
            ctx.data.info,
            ctx.settings.seed,
        )
    except Exception as error:
        log.exception("ensemble: not built (%s); the champion is the best single model", error)
        return EnsembleResult(None, f"no ensemble: {error}"[:2000])
    return EnsembleResult(outcome)
