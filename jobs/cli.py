"""What every entry point shares: logging set-up and clear, non-zero exits on bad input."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable

from schema.cli import import_tensorflow, quiet_environment

# S3 retries for every boto3 client a job creates (MLflow's S3 artifact store, the S3 data
# loader, `prepare --upload`): botocore's default of 3 attempts (older botocore: "legacy" mode,
# 5) gives up after a short burst of dropped connections. "standard" mode retries connection
# errors, throttling and 5xx with jittered exponential backoff (at most 20 s apart). Set before
# any client exists; values the user sets win. tests/test_reliability.py::test_10 checks it.
S3_RETRY_ENV = {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "10"}


def configure_s3_retries() -> None:
    for name, value in S3_RETRY_ENV.items():
        os.environ.setdefault(name, value)


def setup_logging() -> None:
    quiet_environment()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(
        level=os.environ.get("FER_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def redact_uri(uri: str) -> str:
    """The URI without user:password@ (a tracking URI may carry credentials)."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


def tracking_error_line(error: Exception) -> str:
    """One readable line for an MLflow error: which tracking store, and what went wrong."""
    import mlflow

    text = " ".join(str(getattr(error, "message", "") or error).split())
    if len(text) > 400:
        text = text[:400] + "..."
    return f"MLflow tracking store {redact_uri(mlflow.get_tracking_uri())}: {text}"


def run_cli(work: Callable[[], int], tensorflow: bool = True) -> int:
    """Run `work`; turn expected failures into one readable line on stderr and exit code 2.

    `tensorflow`: `work` uses it, so it is imported first, without its load-time noise."""
    from mlflow.exceptions import MlflowException

    from jobs.tracking.queue import TrackingUnavailable
    from model.data import DataError

    setup_logging()
    configure_s3_retries()
    if tensorflow:
        import_tensorflow()
    try:
        return work()
    except (DataError, FileNotFoundError, ValueError, TrackingUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except MlflowException as error:
        # E.g. the tracking server is down when the job starts, or refuses the credentials.
        print(f"error: {tracking_error_line(error)}", file=sys.stderr)
        return 2
