"""MLflow from the Tune driver: one parent run per search, one child run per trial.

The driver is the only process that writes to the tracking store (trials report to Tune), so
a SQLite store sees one writer, and one queue can buffer writes while a tracking server is
unreachable: every operation is queued in order and flushed when the server answers again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import tune

from jobs.proposals import flat_params, placed_from_config
from jobs.training import BEST_MODEL, BEST_PREDICTIONS
from schema import run as layout

log = logging.getLogger(__name__)

EPOCH_METRICS = (
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "epoch_seconds",
    "images_per_second",
    "peak_memory_mb",  # the trial's measured peak, next to its estimated_memory_mb param
)
GPU_METRICS = ("gpu_peak_memory_mb",)
SYSTEM_RESULT_PREFIX = "system_"  # in a trial's results (jobs/trial.py, SystemSampler)
SYSTEM_PREFIX = "system/"  # in MLflow
# A trial whose measured peak exceeds what it was placed by (its estimate) by more than this
# is tagged so, with both numbers.
MEMORY_OVER_RESERVATION = 1.2
TAG_MEMORY_OVER = layout.TAG_MEMORY_OVER
# In the first result after a trial (re)starts only: TF import, data, model build.
START_METRICS = ("setup_seconds",)
# On early-stopped trials: "scheduler" (ASHA) or "time_budget" (see _stop_reason).
TAG_STOP_REASON = layout.TAG_STOP_REASON
STOP_MARGIN_S = 10.0
# Errors that will not go away by retrying (bad value, duplicate): drop the op, don't block.
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"}


class TrackingUnavailable(RuntimeError):
    """The tracking server stayed unreachable; the message says what was not sent."""


def quick_failing_client_env() -> None:
    """Make one MLflow HTTP call fail in seconds, not minutes: the queue does the retrying."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


