"""Ordered MLflow writes that survive a tracking-server outage.

The driver is the only process that writes to the tracking store (trials report to Tune), so
a SQLite store sees one writer, and one queue can buffer writes while a tracking server is
unreachable: every operation is queued in order and flushed when the server answers again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# Errors that will not go away by retrying (bad value, duplicate): drop the op, don't block.
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"}
# How long a phase waits for queued writes at its end before the search fails with
# TrackingUnavailable (FER_TRACKING_DRAIN_S overrides it, read when a phase drains).
DRAIN_ENV = "FER_TRACKING_DRAIN_S"
DEFAULT_DRAIN_S = 120.0


def drain_seconds() -> float:
    """The drain timeout now: $FER_TRACKING_DRAIN_S, else DEFAULT_DRAIN_S."""
    return float(os.environ.get(DRAIN_ENV, DEFAULT_DRAIN_S))


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
