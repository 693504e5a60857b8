"""The search a run belongs to, as the report tells it: what it tried, for how long, which model
is champion, and what happened to the coursework CNN SEED2017 (question 1).

Read once per viz from the search parent and its child runs; the children also feed the
learning curves (viz/curves.py) and the training recipe (viz/recipe.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from schema import run as layout
from viz.runs import BEST_METRIC, TAG_PARENT, parent_run_id

REFUSED = (layout.STATUS_DOES_NOT_FIT, layout.STATUS_OVER_BUDGET)


@dataclass(frozen=True)
class Anchor:
    """What happened to one coursework model of the search (SEED2017)."""

    run_id: str
    status: str  # fer.trial_status; the MLflow status when the trial never closed
    epochs: int
    train_fraction: float
    best_val_accuracy: float | None
    refusal: str  # why it was not started (over_budget / does_not_fit), with the numbers
    stop_reason: str  # scheduler / time_budget, for an early-stopped trial
    error: str
    note: str  # the search's coursework note (too few epochs to count as trained)


@dataclass
class SearchFacts:
    """The search parent's story: trials, time, champion."""

    parent_id: str
    name: str
    minutes: float | None  # wall time of the search parent
    budget_minutes: float | None
    statuses: dict[str, int]  # fer.trial_status -> trials
    finals: int  # trials of the final phase (every row, from explored weights)
    families: list[str]
    champion_run_id: str
    champion_reason: str
    seed2017: Anchor | None
    children: list[Run] = field(default_factory=list)  # every child run: trials, ensemble
    strategy: str = ""  # explore / exploit / fixed ("" for a search from before strategies)
    strategy_reason: str = ""  # the decision in words, with its numbers

    @property
    def trials(self) -> int:
        return sum(self.statuses.values())

    @property
    def refused(self) -> int:
        return sum(self.statuses.get(s, 0) for s in REFUSED)


def child_runs(client: MlflowClient, run: Run) -> list[Run]:
    """The runs of the same search as `run` (itself included); just `run` when standalone."""
    parent = parent_run_id(run)
    if parent is None:
        return [run]
    return client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent}'",
        max_results=5000,
    )


def search_facts(client: MlflowClient, run: Run, children: list[Run]) -> SearchFacts | None:
    """The facts of `run`'s search (None for a standalone run)."""
    parent_id = parent_run_id(run)
    if parent_id is None:
        return None
    parent = client.get_run(parent_id)
    trials = [c for c in children if c.data.tags.get(layout.TAG_ROLE) == layout.ROLE_TRIAL]
    statuses: dict[str, int] = {}
    for trial in trials:
        status = trial.data.tags.get(layout.TAG_STATUS) or trial.info.status.lower()
        statuses[status] = statuses.get(status, 0) + 1
    info = parent.info
    end = info.end_time or max((c.info.end_time or 0 for c in children), default=0)
    minutes = (end - info.start_time) / 60000 if end and info.start_time else None
    budget = parent.data.params.get(layout.PARAM_TIME_BUDGET_MIN)
    tags = parent.data.tags
    return SearchFacts(
        parent_id=parent_id,
        name=info.run_name or parent_id,
        minutes=minutes,
        budget_minutes=float(budget) if budget else None,
        statuses=statuses,
        finals=sum(1 for t in trials if t.data.tags.get(layout.TAG_PHASE) == layout.PHASE_FINAL),
        families=sorted({t.data.tags.get(layout.TAG_FAMILY, "") for t in trials} - {""}),
        champion_run_id=tags.get(layout.TAG_CHAMPION_RUN, ""),
        champion_reason=tags.get(layout.TAG_CHAMPION_REASON, ""),
        seed2017=_anchor(trials, layout.PLAN_SEED2017),
        children=children,
        strategy=parent.data.params.get(layout.PARAM_STRATEGY, ""),
        strategy_reason=tags.get(layout.TAG_STRATEGY, ""),
    )


def _anchor(trials: list[Run], plan: str) -> Anchor | None:
    """The trial of a fixed plan; one that trained wins over a refusal (a resumed search)."""
    found = [
        t for t in trials if (t.data.tags.get(layout.TAG_PLAN_NAME) or t.info.run_name) == plan
    ]
    if not found:
        return None
    run = max(found, key=lambda t: (BEST_METRIC in t.data.metrics, t.info.start_time))
    tags, params = run.data.tags, run.data.params
    return Anchor(
        run_id=run.info.run_id,
        status=tags.get(layout.TAG_STATUS) or run.info.status.lower(),
        epochs=int(tags.get(layout.TAG_EPOCHS_DONE, 0) or 0),
        train_fraction=float(params.get(layout.PARAM_TRAIN_FRACTION, 1.0) or 1.0),
        best_val_accuracy=run.data.metrics.get(BEST_METRIC),
        refusal=tags.get(layout.TAG_REFUSAL, ""),
        stop_reason=tags.get(layout.TAG_STOP_REASON, ""),
        error=tags.get(layout.TAG_ERROR, ""),
        note=tags.get(layout.TAG_COURSEWORK_NOTE, ""),
    )


def seed2017_sentence(anchor: Anchor | None, train_rows: int | None) -> str:
    """What happened to SEED2017, in words, with the numbers the search logged."""
    name = "SEED2017, the coursework CNN of question 1,"
    if anchor is None:
        return (
            f"{name} was not part of this search (a search of other families or plans); train "
            f"it alone: `mlflow run . -e train -P preset={layout.PLAN_SEED2017} -P epochs=30`."
        )
    alone = (
        f" Train it alone: `mlflow run . -e train -P preset={layout.PLAN_SEED2017} "
        f"-P epochs=30` (hours on a CPU core, minutes on a GPU)."
    )
    if anchor.status == layout.STATUS_OVER_BUDGET:
        return (
            f"{name} was not started: the time left was too short for it: {anchor.refusal}.{alone}"
        )
    if anchor.status == layout.STATUS_DOES_NOT_FIT:
        return f"{name} was not started: it fits no worker's memory: {anchor.refusal}.{alone}"
    rows = f" ({round(train_rows * anchor.train_fraction):,} rows)" if train_rows else ""
    share = (
        "every training row"
        if anchor.train_fraction >= 1
        else f"{anchor.train_fraction:g} of the training rows"
    )
    seen = f"{anchor.epochs} epoch(s) on {share}{rows}"
    accuracy = (
        f", best val accuracy {anchor.best_val_accuracy * 100:.1f} %"
        if anchor.best_val_accuracy is not None
        else ""
    )
    if anchor.status == layout.STATUS_FAILED:
        text = f"{name} failed after {seen}: {anchor.error[-300:]}"
    elif anchor.status == layout.STATUS_EARLY_STOPPED:
        why = {
            "scheduler": "the scheduler (ASHA) stopped it as behind the other trials",
            "time_budget": "the search's time budget ran out",
        }.get(anchor.stop_reason, f"stopped ({anchor.stop_reason or 'reason not logged'})")
        text = f"{name} trained {seen}{accuracy}, then {why}."
    elif anchor.status == layout.STATUS_FINISHED:
        text = f"{name} trained {seen}{accuracy}, every planned epoch."
    else:
        text = f"{name} did not finish (run status {anchor.status}) after {seen}{accuracy}."
    if anchor.note:
        text += f" {anchor.note}"
    return text