class TrackingQueue:
    """Ordered MLflow writes that survive a server outage."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.pending: list[tuple[str, Callable[[], Any], Callable[[], Any] | None]] = []
        self.last_error: str = ""
        self.dropped = 0

    def submit(
        self, what: str, operation: Callable[[], Any], cleanup: Callable[[], Any] | None = None
    ) -> None:
        """Queue `operation`; `cleanup` runs once it is sent, refused for good, or given up on
        (local files an operation uploads must outlive its retries, and no longer)."""
        self.pending.append((what, operation, cleanup))
        self.flush()

    def flush(self) -> bool:
        """Send what is queued, in order; False if the store is still unreachable."""
        while self.pending:
            what, operation, _ = self.pending[0]
            try:
                operation()
            except MlflowException as error:
                if error.error_code in _PERMANENT:
                    log.warning("MLflow refused %s: %s (dropped)", what, error.message[:300])
                    self.dropped += 1
                    self._pop()
                    continue
                self._remember(what, error)
                return False
            except Exception as error:  # connection refused, timeout, 5xx from a proxy
                self._remember(what, error)
                return False
            self._pop()
        return True

    def _pop(self) -> None:
        _, _, cleanup = self.pending.pop(0)
        if cleanup is not None:
            cleanup()

    def abandon(self) -> None:
        """Give up on every queued write, running their cleanups."""
        while self.pending:
            self._pop()

    def _remember(self, what: str, error: Exception) -> None:
        message = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        if message != self.last_error:
            log.warning(
                "tracking store unreachable while sending %s (%s); %d write(s) queued",
                what,
                message,
                len(self.pending),
            )
        self.last_error = message

    def drain(self, timeout_s: float) -> None:
        """Flush, retrying until `timeout_s`; raise TrackingUnavailable if writes remain."""
        deadline = time.monotonic() + timeout_s
        delay = 1.0
        while not self.flush():
            if time.monotonic() >= deadline:
                message = (
                    f"the MLflow tracking store ({self.client.tracking_uri}) stayed unreachable "
                    f"for {timeout_s:.0f} s: {len(self.pending)} write(s) not sent, first: "
                    f"{self.pending[0][0]}; last error: {self.last_error}. Trial checkpoints "
                    f"are kept in Tune storage."
                )
                self.abandon()
                raise TrackingUnavailable(message)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def dataset_inputs(data_info: dict[str, Any]) -> list[Any]:
    """The run's training and validation data as MLflow datasets (the UI's Dataset column).

    The digest is the first 24 hex digits of the file's SHA-256 and the context (MLflow keeps
    36 characters); the profile holds the whole hash, the rows, the fraction and the seed.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    sha = data_info["sha256"]
    source = str(data_info["source"])
    inputs = []
    for usage, rows_key in (
        (data_info["train_usage"], "train_rows"),
        (data_info["val_usage"], "val_rows"),
    ):
        context = layout.DATASET_CONTEXTS[usage]
        profile = {
            "usage": usage,
            "rows": data_info.get(rows_key),
            "sha256": sha,
            "data_fraction": data_info["data_fraction"],
            "seed": data_info["seed"],
        }
        dataset = Dataset(
            name=layout.DATASET_NAME,
            digest=f"{sha[:24]}-{context}",
            source_type="s3" if source.startswith("s3://") else "local",
            source=json.dumps({"uri": source}),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


def pip_requirements() -> list[str]:
    import keras
    import tensorflow as tf

    # Given explicitly so MLflow does not spend a subprocess inferring them.
    return [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]


def log_keras_model(run_id: str, model_file: Path) -> str:
    """Log `model_file` as the MLflow Keras flavour (with signature) of `run_id`; return its URI.

    The file is copied into the flavour as it is: loading it only to have MLflow save it
    again cost the driver 1.3 s per trial (BENCHMARKS.md, "Trial overhead").
    """
    import mlflow
    from mlflow.models import Model

    info = Model.log(
        artifact_path=None,
        name=layout.MLFLOW_MODEL_NAME,
        flavor=mlflow.keras,
        model=_SavedKerasFile(model_file),
        run_id=run_id,
        signature=fer_signature(model_file),
        pip_requirements=pip_requirements(),
    )
    return info.model_uri


class _SavedKerasFile:
    """A saved `.keras` file in the place of a Keras model: `mlflow.keras.save_model` only
    calls `save(path)` on the model it is given (the flavour's `data/model.keras`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def save(self, target: str, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"{self.path}: a copied model file takes no save options: {kwargs}")
        shutil.copyfile(self.path, target)


def fer_signature(model_file: Path | None = None) -> Any:
    """The MLflow signature of every model `model.configs` builds: pixels in, 7 probabilities out.

    With `model_file`, its input is checked against that contract first (read from the
    archive's `config.json`, without loading the model).
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from model.preprocessing import IMAGE_SHAPE, NUM_CLASSES

    if model_file is not None:
        found = keras_file_inputs(Path(model_file))
        expected = [((None, *IMAGE_SHAPE), "float32")]
        if found != expected:
            raise ValueError(
                f"{model_file}: expected one float32 input of shape {expected[0][0]}, found {found}"
            )
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, *IMAGE_SHAPE))]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, NUM_CLASSES))]),
    )


def keras_file_inputs(model_file: Path) -> list[tuple[tuple[int | None, ...], str]]:
    """(shape, dtype) of each input layer of a saved functional `.keras` model."""
    import zipfile

    with zipfile.ZipFile(model_file) as archive:
        config = json.loads(archive.read("config.json"))
    inputs = []
    for layer in config["config"]["layers"]:
        if layer["class_name"] == "InputLayer":
            layer_config = layer["config"]
            inputs.append((tuple(layer_config["batch_shape"]), str(layer_config["dtype"])))
    return inputs


