"""The search's memory: what earlier searches measured, read back from the tracking store.

A new search of the same data (content digest, share of the rows and, for a share, the seed
that drew it) and the same space (`jobs.space.space_digest`) starts from the explored trials
of earlier searches in its experiment at the same fidelity (`train_fraction`, and for a trial
on a cosine rate `max_epochs`): the model-based
searcher is told them as evaluated, and the best of them is the first point it trains
(jobs/search/explore.py). The tracking store is the memory: nothing else is kept.

Earlier parents count when they ended: FINISHED, and also FAILED or KILLED, because each
trial's own run and `fer.trial_status` say whether it trained (a search that failed in its
final phase, or was stopped by hand, explored as well as one that finished). RUNNING parents
do not: a search under way (or resumed) is still writing, and what a new search reads must not
depend on when it starts.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, fields
from typing import Any

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from jobs.plan import TrainingConfig
from schema import run as layout

ENDED = ("FINISHED", "FAILED", "KILLED")
# A trial's model config fields are its params under this prefix (jobs.plan.flat_params).
MODEL_PARAM_PREFIX = "model."
MAX_RUNS = 5000  # per query: more than any experiment's searches or one search's trials
TAG_VALUE_LIMIT = 5000  # MLflow's tag values (the full list is in REUSED_TRIALS_FILE)


@dataclass(frozen=True)
class PastTrial:
    """One explored trial of an earlier search: its point of the space and its accuracy."""

    parent_run_id: str
    run_id: str
    name: str
    point: dict[str, Any]
    best_val_accuracy: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "parent_run_id": self.parent_run_id,
            "run_id": self.run_id,
            "name": self.name,
            "best_val_accuracy": self.best_val_accuracy,
            "point": self.point,
        }


@dataclass(frozen=True)
class Memory:
    """The trials a search reuses, oldest search first."""

    trials: tuple[PastTrial, ...] = ()

    @property
    def best(self) -> PastTrial | None:
        """The most accurate trial (the earliest of equals), None without trials."""
        if not self.trials:
            return None
        return max(self.trials, key=lambda trial: trial.best_val_accuracy)

    @property
    def parents(self) -> tuple[str, ...]:
        """The parent runs the trials came from, in the order of the trials."""
        return tuple(dict.fromkeys(trial.parent_run_id for trial in self.trials))


@dataclass(frozen=True)
class MemoryQuery:
    """What an earlier search must share with this one for its trials to be reused."""

    experiment_id: str
    parent_run_id: str  # this search's parent (never its own memory)
    data_info: dict[str, Any]  # jobs.data.prepare_arrays' info: sha256, data_fraction, seed
    space_sha256: str
    families: tuple[str, ...]  # the searched families (jobs.space.Space's)
    train_fraction: float  # the explored trials' fidelity
    min_epochs: int  # the first rung: a trial stopped earlier says little of its config
    # A trial on a cosine rate decays over its max_epochs: reused only with the same (0: any).
    max_epochs: int = 0


def recall(client: Any, query: MemoryQuery) -> Memory:
    """The explored trials of earlier searches that `query` may reuse."""
    trials: list[PastTrial] = []
    for parent in earlier_searches(client, query):
        trials.extend(_reusable_trials(client, query, parent.info.run_id))
    return Memory(tuple(trials))


def earlier_searches(client: Any, query: MemoryQuery) -> list[Any]:
    """Ended parent runs of the experiment on the same data rows and space, oldest first."""
    data = query.data_info
    runs = client.search_runs(
        [query.experiment_id],
        filter_string=(
            f"tags.`{layout.TAG_ROLE}` = '{layout.ROLE_SEARCH}' "
            f"and tags.`{layout.TAG_DATA_SHA}` = '{data['sha256']}' "
            f"and tags.`{layout.TAG_SPACE_SHA}` = '{query.space_sha256}'"
        ),
        order_by=["attributes.start_time ASC"],
        max_results=MAX_RUNS,
    )
    return [
        run
        for run in runs
        if run.info.run_id != query.parent_run_id
        and run.info.status in ENDED
        and _same_rows(run.data.params, data)
    ]


def _same_rows(params: dict[str, str], data_info: dict[str, Any]) -> bool:
    """Whether a parent trained on the rows `data_info` stands for: the same share of the
    data and, for a share, the same seed (it draws which rows)."""
    try:
        fraction = float(params[layout.PARAM_DATA_FRACTION])
        if not math.isclose(fraction, float(data_info["data_fraction"]), rel_tol=1e-9):
            return False
        return fraction >= 1.0 or int(params[layout.PARAM_SEED]) == int(data_info["seed"])
    except (KeyError, ValueError):
        return False


def _reusable_trials(client: Any, query: MemoryQuery, parent_id: str) -> list[PastTrial]:
    runs = client.search_runs(
        [query.experiment_id],
        filter_string=(
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' "
            f"and tags.`{layout.TAG_ROLE}` = '{layout.ROLE_TRIAL}' "
            f"and tags.`{layout.TAG_PHASE}` = '{layout.PHASE_EXPLORE}'"
        ),
        order_by=["attributes.start_time ASC"],
        max_results=MAX_RUNS,
    )
    found = []
    for run in runs:
        trial = past_trial(run, query)
        if trial is not None:
            found.append(trial)
    return found


def past_trial(run: Any, query: MemoryQuery) -> PastTrial | None:
    """The trial a child run stands for, when it trained to the first rung at the query's
    fidelity and its config is a point of the space; None otherwise."""
    from jobs.space_points import point_from_config

    tags, params = run.data.tags, run.data.params
    accuracy = run.data.metrics.get("best_val_accuracy")
    if (
        run.info.status != "FINISHED"
        or tags.get(layout.TAG_STATUS) not in layout.TRAINED_STATUSES
        or accuracy is None
        or not math.isfinite(accuracy)
    ):
        return None
    try:
        epochs = int(tags.get(layout.TAG_EPOCHS_DONE, "0"))
        fraction = float(params[layout.PARAM_TRAIN_FRACTION])
        model, training = logged_configs(params)
    except (KeyError, ValueError):
        return None
    if epochs < query.min_epochs or not math.isclose(fraction, query.train_fraction, rel_tol=1e-9):
        return None
    if (
        query.max_epochs
        and training.lr_schedule == "cosine"
        and training.max_epochs != query.max_epochs
    ):
        return None  # its rate stood elsewhere at the same epoch
    point = point_from_config(model, training, query.families)
    if point is None:
        return None
    name = tags.get(layout.TAG_PLAN_NAME, run.info.run_name or "")
    return PastTrial(tags[MLFLOW_PARENT_RUN_ID], run.info.run_id, name, point, float(accuracy))


def logged_configs(params: dict[str, str]) -> tuple[dict[str, Any], TrainingConfig]:
    """A trial's model and training configs back from its params (jobs.plan.flat_params);
    a training field it did not log has the default it trained with (a ValueError where a
    logged one is not valid)."""
    model = {"family": params["family"]}
    for key, text in params.items():
        if key.startswith(MODEL_PARAM_PREFIX):
            model[key[len(MODEL_PARAM_PREFIX) :]] = _value(text)
    training = {
        field.name: _value(params[field.name])
        for field in fields(TrainingConfig)
        if field.name in params
    }
    return model, TrainingConfig.from_dict(training)


def _value(text: str) -> Any:
    """A param's value as written by `str()` (or `json.dumps` for lists and dicts)."""
    words = {"True": True, "False": False, "None": None}
    if text in words:
        return words[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def log_memory(client: Any, parent_id: str, memory: Memory) -> None:
    """On the parent run: how many earlier trials it reused, from which searches, the one it
    trains first, and every reused trial in REUSED_TRIALS_FILE."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    tags = []
    if memory.trials:
        tags.append(RunTag(layout.TAG_REUSED_FROM, _cut(",".join(memory.parents))))
    if memory.best is not None:
        tags.append(RunTag(layout.TAG_REMEMBERED_BEST, memory.best.run_id))
    client.log_batch(
        parent_id,
        metrics=[Metric(layout.METRIC_REUSED_TRIALS, float(len(memory.trials)), now, 0)],
        tags=tags,
    )
    best = memory.best
    client.log_text(
        parent_id,
        json.dumps(
            {
                "reused_trials": len(memory.trials),
                "parents": list(memory.parents),
                "first_point": best.to_dict() if best is not None else None,
                "trials": [trial.to_dict() for trial in memory.trials],
            },
            indent=2,
        ),
        layout.REUSED_TRIALS_FILE,
    )


def _cut(text: str) -> str:
    if len(text) <= TAG_VALUE_LIMIT:
        return text
    more = f",... (see {layout.REUSED_TRIALS_FILE})"
    return text[: TAG_VALUE_LIMIT - len(more)].rsplit(",", 1)[0] + more
