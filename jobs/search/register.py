"""Register: the best trial, the best of each family, the champion, and its registration."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from jobs.search.context import SearchContext
from jobs.search.ensemble import EnsembleResult
from jobs.search.summary import Summary
from jobs.settings import SearchSettings
from schema import run as layout

log = logging.getLogger("jobs.search")
FAMILIES = ("cnn", "dnn")


@dataclass(frozen=True)
class Champion:
    """The best trial and the champion (the ensemble's run where it beats the best single)."""

    best_run_id: str | None
    best_val_accuracy: float | None
    champion_run_id: str | None
    kind: str = ""  # "single" or "ensemble"; "" where no trial finished with a model


def register(ctx: SearchContext, summary: Summary, ensembled: EnsembleResult) -> Champion:
    """Tag the best runs, decide the champion and register it (where settings.register)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ctx.run.tracking_uri)
    return choose_champion(client, ctx.run.parent_id, ctx.settings, summary, ensembled)


def choose_champion(
    client: Any,
    parent_id: str,
    settings: SearchSettings,
    summary: Summary,
    ensembled: EnsembleResult,
) -> Champion:
    """The best trial's tags and metrics on the parent, the champion, its registration."""
    from mlflow.entities import Metric

    scored = [
        r
        for r in summary.runs
        if r.info.status == "FINISHED"
        and "best_val_accuracy" in r.data.metrics
        and layout.TAG_MODEL_URI in r.data.tags
    ]
    if not scored:
        log.error("no trial finished with a model; nothing to tag or register")
        return Champion(None, None, None)
    best = max(scored, key=lambda r: r.data.metrics["best_val_accuracy"])
    best_accuracy = best.data.metrics["best_val_accuracy"]
    client.set_tag(parent_id, layout.TAG_BEST_RUN, best.info.run_id)
    client.log_metric(parent_id, "best_val_accuracy", best_accuracy)
    client.set_tag(best.info.run_id, layout.TAG_BEST, "true")
    _best_of_each_family(client, parent_id, scored)
    champion_uri, champion_run = best.data.tags[layout.TAG_MODEL_URI], best.info.run_id
    kind = "single"
    reason = " ".join(
        part
        for part in (f"{best.info.run_name} has the best val_accuracy.", ensembled.note)
        if part
    )
    ensemble = ensembled.outcome
    if ensemble is not None:
        table = ensemble.choice.table
        now = int(time.time() * 1000)
        client.log_batch(
            parent_id,
            metrics=[
                Metric("ensemble_gain_points", table.gain_points, now, 0),
                Metric("report_best_single_accuracy", table.best_single, now, 0),
                Metric("report_ensemble_flip_accuracy", table.ensemble_flip, now, 0),
            ],
        )
        reason = ensemble.reason()
        if ensemble.beats_best_single:
            kind, champion_uri, champion_run = "ensemble", ensemble.model_uri, ensemble.run_id
    client.log_batch(
        parent_id,
        tags=[
            _tag(layout.TAG_CHAMPION, kind),
            _tag(layout.TAG_CHAMPION_REASON, reason),
            _tag(layout.TAG_CHAMPION_RUN, champion_run),
        ],
    )
    if settings.register:
        register_champion(client, champion_uri, champion_run)
    return Champion(best.info.run_id, best_accuracy, champion_run, kind)


def _best_of_each_family(client: Any, parent_id: str, scored: list[Any]) -> None:
    for family in FAMILIES:
        of_family = [r for r in scored if r.data.tags.get(layout.TAG_FAMILY) == family]
        if of_family:
            top = max(of_family, key=lambda r: r.data.metrics["best_val_accuracy"])
            client.log_metric(
                parent_id, f"best_{family}_val_accuracy", top.data.metrics["best_val_accuracy"]
            )
            client.set_tag(parent_id, f"best_{family}_run_id", top.info.run_id)


def _tag(key: str, value: str) -> Any:
    from mlflow.entities import RunTag

    return RunTag(key, value)


def register_champion(client: Any, model_uri: str, run_id: str) -> str:
    """Register the model as `fer2013-expression` and point the `champion` alias at it."""
    import mlflow

    version = mlflow.register_model(model_uri, layout.REGISTERED_MODEL, tags={"run_id": run_id})
    client.set_registered_model_alias(
        layout.REGISTERED_MODEL, layout.CHAMPION_ALIAS, version.version
    )
    log.info(
        "registered %s version %s as @%s",
        layout.REGISTERED_MODEL,
        version.version,
        layout.CHAMPION_ALIAS,
    )
    return str(version.version)