class MLflowTrialLogger(tune.Callback):
    """Tune callback: child runs per trial, per-epoch metrics, the model when a trial ends."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        data_info: dict[str, Any],
        time_budget_s: float | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.data_info = data_info
        self.time_budget_s = time_budget_s
        self._init_state()

    def _init_state(self) -> None:
        self.client = MlflowClient(self.tracking_uri)
        self.queue = TrackingQueue(self.client)
        self.run_ids: dict[str, str] = {}
        self.logged_epochs: dict[str, set[int]] = {}
        self.completed: set[str] = set()
        # When Tune's time budget runs out (set as the experiment starts; None: no budget).
        self.deadline: float | None = None

    # Tune pickles its callbacks with the experiment state; clients and queues are rebuilt.
    def __getstate__(self) -> dict[str, Any]:
        keep = (
            "tracking_uri",
            "experiment_id",
            "parent_run_id",
            "data_info",
            "time_budget_s",
        )
        return {key: self.__dict__[key] for key in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_state()

    # ------------------------------------------------------------------ runs
    def _existing_children(self) -> dict[str, Any]:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}'",
            max_results=5000,
        )
        return {run.data.tags.get(layout.TAG_TRIAL_ID, ""): run for run in runs}

    def setup(self, **info: Any) -> None:
        if self.time_budget_s is not None:
            self.deadline = time.time() + self.time_budget_s
        # Re-attach to child runs of a restored search instead of creating duplicates.
        try:
            for trial_id, run in self._existing_children().items():
                if not trial_id:
                    continue
                self.run_ids[trial_id] = run.info.run_id
                history = self.client.get_metric_history(run.info.run_id, "val_accuracy")
                self.logged_epochs[trial_id] = {int(m.step) for m in history}
                if run.info.status != "RUNNING":
                    self.completed.add(trial_id)
        except Exception as error:  # the server may be down at start; runs are made later
            log.warning("could not list existing child runs: %s", error)

    def _ensure_run(self, trial: Any) -> None:
        trial_id = trial.trial_id
        if trial_id in self.run_ids:
            return
        placed = placed_from_config(trial.config)
        plan_name = placed.plan.name
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent_run_id,
            layout.TAG_ROLE: layout.ROLE_TRIAL,
            layout.TAG_FAMILY: placed.plan.model["family"],
            layout.TAG_TRIAL_ID: trial_id,
            layout.TAG_PLAN_NAME: plan_name,
            layout.TAG_PHASE: placed.plan.phase,
        }
        params = flat_params(placed)
        self.logged_epochs.setdefault(trial_id, set())

        def create() -> None:
            run = self.client.create_run(self.experiment_id, run_name=plan_name, tags=tags)
            self.run_ids[trial_id] = run.info.run_id
            self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
            self.client.log_inputs(run.info.run_id, dataset_inputs(self.data_info))

        self.queue.submit(f"child run for trial {trial_id}", create)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ensure_run(trial)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._ensure_run(trial)
        trial_id = trial.trial_id
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        if epoch in self.logged_epochs.setdefault(trial_id, set()):
            return  # replayed after a restore: already in MLflow
        self.logged_epochs[trial_id].add(epoch)
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(result[key]), now, epoch)
            for key in EPOCH_METRICS + START_METRICS + GPU_METRICS
            if key in result
        ]
        metrics.append(Metric("best_val_accuracy", float(result["best_val_accuracy"]), now, epoch))
        # The trial's system samples, under MLflow's own names (its UI charts `system/...`).
        metrics += [
            Metric(SYSTEM_PREFIX + key[len(SYSTEM_RESULT_PREFIX) :], float(value), now, epoch)
            for key, value in result.items()
            if key.startswith(SYSTEM_RESULT_PREFIX) and isinstance(value, int | float)
        ]
        extra = {
            "micro_batch_size": str(result.get("micro_batch_size", "")),
            "oom_retries": str(result.get("oom_retries", 0)),
        }
        # Where it ran (a restored trial may move): Ray node id and the GPU ids Ray gave it.
        for key in ("node_id", "gpu_ids", "precision", "backend"):
            if result.get(key):
                extra[key] = str(result[key])
        self.queue.submit(
            f"epoch {epoch} metrics of trial {trial_id}",
            lambda: self.client.log_batch(
                self.run_ids[trial_id],
                metrics=metrics,
                tags=[RunTag(layout.RESULT_TAG_PREFIX + k, v) for k, v in extra.items()],
            ),
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finish_trial(
            trial.trial_id, trial.config, trial.checkpoint, trial.last_result, error=None
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = trial.get_error() if hasattr(trial, "get_error") else None
        self.finish_trial(
            trial.trial_id,
            trial.config,
            trial.checkpoint,
            trial.last_result,
            error=str(error or "trial failed (no error text)"),
        )

    # ------------------------------------------------------------------ completion
    def finish_trial(
        self,
        trial_id: str,
        config: dict,
        checkpoint: Any,
        last_result: dict,
        error: str | None,
    ) -> None:
        """Log the model (if any) and close the child run: FINISHED, FAILED or KILLED."""
        if trial_id in self.completed:
            return
        self.completed.add(trial_id)
        placed = placed_from_config(config)
        # A time-budgeted trial (the final) plans its epochs on the clock: it finished when
        # it ran what it planned last.
        max_epochs = int(
            (last_result or {}).get("planned_epochs", placed.plan.training["max_epochs"])
        )
        epochs_done = int((last_result or {}).get("epoch", 0))
        if error is not None:
            status, tag = "FAILED", "failed"
        elif epochs_done < max_epochs:
            status, tag = "FINISHED", "early_stopped"
        else:
            status, tag = "FINISHED", "finished"
        extra_tags = {}
        if tag == "early_stopped":
            extra_tags[TAG_STOP_REASON] = self._stop_reason()
        peak = float((last_result or {}).get("peak_memory_mb", 0.0))
        reserved = float(placed.placement["estimated_mb"])
        if reserved > 0 and peak > MEMORY_OVER_RESERVATION * reserved:
            extra_tags[TAG_MEMORY_OVER] = (
                f"measured peak {peak:.0f} MiB, placed by an estimate of {reserved:.0f} MiB "
                f"({peak / reserved:.2f}x)"
            )

        staged: Path | None = None
        if checkpoint is not None and error is None:
            staged = Path(tempfile.mkdtemp(prefix="fer-model-"))
            checkpoint.to_directory(str(staged))
        training = dict(placed.plan.training)
        if last_result:
            training["micro_batch_size"] = int(
                last_result.get("micro_batch_size", training["micro_batch_size"])
            )
            # The policy the trial resolved ("auto" became mixed_bfloat16, float32, ...).
            training["precision"] = last_result.get("precision", training.get("precision"))
            if last_result.get("backend"):
                training["backend"] = last_result["backend"]  # what the trial's Keras ran on
            # The epochs its schedule ended on, so a rebuild from the artifacts trains as long.
            training["max_epochs"] = max_epochs
        run_config = layout.run_config(
            placed.plan.name,
            placed.plan.model,
            training,
            self.data_info,
            int(placed.placement["param_count"]),
        )

        def finish() -> None:
            run_id = self.run_ids[trial_id]
            tags = {layout.TAG_STATUS: tag, layout.TAG_EPOCHS_DONE: str(epochs_done), **extra_tags}
            if error:
                tags[layout.TAG_ERROR] = error[-4000:]
            if staged is not None and (staged / BEST_MODEL).exists():
                layout.log_model_files(self.client, run_id, staged / BEST_MODEL, run_config)
                tags[layout.TAG_MODEL_URI] = log_keras_model(run_id, staged / BEST_MODEL)
                if (staged / BEST_PREDICTIONS).exists():
                    layout.log_predictions(self.client, run_id, staged / BEST_PREDICTIONS)
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.set_terminated(run_id, status)

        def remove_staged() -> None:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)

        self._ensure_run_for(trial_id, config)
        self.queue.submit(f"completion of trial {trial_id}", finish, cleanup=remove_staged)

    def _stop_reason(self) -> str:
        """Why a trial ended before max_epochs: Tune's time budget, or the scheduler (ASHA).

        Tune stops every running trial once the budget is spent, so a stop at (or within
        STOP_MARGIN_S before, since this clock starts a moment after Tune's) the deadline is
        the budget's; any earlier stop is a scheduler decision.
        """
        if self.deadline is not None and time.time() >= self.deadline - STOP_MARGIN_S:
            return "time_budget"
        return "scheduler"

    def close_run(self, trial_id: str, status: str) -> None:
        """End a trial's child run (if it has one) without a model."""
        self.completed.add(trial_id)
        if trial_id not in self.run_ids:
            return
        self.queue.submit(
            f"closing trial {trial_id}",
            lambda: self.client.set_terminated(self.run_ids[trial_id], status),
        )

    def _ensure_run_for(self, trial_id: str, config: dict) -> None:
        if trial_id not in self.run_ids:
            self._ensure_run(_TrialView(trial_id, config))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.queue.flush()


class _TrialView:
    """The two attributes `_ensure_run` reads, for trials known only from a result grid."""

    def __init__(self, trial_id: str, config: dict) -> None:
        self.trial_id = trial_id
        self.config = config
