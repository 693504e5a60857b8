"""The search's own progress on the console: phase, trials, best so far, time left.

A Tune callback (Tune's status table is off): one line when a trial starts and one when it
ends, in the `jobs.search` log.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray import tune

log = logging.getLogger("jobs.search")


def clock(seconds: float) -> str:
    """`seconds` as m:ss (h:mm:ss from an hour)."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLog(tune.Callback):
    """Logs each trial's start and end with the phase's best so far and its time left."""

    def __init__(self, phase: str, budget_s: float) -> None:
        self.phase = phase
        self.budget_s = budget_s
        self._reset()

    def _reset(self) -> None:
        self.started = time.monotonic()
        self.begun = 0
        self.ended = 0
        self.best: tuple[float, str] | None = None

    # Pickled with Tune's experiment state: a restored phase counts from its restart.
    def __getstate__(self) -> dict[str, Any]:
        return {"phase": self.phase, "budget_s": self.budget_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def left(self) -> str:
        return clock(self.budget_s - (time.monotonic() - self.started))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.begun += 1
        log.info(
            "%s: trial %d started: %s (%s left)",
            self.phase,
            self.begun,
            _name(trial),
            self.left(),
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, " (failed)")

    def _ended(self, trial: Any, note: str) -> None:
        self.ended += 1
        result = trial.last_result or {}
        accuracy = result.get("best_val_accuracy")
        name = _name(trial)
        if accuracy is not None and (self.best is None or accuracy > self.best[0]):
            self.best = (float(accuracy), name)
        done = f"val_accuracy {accuracy:.3f} in {result.get('epoch', 0)} epoch(s)"
        best = f"best so far {self.best[0]:.3f} ({self.best[1]})" if self.best else "no best yet"
        log.info(
            "%s: %s ended%s: %s; %d ended, %s; %s left",
            self.phase,
            name,
            note,
            done if accuracy is not None else "no result",
            self.ended,
            best,
            self.left(),
        )


def _name(trial: Any) -> str:
    return str((trial.config or {}).get("plan", trial.trial_id))
