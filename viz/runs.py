"""Pick the run to visualise, fetch and verify its model, and rebuild the split it saw.

Everything here only reads from MLflow: `run_viz` calls it before anything is logged, so a run
that fails a check is left untouched.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from model.preprocessing import IMAGE_SHAPE, NUM_CLASSES
from schema.run import (
    CONFIG_FILE,
    MODEL_DIR,
    MODEL_FILE,
    ROLE_SEARCH,
    SHA_FILE,
    TAG_BEST_RUN,
    TAG_CHAMPION_RUN,
    TAG_ROLE,
    download_model_files,
    sha256_file,
)

log = logging.getLogger("viz")

BEST_METRIC = "best_val_accuracy"
TAG_PARENT = "mlflow.parentRunId"
_DATA_KEYS = ("source", "sha256", "data_fraction", "seed")


class VizError(ValueError):
    """A run cannot be visualised; the message names the run and what was wrong."""


@dataclass
class LoadedRun:
    """A run whose model passed the hash and safe-load checks."""

    run: Run
    model: Any  # keras.Model; typed loosely so importing this module stays cheap
    config: dict[str, Any]
    sha256: str

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


@dataclass
class SplitData:
    """The images and labels of one usage, rebuilt as the run saw them."""

    images: np.ndarray  # uint8 (N, 48, 48, 1)
    labels: np.ndarray  # int64 (N,) in 0..6
    usage: str
    source: str
    sha256: str
    data_fraction: float
    seed: int

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


def experiment_id_from_env(client: MlflowClient) -> str:
    """The experiment `mlflow run --experiment-name/--experiment-id` selected, else the default.

    `mlflow run` passes its choice to the entry point as MLFLOW_EXPERIMENT_ID (and, depending on
    how it was started, MLFLOW_EXPERIMENT_NAME); the id wins when both are set.
    """
    experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip()
    if experiment_id:
        return experiment_id
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip()
    if name:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise VizError(
                f"MLFLOW_EXPERIMENT_NAME={name!r}: expected an existing experiment, found none"
            )
        return experiment.experiment_id
    return "0"


def select_run_id(client: MlflowClient, experiment_id: str) -> str:
    """The champion (else `best_run_id`) of the latest search parent run, else the run with
    the best metric."""
    try:
        return _select_run_id(client, experiment_id)
    except MlflowException as error:
        raise VizError(
            f"experiment {experiment_id}: cannot search its runs ({error.message}); "
            f"check MLFLOW_EXPERIMENT_ID/MLFLOW_EXPERIMENT_NAME or pass --run-id"
        ) from error


def _select_run_id(client: MlflowClient, experiment_id: str) -> str:
    searches = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_ROLE}` = '{ROLE_SEARCH}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if searches:
        tags = searches[0].data.tags
        for tag in (TAG_CHAMPION_RUN, TAG_BEST_RUN):
            found = tags.get(tag, "").strip()
            if found:
                log.info("auto run: %s %s of search %s", tag, found, searches[0].info.run_id)
                return found
        log.info(
            "auto run: latest search %s has no %s tag yet; using the best %s",
            searches[0].info.run_id,
            TAG_BEST_RUN,
            BEST_METRIC,
        )
    # The search parent carries best_val_accuracy too but holds no model: skip it.
    candidates = client.search_runs(
        [experiment_id],
        filter_string=f"metrics.{BEST_METRIC} >= 0",
        order_by=[f"metrics.{BEST_METRIC} DESC", "attributes.start_time DESC"],
        max_results=50,
    )
    for run in candidates:
        if run.data.tags.get(TAG_ROLE) != ROLE_SEARCH:
            log.info(
                "auto run: %s (%s %.4f)",
                run.info.run_id,
                BEST_METRIC,
                run.data.metrics[BEST_METRIC],
            )
            return run.info.run_id
    raise VizError(
        f"experiment {experiment_id}: expected a search run with a '{TAG_BEST_RUN}' tag or a "
        f"run with a '{BEST_METRIC}' metric, found neither; pass --run-id"
    )


def get_run(client: MlflowClient, run_id: str) -> Run:
    """The run, or a VizError naming it when the tracking store does not know it."""
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        raise VizError(
            f"run {run_id}: not found in the tracking store ({error.message})"
        ) from error


def load_verified_model(client: MlflowClient, run_id: str, dst: str | Path) -> LoadedRun:
    """Download `model/`, check model.keras against model.sha256, load it with safe_mode=True."""
    run = get_run(client, run_id)
    try:
        files = download_model_files(client, run_id, dst)
    except FileNotFoundError as error:
        raise VizError(f"run {run_id}: no usable model: {error}") from error
    except (MlflowException, OSError) as error:
        raise VizError(
            f"run {run_id}: expected a '{MODEL_DIR}/' artifact folder with {MODEL_FILE}, "
            f"{SHA_FILE}, {CONFIG_FILE}; download failed: {error}"
        ) from error

    recorded = files["sha256"].read_text().strip().split()
    actual = sha256_file(files["model"])
    if not recorded or recorded[0].lower() != actual:
        found = recorded[0] if recorded else "(empty file)"
        raise VizError(
            f"run {run_id}: {MODEL_DIR}/{MODEL_FILE} has SHA-256 {actual}, but "
            f"{MODEL_DIR}/{SHA_FILE} records {found}; refusing a model that is not the one "
            f"the run saved"
        )

    config = read_config(run_id, files["config"])

    import keras  # deferred: TensorFlow import is slow and not needed for the checks above

    try:
        model = keras.saving.load_model(files["model"], safe_mode=True, compile=False)
    except Exception as error:  # Keras raises ValueError/TypeError/... for unsafe or bad files
        raise VizError(
            f"run {run_id}: {MODEL_DIR}/{MODEL_FILE} does not load with safe_mode=True "
            f"(expected a self-contained model without Lambda layers or custom objects): "
            f"{type(error).__name__}: {error}"
        ) from error
    check_model_shape(run_id, model)
    return LoadedRun(run=run, model=model, config=config, sha256=actual)


def check_model_shape(run_id: str, model: Any) -> None:
    """Every model here maps raw pixels (None, 48, 48, 1) to 7 class scores."""
    inputs, outputs = list(model.inputs), list(model.outputs)
    if len(inputs) != 1 or tuple(inputs[0].shape[1:]) != IMAGE_SHAPE:
        found = [tuple(t.shape) for t in inputs]
        raise VizError(
            f"run {run_id}: expected one input of shape (None, 48, 48, 1), found {found}"
        )
    if len(outputs) != 1 or tuple(outputs[0].shape[1:]) != (NUM_CLASSES,):
        found = [tuple(t.shape) for t in outputs]
        raise VizError(f"run {run_id}: expected one output of shape (None, 7), found {found}")


def read_config(run_id: str, path: Path) -> dict[str, Any]:
    """config.json of a run, with its `data` section checked (docs/ARCHITECTURE.md)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise VizError(
            f"run {run_id}: {MODEL_DIR}/{CONFIG_FILE} is not valid JSON: {error}"
        ) from error
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
        raise VizError(
            f"run {run_id}: {MODEL_DIR}/{CONFIG_FILE}: expected an object with a 'data' "
            f"section, found {type(config).__name__} without one"
        )
    missing = [key for key in _DATA_KEYS if key not in config["data"]]
    if missing:
        raise VizError(
            f"run {run_id}: {MODEL_DIR}/{CONFIG_FILE} 'data' lacks {missing} "
            f"(expected {list(_DATA_KEYS)})"
        )
    return config


