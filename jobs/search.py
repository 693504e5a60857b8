"""The Tune driver: plan trials, place them by memory, run them, track everything in MLflow.

    python -m jobs.search --data fer2013.csv.gz --num-samples 4 --max-epochs 2 --data-fraction 0.03

`run_search(settings)` is the typed entry point; `main()` is a thin CLI over it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs import artifacts as layout
from jobs.settings import DATA_HELP, SearchSettings, add_arguments, as_dict, from_namespace

log = logging.getLogger("jobs.search")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRACKING_DRAIN_S = float(os.environ.get("FER_TRACKING_DRAIN_S", "120"))
# Trial processes: quiet TF. No MALLOC_MMAP_THRESHOLD_: a fixed 1 MiB threshold kept resident
# memory near the live peak but made every activation an mmap/munmap pair, and CPU training
# took 1.7x as long (116 s vs 66 s for the same 3 epochs; BENCHMARKS.md, "Trial overhead").
TRIAL_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}
# Tune's cap on trials waiting for resources (read when a Tuner starts; see _trials_in_plan_order).
PENDING_TRIALS_ENV = "TUNE_MAX_PENDING_TRIALS_PG"


@dataclass
class SearchResult:
    parent_run_id: str
    best_run_id: str | None
    best_val_accuracy: float | None
    tune_path: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0


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


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster: ship the code (workers may not have this checkout).
        runtime_env = {
            "working_dir": str(PROJECT_ROOT),
            "excludes": [
                ".venv",
                ".git",
                "data",
                "tune_results",
                "mlruns",
                "*.db",
                "bench/results",
                ".stack",
            ],
            "env_vars": TRIAL_ENV,
        }
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"env_vars": {**TRIAL_ENV, "PYTHONPATH": str(PROJECT_ROOT)}},
        )


def plan_trials(
    settings: SearchSettings, budget: Any, plans: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Sample plans (or take `plans`) and decide each one's placement.

    Returns entries {"plan", "placement"}.
    """
    import keras
    import numpy as np

    from jobs.resources import place
    from jobs.space import parse_families, sample_plans
    from model.configs import build_model, config_from_dict
    from model.preprocessing import pixel_statistics

    families = parse_families(settings.families)
    if plans is None:
        plans = sample_plans(families, settings.num_samples, settings.max_epochs, settings.seed)
    else:
        plans = [{**plan, "training": dict(plan["training"])} for plan in plans]
    dummy_stats = pixel_statistics(np.zeros((2, 48, 48, 1), dtype=np.uint8))
    entries = []
    for plan in plans:
        model = build_model(config_from_dict(plan["model"]), stats=dummy_stats)
        placement = place(
            model,
            plan["training"]["batch_size"],
            plan["training"]["optimizer"],
            budget,
            settings.cpus_per_trial,
        )
        plan["training"]["micro_batch_size"] = placement.micro_batch_size
        entries.append(
            {
                "plan": plan,
                "placement": {
                    "status": placement.status,
                    "estimated_mb": placement.estimated_mb,
                    "param_count": int(model.count_params()),
                    "resources": placement.resources,
                    "label_selector": placement.label_selector,
                    "gpu_memory_limit_mb": placement.gpu_memory_limit_mb,
                    "reason": placement.reason,
                    "min_estimated_mb": placement.min_estimated_bytes / (1 << 20),
                },
            }
        )
        keras.backend.clear_session()
    return entries


def _trial_config(entry: dict[str, Any], fault_injection: dict | None) -> dict[str, Any]:
    plan, placement = entry["plan"], entry["placement"]
    config = {
        "name": plan["name"],
        "model": plan["model"],
        "training": plan["training"],
        "resources": placement["resources"],
        "label_selector": placement["label_selector"],
        "gpu_memory_limit_mb": placement["gpu_memory_limit_mb"],
    }
    faults = (fault_injection or {}).get(plan["name"])
    if faults:
        config["fault_injection"] = faults
    return config


def _trial_resources(config: dict[str, Any]) -> Any:
    """One bundle with the planned resources (and label selector, where it has one)."""
    from ray.tune.execution.placement_groups import PlacementGroupFactory

    from jobs.trial import plan_of

    plan = plan_of(config)
    selector = plan.get("label_selector")
    if selector:
        return PlacementGroupFactory([plan["resources"]], bundle_label_selector=[selector])
    return PlacementGroupFactory([plan["resources"]])


