"""Which models a report is about: the run asked for (usually the search's champion), the CNN
question 1 presents, and the model questions 4 and 5 are drawn for.

Every model is fetched, hash-checked and loaded with safe_mode=True here, before anything is
computed or logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from schema.ensemble import is_ensemble
from schema.run import TAG_FAMILY
from viz import curves, filters
from viz.champion import EnsembleFacts, ensemble_facts
from viz.facts import ModelFacts
from viz.recipe import recipe_of
from viz.runs import (
    BEST_METRIC,
    LoadedRun,
    VizError,
    experiment_id_from_env,
    load_verified_model,
    select_run_id,
)
from viz.search import SearchFacts, child_runs, search_facts
from viz.settings import VizSettings

log = logging.getLogger("viz")


@dataclass
class Subject:
    """The run that passed every check, and the models its sections are drawn from."""

    run_id: str
    loaded: LoadedRun
    ensemble: EnsembleFacts | None
    cnn: LoadedRun | None  # question 1's CNN (None: the search has none with a model)
    cnn_role: str
    # The model saliency and filters are drawn for: an ensemble's strongest CNN member (its
    # conv layers sit inside its members), else the run's own model.
    focus: LoadedRun
    layers: list[str]  # conv layers of `focus` to draw filters of
    children: list[Run]  # the runs of its search (just itself when standalone)
    search: SearchFacts | None
    class_names: list[str]

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def config(self) -> dict[str, Any]:
        return self.loaded.config

    @property
    def explained_by_member(self) -> bool:
        return self.focus is not self.loaded


def family_of(loaded: LoadedRun) -> str:
    return loaded.run.data.tags.get(TAG_FAMILY) or str(loaded.config.get("family", "unknown"))


def _class_names() -> list[str]:
    from model.data import CLASS_NAMES

    return list(CLASS_NAMES)


def select_and_verify(client: MlflowClient, settings: VizSettings, tmp: Path) -> Subject:
    """Pick the run, load and verify its model (and question 1's CNN), check layer names."""
    run_id = settings.run_id or select_run_id(client, experiment_id_from_env(client))
    loaded = load_verified_model(client, run_id, tmp / "download")
    children = child_runs(client, loaded.run)
    search = search_facts(client, loaded.run, children)
    ensemble = ensemble_facts(loaded.run, loaded.config) if is_ensemble(loaded.config) else None
    focus, cnn = loaded, None
    if ensemble is not None:
        ensemble.filters_member = member = ensemble.strongest_cnn()
        role = "the ensemble's strongest CNN member"
        if member is not None:
            cnn = focus = load_verified_model(client, member.run_id, tmp / "member")
    elif family_of(loaded) == "cnn":
        cnn = loaded
        role = (
            "the search's champion"
            if search is not None and search.champion_run_id == run_id
            else "this report's model"
        )
    else:
        role = "the search's best CNN"
        cnn = _best_cnn(client, children, tmp / "best-cnn")
    try:
        layers = filters.select_layers(focus.model, settings.layer_names())
    except VizError as error:
        raise VizError(f"run {focus.run_id}: {error}") from error
    return Subject(
        run_id, loaded, ensemble, cnn, role, focus, layers, children, search, _class_names()
    )


def _best_cnn(client: MlflowClient, children: list[Run], dst: Path) -> LoadedRun | None:
    """The search's best CNN with a model (question 1 for a DNN run); None when it has none."""
    scored = [
        c
        for c in children
        if c.data.tags.get(TAG_FAMILY) == "cnn" and BEST_METRIC in c.data.metrics
    ]
    if not scored:
        return None
    best = max(scored, key=lambda c: c.data.metrics[BEST_METRIC])
    try:
        return load_verified_model(client, best.info.run_id, dst)
    except VizError as error:  # question 1 then says there is none; the run itself is fine
        log.warning("question 1's CNN %s cannot be used: %s", best.info.run_id, error)
        return None


def model_facts(
    loaded: LoadedRun,
    role: str,
    children: list[Run],
    accuracy: float | None = None,
    report_accuracy: float | None = None,
) -> ModelFacts:
    """What the report says of one model: layers, parameters, recipe and accuracies."""
    total, trainable = curves.param_counts(loaded.model)
    run = loaded.run
    recipe = None if is_ensemble(loaded.config) else recipe_of(run, loaded.config, children)
    return ModelFacts(
        run_id=loaded.run_id,
        name=run.info.run_name or loaded.model.name,
        family=family_of(loaded),
        role=role,
        layers=curves.architecture_rows(loaded.model),
        params_total=total,
        params_trainable=trainable,
        recipe=recipe,
        accuracy=accuracy,
        best_val_accuracy=run.data.metrics.get(BEST_METRIC),
        report_accuracy=report_accuracy,
    )
