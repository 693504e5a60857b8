"""The Tune callback that writes each trial's child run: params, per-epoch metrics, the model."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import tune

from jobs.plan import TrialPlacement, flat_params, placed_from_config
from jobs.tracking.models import dataset_inputs, log_keras_model
from jobs.tracking.queue import TrackingQueue
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
    "shared_memory_mb",  # the object store's pages it maps (its rows), not in that peak
)
GPU_METRICS = ("gpu_peak_memory_mb",)
SYSTEM_RESULT_PREFIX = "system_"  # in a trial's results (jobs/trial.py, SystemSampler)
SYSTEM_PREFIX = "system/"  # in MLflow
# A trial whose measured peak exceeds what it was placed by (its estimate) by more than this
# is tagged so, with both numbers.
MEMORY_OVER_RESERVATION = 1.2
TAG_MEMORY_OVER = layout.TAG_MEMORY_OVER
# In the first result after a trial (re)starts only: TF import, data, model build.
START_METRICS = (layout.METRIC_SETUP_SECONDS,)
# On early-stopped trials: "scheduler" (ASHA) or "time_budget" (see _stop_reason).
TAG_STOP_REASON = layout.TAG_STOP_REASON
STOP_MARGIN_S = 10.0


def memory_over_reservation(result: dict[str, Any], placement: TrialPlacement) -> str:
    """Why a trial's measured peak is over MEMORY_OVER_RESERVATION times what it was placed by
    (host memory; on a GPU worker, the card too), in words; "" when it is not."""
    found = []
    for measured, estimate, where in (
        ("peak_memory_mb", placement.host_mb, "host"),
        ("gpu_peak_memory_mb", placement.estimated_mb if placement.on_card else 0.0, "GPU"),
    ):
        peak = float(result.get(measured) or 0.0)
        estimate = float(estimate or 0.0)
        if estimate > 0 and peak > MEMORY_OVER_RESERVATION * estimate:
            found.append(
                f"{where}: measured peak {peak:.0f} MiB, placed by an estimate of "
                f"{estimate:.0f} MiB ({peak / estimate:.2f}x)"
            )
    return "; ".join(found)


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
        max_epochs = int((last_result or {}).get("planned_epochs", placed.plan.training.max_epochs))
        epochs_done = int((last_result or {}).get("epoch", 0))
        if error is not None:
            status, tag = "FAILED", layout.STATUS_FAILED
        elif epochs_done < max_epochs:
            status, tag = "FINISHED", layout.STATUS_EARLY_STOPPED
        else:
            status, tag = "FINISHED", layout.STATUS_FINISHED
        extra_tags = {}
        if tag == layout.STATUS_EARLY_STOPPED:
            extra_tags[TAG_STOP_REASON] = self._stop_reason()
        over = memory_over_reservation(last_result or {}, placed.placement)
        if over:
            extra_tags[TAG_MEMORY_OVER] = over

        staged: Path | None = None
        if checkpoint is not None and error is None:
            staged = Path(tempfile.mkdtemp(prefix="fer-model-"))
            checkpoint.to_directory(str(staged))
        training = placed.plan.training.to_dict()
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
            placed.placement.param_count,
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
