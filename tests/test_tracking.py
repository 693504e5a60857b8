"""The driver's ordered MLflow write queue: retries, drops, and the files its writes upload."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from jobs.tracking import MLflowTrialLogger, TrackingQueue, TrackingUnavailable


def _queue() -> TrackingQueue:
    return TrackingQueue(SimpleNamespace(tracking_uri="http://127.0.0.1:9"))  # type: ignore[arg-type]


def _staged(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "best.keras").write_bytes(b"model")
    return path


def _remove(path: Path):
    return lambda: (path / "best.keras").unlink()


def test_files_outlive_a_retry_and_go_once_sent(tmp_path: Path) -> None:
    staged = _staged(tmp_path, "sent")
    server_up = False
    sent: list[str] = []

    def operation() -> None:
        if not server_up:
            raise ConnectionError("connection refused")
        sent.append((staged / "best.keras").read_text())

    queue = _queue()
    queue.submit("completion of trial t1", operation, cleanup=_remove(staged))
    assert queue.pending and (staged / "best.keras").exists()  # kept for the retry
    server_up = True
    assert queue.flush()
    assert sent == ["model"] and not (staged / "best.keras").exists()


def test_files_of_a_refused_write_are_removed_with_it(tmp_path: Path) -> None:
    staged = _staged(tmp_path, "refused")

    def operation() -> None:
        raise MlflowException("run is gone", error_code=RESOURCE_DOES_NOT_EXIST)

    queue = _queue()
    queue.submit("completion of trial t2", operation, cleanup=_remove(staged))
    assert not queue.pending and queue.dropped == 1
    assert not (staged / "best.keras").exists()


def test_giving_up_on_an_unreachable_store_removes_queued_files(tmp_path: Path) -> None:
    first, second = _staged(tmp_path, "a"), _staged(tmp_path, "b")

    def operation() -> None:
        raise ConnectionError("connection refused")

    queue = _queue()
    queue.submit("completion of trial t3", operation, cleanup=_remove(first))
    queue.submit("completion of trial t4", operation, cleanup=_remove(second))
    with pytest.raises(
        TrackingUnavailable, match=r"2 write\(s\) not sent, first: completion of trial t3"
    ):
        queue.drain(0.0)
    assert not queue.pending
    assert not (first / "best.keras").exists() and not (second / "best.keras").exists()


def test_an_early_stop_is_put_down_to_the_budget_only_once_it_is_spent(tmp_path: Path) -> None:
    import time

    def logger(budget_s: float | None) -> MLflowTrialLogger:
        return MLflowTrialLogger(f"sqlite:///{tmp_path}/mlflow.db", "0", "p", {}, budget_s)

    with_budget = logger(600.0)
    with_budget.deadline = None  # as before Tune calls setup()
    assert with_budget._stop_reason() == "scheduler"
    with_budget.setup()  # Tune calls it as the search starts: the deadline is 600 s away
    assert with_budget._stop_reason() == "scheduler"
    with_budget.deadline = time.time() + 1  # Tune's own clock started a moment earlier
    assert with_budget._stop_reason() == "time_budget"
    assert logger(None)._stop_reason() == "scheduler"
