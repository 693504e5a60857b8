"""Refused proposals as child runs: the `on_refusal` callable the driver gives the searcher."""

from __future__ import annotations

from typing import Any

from jobs.plan import PlacedTrial, flat_params
from jobs.tracking.queue import TrackingQueue
from schema import run as layout


class RefusalRecorder:
    """Logs refused proposals as child runs of the search (never handed to Tune).

    The searcher runs in the driver, so this is the driver writing; its queue keeps the
    writes in order and retries them while the tracking server is down. Picklable (the
    searcher that holds it is checkpointed with Tune's experiment state); the queue is not
    pickled and is rebuilt on first use.
    """

    def __init__(
        self, tracking_uri: str, experiment_id: str, parent_run_id: str, data_info: dict
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.data_info = data_info
        self.names: list[str] = []
        self._queue: TrackingQueue | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_queue"} | {"_queue": None}

    @property
    def queue(self) -> TrackingQueue:
        if self._queue is None:
            from mlflow.tracking import MlflowClient

            self._queue = TrackingQueue(MlflowClient(self.tracking_uri))
        return self._queue

    def __call__(self, placed: PlacedTrial) -> None:
        self.record(placed)

    def record(self, placed: PlacedTrial) -> None:
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        self.names.append(placed.plan.name)
        client = self.queue.client
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent_run_id,
            layout.TAG_ROLE: layout.ROLE_TRIAL,
            layout.TAG_FAMILY: placed.plan.model["family"],
            layout.TAG_STATUS: placed.refusal,
            layout.TAG_PLAN_NAME: placed.plan.name,
            layout.TAG_REFUSAL: placed.reason,
        }
        params = flat_params(placed)

        def write() -> None:
            run = client.create_run(self.experiment_id, run_name=placed.plan.name, tags=tags)
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
            client.set_terminated(run.info.run_id, "FINISHED")

        self.queue.submit(f"refused proposal {placed.plan.name}", write)