def _find_parent(client: Any, experiment_id: str, name: str) -> Any | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{layout.TAG_ROLE}` = 'search' and tags.`fer.search_name` = '{name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def _log_refused(
    client: Any,
    experiment_id: str,
    parent_id: str,
    entry: dict[str, Any],
    data_info: dict[str, Any],
) -> None:
    from mlflow.entities import Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from jobs.tracking import _flat_params

    plan, placement = entry["plan"], entry["placement"]
    run = client.create_run(
        experiment_id,
        run_name=plan["name"],
        tags={
            MLFLOW_PARENT_RUN_ID: parent_id,
            layout.TAG_ROLE: "trial",
            layout.TAG_FAMILY: plan["model"]["family"],
            layout.TAG_STATUS: "does_not_fit",
            "fer.plan_name": plan["name"],
            "fer.refusal": placement["reason"],
        },
    )
    client.log_batch(
        run.info.run_id, params=[Param(k, v) for k, v in _flat_params(plan, placement).items()]
    )
    client.set_terminated(run.info.run_id, "FINISHED")


def _trials_csv(rows: list[dict[str, Any]]) -> str:
    columns = sorted({key for row in rows for key in row})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def run_search(
    settings: SearchSettings,
    fault_injection: dict | None = None,
    plans: list[dict[str, Any]] | None = None,
) -> SearchResult:
    """Run (or resume) one search; returns the parent run, the best child and its accuracy.

    `fault_injection` maps plan names to test hooks (see jobs/trial.py); tests only.
    `plans` replaces the sampled plans (benchmarks compare fixed configs).
    """
    import mlflow
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    from jobs.cli import configure_s3_retries
    from jobs.resources import budget_from_nodes
    from jobs.tracking import MLflowTrialLogger, quick_failing_client_env
    from jobs.trial import sweep_workdirs, train_trial

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

    init_ray()
    budget = budget_from_nodes(ray.nodes(), settings.worker_memory_gb)
    log.info("worker budget: %s", budget.describe())
    entries = plan_trials(settings, budget, plans)
    by_name = {entry["plan"]["name"]: entry for entry in entries}
    runnable = [e for e in entries if e["placement"]["status"] != "does_not_fit"]
    refused = [e for e in entries if e["placement"]["status"] == "does_not_fit"]
    for entry in entries:
        p = entry["placement"]
        log.info(
            "plan %-12s %-10s %9d params  est %8.1f MiB  %s",
            entry["plan"]["name"],
            p["status"],
            p["param_count"],
            p["estimated_mb"],
            p["reason"],
        )

    client = MlflowClient()
    tracking_uri = mlflow.get_tracking_uri()
    experiment_id = _experiment_id(client)
    launched_run = os.environ.get("MLFLOW_RUN_ID")  # set by `mlflow run`
    parent = _find_parent(client, experiment_id, settings.name) if settings.resume else None
    if settings.resume and parent is None:
        raise ValueError(
            f"resume: no earlier search named {settings.name!r} in experiment {experiment_id}; "
            f"run once with resume=false first"
        )
    if parent is not None:
        parent_id = parent.info.run_id
        tune_path = parent.data.tags["fer.tune_path"]
        if launched_run and launched_run != parent_id:
            client.set_tag(launched_run, layout.TAG_ROLE, "search_resume")
            client.set_tag(launched_run, "fer.resumed_parent", parent_id)
        client.update_run(parent_id, status="RUNNING")
    else:
        name = f"{settings.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        tune_path = f"{storage}/{name}"
        if launched_run:
            parent_id = launched_run
        else:
            parent_id = client.create_run(experiment_id, run_name=settings.name).info.run_id
        _log_parent(client, parent_id, settings, budget, entries, data_info, tune_path)
        for entry in refused:
            _log_refused(client, experiment_id, parent_id, entry, data_info)

    result = SearchResult(
        parent_id, None, None, tune_path, refused=[e["plan"]["name"] for e in refused]
    )
    try:
        if not runnable:
            log.error("no trial fits any worker (%s)", budget.describe())
        else:
            logger = MLflowTrialLogger(
                tracking_uri,
                experiment_id,
                parent_id,
                by_name,
                data_info,
                time_budget_s=settings.time_budget_min * 60,
            )
            trainable = tune.with_resources(
                tune.with_parameters(train_trial, data=arrays), resources=_trial_resources
            )
            # Only "plan" varies, so Tune's live table and trial folders show the plan name.
            param_space = {
                "plan": tune.grid_search([e["plan"]["name"] for e in runnable]),
                "plans": {e["plan"]["name"]: _trial_config(e, fault_injection) for e in runnable},
            }
            grid = _fit(settings, trainable, param_space, tune_path, logger, parent is not None)
            sweep_workdirs()  # the local trials Tune stopped (their processes are gone)
            _reconcile(grid, logger)
            logger.queue.drain(TRACKING_DRAIN_S)
        _finalise(client, parent_id, settings, result)
        client.set_terminated(parent_id, "FINISHED")
    except BaseException:
        try:
            client.set_terminated(parent_id, "FAILED")
        except Exception as error:
            log.error("could not mark the parent run FAILED: %s", error)
        raise
    result.wall_seconds = time.time() - started
    return result


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


def _log_parent(
    client: Any,
    parent_id: str,
    settings: SearchSettings,
    budget: Any,
    entries: list[dict[str, Any]],
    data_info: dict[str, Any],
    tune_path: str,
) -> None:
    import keras
    import mlflow
    import ray
    import tensorflow as tf
    from mlflow.entities import Param

    from jobs.space import SPACE

    params = {f"search.{k}": str(v) for k, v in as_dict(settings).items()}
    params["data_sha256"] = data_info["sha256"]
    client.log_batch(parent_id, params=[Param(k, v) for k, v in params.items()])
    tags = {
        layout.TAG_ROLE: "search",
        "fer.search_name": settings.name,
        "fer.tune_path": tune_path,
        layout.TAG_DATA_SHA: data_info["sha256"],
        "fer.worker_budget": budget.describe(),
        "version.tensorflow": tf.__version__,
        "version.keras": keras.__version__,
        "version.ray": ray.__version__,
        "version.mlflow": mlflow.__version__,
        "version.python": platform.python_version(),
    }
    for key, value in tags.items():
        client.set_tag(parent_id, key, value)
    from jobs.space import AUGMENTATIONS

    client.log_text(
        parent_id,
        json.dumps(
            {"space": SPACE, "augmentations": AUGMENTATIONS, "plans": entries},
            indent=2,
            default=str,
        ),
        "search/space.json",
    )


def _fit(
    settings: SearchSettings,
    trainable: Any,
    param_space: dict[str, Any],
    tune_path: str,
    logger: Any,
    restore: bool,
) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    if restore:
        tuner = tune.Tuner.restore(
            tune_path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            param_space=param_space,
        )
        # The pickled callback is rebuilt; give it this process's view of the plans.
        tuner._local_tuner.get_run_config().callbacks = [logger]
    else:
        storage, name = tune_path.rsplit("/", 1)
        scheduler = ASHAScheduler(
            metric="val_accuracy",
            mode="max",
            time_attr="training_iteration",
            max_t=settings.max_epochs,
            grace_period=max(1, min(settings.grace_epochs, settings.max_epochs)),
            reduction_factor=3,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                scheduler=scheduler,
                num_samples=1,
                time_budget_s=settings.time_budget_min * 60,
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                callbacks=[logger],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                verbose=1,
            ),
        )
    with _trials_in_plan_order():
        return tuner.fit()


@contextlib.contextmanager
def _trials_in_plan_order() -> Any:
    """On a local Ray, start trials strictly in plan order (cheap fixed points first).

    Tune asks Ray for an actor for every pending trial at once and starts whichever request
    Ray grants first: in the 60-minute benchmark a 4.9 M-parameter CNN (one epoch in 40 min)
    took the free core before SEED2017. With one pending trial at a time the order holds.
    A cluster (RAY_ADDRESS) keeps Tune's default, since the autoscaler sizes itself on the
    pending requests; a value the user set is kept too.
    """
    if os.environ.get("RAY_ADDRESS") or PENDING_TRIALS_ENV in os.environ:
        yield
        return
    os.environ[PENDING_TRIALS_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(PENDING_TRIALS_ENV, None)


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


def _finalise(client: Any, parent_id: str, settings: SearchSettings, result: SearchResult) -> None:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    experiment_id = client.get_run(parent_id).info.experiment_id
    children = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'",
        max_results=5000,
    )
    rows = []
    for run in children:
        rows.append(
            {
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "status": run.info.status,
                "trial_status": run.data.tags.get(layout.TAG_STATUS, ""),
                "family": run.data.tags.get(layout.TAG_FAMILY, ""),
                "param_count": run.data.params.get("param_count", ""),
                "estimated_memory_mb": run.data.params.get("estimated_memory_mb", ""),
                "best_val_accuracy": run.data.metrics.get("best_val_accuracy", ""),
                "epochs_done": run.data.tags.get("fer.epochs_done", ""),
            }
        )
    result.trials = rows
    client.log_text(parent_id, _trials_csv(rows) if rows else "", "search/trials.csv")
    scored = [
        r
        for r in children
        if r.info.status == "FINISHED"
        and "best_val_accuracy" in r.data.metrics
        and "fer.model_uri" in r.data.tags
    ]
    if not scored:
        log.error("no trial finished with a model; nothing to tag or register")
        return
    best = max(scored, key=lambda r: r.data.metrics["best_val_accuracy"])
    result.best_run_id = best.info.run_id
    result.best_val_accuracy = best.data.metrics["best_val_accuracy"]
    client.set_tag(parent_id, layout.TAG_BEST_RUN, best.info.run_id)
    client.log_metric(parent_id, "best_val_accuracy", result.best_val_accuracy)
    client.set_tag(best.info.run_id, "fer.best", "true")
    for family in ("cnn", "dnn"):
        of_family = [r for r in scored if r.data.tags.get(layout.TAG_FAMILY) == family]
        if of_family:
            top = max(of_family, key=lambda r: r.data.metrics["best_val_accuracy"])
            client.log_metric(
                parent_id, f"best_{family}_val_accuracy", top.data.metrics["best_val_accuracy"]
            )
            client.set_tag(parent_id, f"best_{family}_run_id", top.info.run_id)
    if settings.register:
        register_champion(client, best.data.tags["fer.model_uri"], best.info.run_id)


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
