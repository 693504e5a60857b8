"""What every entry point shares: logging set-up and clear, non-zero exits on bad input."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable


def setup_logging() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(
        level=os.environ.get("FER_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_cli(work: Callable[[], int]) -> int:
    """Run `work`; turn expected failures into one readable line on stderr and exit code 2."""
    from jobs.tracking import TrackingUnavailable
    from model.data import DataError

    setup_logging()
    try:
        return work()
    except (DataError, FileNotFoundError, ValueError, TrackingUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
