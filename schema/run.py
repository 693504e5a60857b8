"""The layout of a trained model inside an MLflow run (see docs/ARCHITECTURE.md).

`jobs/` writes it, `viz/` reads it; it sits below both (imports neither), and these names are
the one place the layout is spelled.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the names only: the epoch loop imports this module where MLflow is absent
    from mlflow.tracking import MlflowClient

MODEL_DIR = "model"
MODEL_FILE = "model.keras"
SHA_FILE = "model.sha256"
CONFIG_FILE = "config.json"
MLFLOW_MODEL_NAME = "mlflow_model"
# A trial's best epoch's class probabilities on the validation rows (see `Predictions`).
PREDICTIONS_DIR = "predictions"
PREDICTIONS_FILE = "val.npz"
REGISTERED_MODEL = "fer2013-expression"
CHAMPION_ALIAS = "champion"

# The train and validation inputs of every trial and training run (MLflow datasets): name,
# and the contexts MLflow's UI shows them under.
DATASET_NAME = "fer2013"
DATASET_CONTEXTS = {"Training": "training", "PublicTest": "validation"}

# Every tag the project writes, spelled here only (tests/test_layout.py greps for strays).
TAG_ROLE = "fer.role"
# The values of `fer.role`: what a run is (the ensemble's is ENSEMBLE, below).
ROLE_SEARCH = "search"
ROLE_SEARCH_RESUME = "search_resume"  # the MLflow-project run that resumed a search
ROLE_TRIAL = "trial"
ROLE_TRAIN = "train"
TAG_FAMILY = "fer.family"
TAG_STATUS = "fer.trial_status"
# The values of `fer.trial_status`: how a trial's child run ended.
STATUS_FINISHED = "finished"
STATUS_EARLY_STOPPED = "early_stopped"
STATUS_FAILED = "failed"
STATUS_DOES_NOT_FIT = "does_not_fit"  # refused before launch: fits no worker's memory
STATUS_OVER_BUDGET = "over_budget"  # refused before launch: cannot reach its first rung in time
STATUS_SUPERSEDED = "superseded"  # a resumed search's orphan, closed and deleted
REFUSED_STATUSES = (STATUS_DOES_NOT_FIT, STATUS_OVER_BUDGET)
TRAINED_STATUSES = (STATUS_FINISHED, STATUS_EARLY_STOPPED)
# The values of `fer.phase`.
PHASE_EXPLORE = "explore"
# What a search does with its budget (jobs/search/strategy.py), as the parent run's params.
STRATEGY_EXPLORE = "explore"
STRATEGY_EXPLOIT = "exploit"
STRATEGY_FIXED = "fixed"
PARAM_STRATEGY = "strategy.kind"
PARAM_STRATEGY_FINAL_SHARE = "strategy.final_share"
PARAM_STRATEGY_MODEL_MINUTES = "strategy.model_minutes"
PARAM_STRATEGY_MODELS_PER_SLOT = "strategy.models_per_slot"
PARAM_STRATEGY_EXPLORE_MIN_MODELS = "strategy.explore_min_models"
TAG_STRATEGY = "fer.strategy"  # the decision in words, with its numbers
PHASE_FINAL = "final"
TAG_PLAN_NAME = "fer.plan_name"
TAG_PHASE = "fer.phase"
TAG_REFUSAL = "fer.refusal"  # why a proposal was not started (does_not_fit / over_budget)
TAG_STOP_REASON = "fer.stop_reason"  # on early-stopped trials: scheduler or time_budget
TAG_EPOCHS_DONE = "fer.epochs_done"
TAG_ERROR = "fer.error"
TAG_MODEL_URI = "fer.model_uri"  # the MLflow Keras flavour of the run's model
TAG_BEST = "fer.best"
TAG_MEMORY_OVER = "fer.memory_over_reservation"
TAG_PRECISION = "fer.precision"
TAG_BACKEND = "fer.backend"  # the Keras backend the run trained on (tensorflow, jax)
# A trial's latest result's placement: "fer." + node_id, gpu_ids, precision, backend.
RESULT_TAG_PREFIX = "fer."
TAG_SEARCH_NAME = "fer.search_name"
TAG_TUNE_PATH = "fer.tune_path"
TAG_RESUMED_PARENT = "fer.resumed_parent"
TAG_WORKER_BUDGET = "fer.worker_budget"
TAG_CALIBRATION = "fer.calibration"
TAG_TRIAL_ID = "ray.trial_id"
TAG_BEST_RUN = "best_run_id"
TAG_DATA_SHA = "fer.data_sha256"
# The search's memory (jobs/tracking/history.py): the parent run's digest of the space its
# model-based searcher proposes from (jobs/space.py, `space_digest`), as a tag and a param;
# how many explored trials of earlier searches (same data, space and fidelity) seeded it, from
# which parent runs (comma list of run ids), and the earlier trial whose config it trained
# first (its child run id); every reused trial is listed in REUSED_TRIALS_FILE.
TAG_SPACE_SHA = "fer.space_sha256"
PARAM_SPACE_SHA = "space_sha256"
METRIC_REUSED_TRIALS = "reused_trials"
TAG_REUSED_FROM = "fer.reused_from"
TAG_REMEMBERED_BEST = "fer.remembered_best"
REUSED_TRIALS_FILE = "search/reused_trials.json"
# The search's ensemble run (`fer.role` and `family` "ensemble"; its config.json is
# schema/ensemble.py's `EnsembleConfig`); each member's accuracy on the report half is a
# metric under this prefix + the member's name.
ENSEMBLE = "ensemble"
MEMBER_REPORT_METRIC = "member_val_report_accuracy."
# Its members' run ids, and on the parent which model is champion.
TAG_MEMBERS = "fer.members"
TAG_CHAMPION = "fer.champion"  # "ensemble" or "single"
TAG_CHAMPION_REASON = "fer.champion_reason"
TAG_CHAMPION_RUN = "fer.champion_run_id"
# On a coursework model (SEED2017, its param-matched DNN) the budget could not train: why.
TAG_COURSEWORK_NOTE = "fer.coursework_note"

# Values and params of trial runs that viz/ reads (jobs/proposals.py, jobs/tracking.py and
# jobs/space.py write the same strings).
PLAN_SEED2017 = "seed2017"  # the coursework CNN's plan: its run name and `fer.plan_name`
PHASE_FINAL = "final"  # `fer.phase` of a trial trained on every row after the exploration
# A final trial's param: the plan name (= run name) of the explored trial whose best-epoch
# weights it started from.
PARAM_WARM_START_FROM = "warm_start_from"
PARAM_TRAIN_FRACTION = "train_fraction"
PARAM_TIME_BUDGET_MIN = "search.time_budget_min"  # on the search parent (its settings)
PARAM_DATA_FRACTION = "search.data_fraction"  # the parent's share of the data's rows
PARAM_SEED = "search.seed"  # the parent's seed (which rows a data_fraction below 1 draws)
# In every trial result: the training images the trial has seen so far (epochs x its rows),
# the time ASHA's rungs are counted in (jobs/scheduling.py).
METRIC_IMAGES_SEEN = "images_seen"
# In the first result of a trial's process only: its start-up seconds (that epoch also traced
# the model's functions, so its epoch seconds are not the trial's rate).
METRIC_SETUP_SECONDS = "setup_seconds"
# On the search parent, after each phase: the factor the trials' measured epoch seconds set on
# every later epoch time estimate (jobs/timing.py, EpochTimeCorrection).
METRIC_EPOCH_TIME_CORRECTION = "epoch_time_correction"
# `fer.trial_status` values.
STATUS_FINISHED = "finished"
STATUS_EARLY_STOPPED = "early_stopped"
STATUS_FAILED = "failed"
STATUS_DOES_NOT_FIT = "does_not_fit"
STATUS_OVER_BUDGET = "over_budget"


def run_config(
    name: str,
    model: dict[str, Any],
    training: dict[str, Any],
    data_info: dict[str, Any],
    param_count: int,
) -> dict[str, Any]:
    """The resolved config saved next to a model as `model/config.json` (docs/ARCHITECTURE.md):
    enough to rebuild the run from its artifacts alone."""
    return {
        "family": model["family"],
        "model": model,
        "training": training,
        "data": data_info,
        "param_count": int(param_count),
        "plan_name": name,
    }


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def log_model_files(
    client: MlflowClient, run_id: str, model_file: str | Path, config: dict[str, Any]
) -> str:
    """Log `model.keras`, its SHA-256 and the resolved config under `model/`; return the hash."""
    model_file = Path(model_file)
    if model_file.suffix != ".keras":
        raise ValueError(f"{model_file}: expected a native Keras '.keras' file")
    digest = sha256_file(model_file)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        shutil.copyfile(model_file, staged / MODEL_FILE)
        (staged / SHA_FILE).write_text(digest + "\n")
        (staged / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        client.log_artifacts(run_id, str(staged), MODEL_DIR)
    return digest


def download_model_files(client: MlflowClient, run_id: str, dst: str | Path) -> dict[str, Path]:
    """Download the `model/` folder of a run; return paths of model, sha and config."""
    local = Path(client.download_artifacts(run_id, MODEL_DIR, str(dst)))
    files = {"model": local / MODEL_FILE, "sha256": local / SHA_FILE, "config": local / CONFIG_FILE}
    missing = [name for name, path in files.items() if not path.exists()]
    if missing:
        raise FileNotFoundError(
            f"run {run_id}: artifact folder '{MODEL_DIR}/' lacks {', '.join(missing)} "
            f"(expected {MODEL_FILE}, {SHA_FILE}, {CONFIG_FILE})"
        )
    return files


@dataclass(frozen=True)
class Predictions:
    """One model's class probabilities on the validation rows, in the data's row order."""

    probabilities: np.ndarray  # float32 (N, 7)
    probabilities_flipped: np.ndarray  # the same rows mirrored left-right
    labels: np.ndarray  # int64 (N,)
    epoch: int

    @classmethod
    def from_npz(cls, source: str | Path | io.BytesIO, where: str) -> Predictions:
        """Read a `.npz` written by the epoch loop (plain arrays only: never unpickles)."""
        try:
            with np.load(source, allow_pickle=False) as found:
                loaded = cls(
                    probabilities=np.asarray(found["probabilities"], np.float32),
                    probabilities_flipped=np.asarray(found["probabilities_flipped"], np.float32),
                    labels=np.asarray(found["labels"], np.int64),
                    epoch=int(found["epoch"]),
                )
        except (KeyError, ValueError, OSError) as error:
            raise ValueError(
                f"{where}: expected a .npz with probabilities, probabilities_flipped, labels "
                f"and epoch ({error})"
            ) from error
        rows = loaded.labels.shape[0]
        for name in ("probabilities", "probabilities_flipped"):
            shape = getattr(loaded, name).shape
            if len(shape) != 2 or shape[0] != rows:
                raise ValueError(f"{where}: {name} expected shape ({rows}, classes), got {shape}")
        return loaded


def log_predictions(client: MlflowClient, run_id: str, npz_file: str | Path) -> None:
    """Log a trial's best-epoch validation predictions as `predictions/val.npz`."""
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / PREDICTIONS_FILE
        shutil.copyfile(npz_file, staged)
        client.log_artifact(run_id, str(staged), PREDICTIONS_DIR)


def download_predictions(client: MlflowClient, run_id: str, dst: str | Path) -> Predictions:
    """The `predictions/val.npz` of a run."""
    path = client.download_artifacts(run_id, f"{PREDICTIONS_DIR}/{PREDICTIONS_FILE}", str(dst))
    return Predictions.from_npz(path, f"run {run_id}: {PREDICTIONS_DIR}/{PREDICTIONS_FILE}")
