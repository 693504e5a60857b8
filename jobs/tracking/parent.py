"""The search's parent run: opened (or found, on resume), with its settings, versions and space.

The summary of its children and the champion are the search's last phases
(jobs/search/summary.py, jobs/search/register.py).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from typing import Any

from jobs.settings import SearchSettings, as_dict
from schema import run as layout

log = logging.getLogger("jobs.search")

TAG_SEARCH_NAME = layout.TAG_SEARCH_NAME
TAG_TUNE_PATH = layout.TAG_TUNE_PATH
ROLE_TRIAL = layout.ROLE_TRIAL

# MLflow 3's UI opens an experiment by its kind: model training shows the runs table first
# (without it, a new experiment opens on the GenAI overview of traces and sessions).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def experiment_id(client: Any) -> str:
    """The experiment the search logs to (MLflow's variables, else Default), marked as a
    model-training experiment unless its kind is already set."""
    found = _experiment_id(client)
    experiment = client.get_experiment(found)
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
        client.set_experiment_tag(found, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return found


def _experiment_id(client: Any) -> str:
    env_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if env_id:
        return env_id
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        # Not mlflow.set_experiment: it exports MLFLOW_EXPERIMENT_ID into this process's
        # environment, which then outlives the search (a later search or `mlflow run` in the
        # same process would log into, or refuse, that stale id).
        found = client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else client.create_experiment(name)
    return "0"


def find_parent(client: Any, experiment: str, name: str) -> Any | None:
    runs = client.search_runs(
        [experiment],
        filter_string=(
            f"tags.`{layout.TAG_ROLE}` = '{layout.ROLE_SEARCH}' "
            f"and tags.`{TAG_SEARCH_NAME}` = '{name}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def open_parent(
    client: Any, experiment: str, settings: SearchSettings, storage: str
) -> tuple[str, str, bool]:
    """(parent run id, Tune path, resumed): the earlier search's on resume, else a new one."""
    launched_run = os.environ.get("MLFLOW_RUN_ID")  # set by `mlflow run`
    parent = find_parent(client, experiment, settings.name) if settings.resume else None
    if settings.resume and parent is None:
        raise ValueError(
            f"resume: no earlier search named {settings.name!r} in experiment {experiment}; "
            f"run once with resume=false first"
        )
    if parent is not None:
        parent_id = parent.info.run_id
        if launched_run and launched_run != parent_id:
            client.set_tag(launched_run, layout.TAG_ROLE, layout.ROLE_SEARCH_RESUME)
            client.set_tag(launched_run, layout.TAG_RESUMED_PARENT, parent_id)
        client.update_run(parent_id, status="RUNNING")
        return parent_id, parent.data.tags[TAG_TUNE_PATH], True
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    name = f"{settings.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if launched_run:
        # `mlflow run` opened the run under a random name: the search's name is what users
        # look for in the UI.
        client.set_tag(launched_run, MLFLOW_RUN_NAME, name)
        parent_id = launched_run
    else:
        parent_id = client.create_run(experiment, run_name=name).info.run_id
    return parent_id, f"{storage}/{name}", False


def log_parent(
    client: Any,
    parent_id: str,
    settings: SearchSettings,
    budget: Any,
    planned: list[dict[str, Any]],
    data_info: dict[str, Any],
    tune_path: str,
    calibration: Any,
) -> None:
    """Settings, versions, the worker budget, the calibration and the space of a new search."""
    import keras
    import mlflow
    import ray
    import tensorflow as tf
    from mlflow.entities import Metric, Param

    from jobs.space import AUGMENTATIONS, SPACE, parse_families, space_digest

    space_sha = space_digest(parse_families(settings.families))
    params = {f"search.{k}": str(v) for k, v in as_dict(settings).items()}
    params["data_sha256"] = data_info["sha256"]
    params[layout.PARAM_SPACE_SHA] = space_sha
    tags = {
        layout.TAG_ROLE: layout.ROLE_SEARCH,
        TAG_SEARCH_NAME: settings.name,
        TAG_TUNE_PATH: tune_path,
        layout.TAG_DATA_SHA: data_info["sha256"],
        layout.TAG_SPACE_SHA: space_sha,  # what a later search's memory matches on
        layout.TAG_WORKER_BUDGET: budget.describe(),
        layout.TAG_BACKEND: settings.backend,
        "version.tensorflow": tf.__version__,
        "version.keras": keras.__version__,
        "version.ray": ray.__version__,
        "version.mlflow": mlflow.__version__,
        "version.python": platform.python_version(),
    }
    metrics = []
    if calibration is not None:
        now = int(time.time() * 1000)
        tags[layout.TAG_CALIBRATION] = json.dumps(calibration.to_dict())
        metrics.append(
            Metric("reference_images_per_second", calibration.reference_images_per_second, now, 0)
        )
        metrics.append(
            Metric("runtime_memory_mb", calibration.runtime_memory_bytes / (1 << 20), now, 0)
        )
    client.log_batch(
        parent_id,
        params=[Param(k, v) for k, v in params.items()],
        metrics=metrics,
        tags=[_tag(k, v) for k, v in tags.items()],
    )
    client.log_text(
        parent_id,
        json.dumps(
            {"space": SPACE, "augmentations": AUGMENTATIONS, "plans": planned},
            indent=2,
            default=str,
        ),
        "search/space.json",
    )


def _tag(key: str, value: str) -> Any:
    from mlflow.entities import RunTag

    return RunTag(key, value)


def children(client: Any, parent_id: str, role: str = ROLE_TRIAL) -> list[Any]:
    """The parent's child runs of one role: its trials (refused ones too), or its ensemble."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs(
        [experiment],
        filter_string=(
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' and tags.`{layout.TAG_ROLE}` = '{role}'"
        ),
        max_results=5000,
    )


def log_strategy(client: Any, parent_id: str, params: dict[str, str], reason: str) -> None:
    """What the search does with its budget and why (jobs/search/strategy.py)."""
    from mlflow.entities import Param, RunTag

    client.log_batch(
        parent_id,
        params=[Param(key, value) for key, value in params.items()],
        tags=[RunTag(layout.TAG_STRATEGY, reason[:5000])],
    )