def _exists(source: str) -> bool:
    # Remote sources are the loader's business; only local paths can be checked cheaply.
    return "://" in source or Path(source).exists()


def rebuild_split(run_id: str, config: dict[str, Any], data: str, usage: str) -> SplitData:
    """Load the data, prove it is what the run saw (SHA-256), subset it the same way, split."""
    from model.data import load_fer2013  # deferred: model/ pulls in Keras

    section = config["data"]
    recorded_source = str(section["source"])
    candidates = [c for c in (data, recorded_source) if c]
    source = next((c for c in candidates if _exists(c)), None)
    if source is None:
        raise VizError(
            f"run {run_id}: data not found: tried {candidates} (the --data value, then the "
            f"source recorded in {CONFIG_FILE})"
        )
    if data and source != data:
        log.info("data %s does not exist; using the run's recorded source %s", data, source)

    try:
        dataset = load_fer2013(source)
    except (OSError, ValueError) as error:
        raise VizError(f"run {run_id}: could not load data from {source}: {error}") from error
    if dataset.sha256 != section["sha256"]:
        raise VizError(
            f"run {run_id}: data {source} has SHA-256 {dataset.sha256}, but the run was "
            f"trained on data with SHA-256 {section['sha256']}"
        )
    fraction, seed = float(section["data_fraction"]), int(section["seed"])
    # Always through subset(): the trainer did the same, so even 1.0 gives its exact order.
    subset = dataset.subset(fraction, seed)
    try:
        images, labels = subset.split(usage)
    except (KeyError, ValueError) as error:
        raise VizError(f"run {run_id}: split {usage!r} of {source}: {error}") from error
    labels = np.asarray(labels)
    if labels.shape[0] == 0:
        raise VizError(
            f"run {run_id}: split {usage!r} of {source} (fraction {fraction}, seed {seed}): "
            f"expected at least one image, found 0"
        )
    unlabelled = int(np.count_nonzero((labels < 0) | (labels >= NUM_CLASSES)))
    if unlabelled:
        raise VizError(
            f"run {run_id}: split {usage!r} of {source}: expected labels 0..6 for every image, "
            f"found {unlabelled} unlabelled of {labels.shape[0]}"
        )
    return SplitData(
        images=np.asarray(images),
        labels=labels.astype(np.int64),
        usage=usage,
        source=source,
        sha256=dataset.sha256,
        data_fraction=fraction,
        seed=seed,
    )


def parent_run_id(run: Run) -> str | None:
    """The search parent of a trial run (None for a standalone run)."""
    return run.data.tags.get(TAG_PARENT) or None
