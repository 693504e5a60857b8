"""Calibrate: the worker's throughput on the reference CNN, what every time estimate scales."""

from __future__ import annotations

import logging
from typing import Any

from jobs.search.context import slots as _slots

log = logging.getLogger("jobs.search")
MAX_CALIBRATION_COPIES = 4


def _calibrate(budget: Any, cpus: float) -> Any:
    """The worker's throughput on the reference CNN, or None (no time estimates) if it fails:
    a search without time estimates still runs."""
    from jobs.timing import calibrate

    resources = {"CPU": cpus, "GPU": 0.25 if budget.kind == "gpu" else 0.0}
    try:
        # As many at once as trials will run at once (a few at most: it is a sample).
        calibration = calibrate(resources, copies=min(_slots(cpus), MAX_CALIBRATION_COPIES))
    except Exception as error:  # a worker that cannot run the probe must not stop the search
        log.warning("calibration failed, no time estimates: %s", error)
        return None
    log.info(
        "calibration: reference CNN %.0f images/s on %d thread(s); a trial's runtime holds "
        "%.0f MiB besides its model and data",
        calibration.reference_images_per_second,
        calibration.threads,
        calibration.runtime_memory_bytes / (1 << 20),
    )
    return calibration
