"""The explore phase's trial scheduler: ASHA whose rungs are counted in training images seen.

A rung compares trials after the same work. Counted in epochs, an epoch of every training row
and an epoch of a quarter of them are not the same work: the coursework DNN, trained on every
row, was ahead of CNNs explored on a quarter of the rows at the same epoch, and set the first
rung's cut-off for them. Counted in images seen (each trial reports its own,
`schema.run.METRIC_IMAGES_SEEN`), a trial on a quarter of the rows reaches a rung after four
times the epochs of one on every row, and both are ranked there.

A plan named in `unranked` runs to its own end (its `max_epochs`, the time budget) and leaves
the rungs to the others: the coursework DNN is trained to its end for the CNN/DNN comparison,
and where every trial sees every row (the same images at the same epoch) it led the
known-good CNN at the first rung and stopped it (BENCHMARKS.md, the 20 % budget search).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from jobs.trial import plan_of
from schema import run as layout

if TYPE_CHECKING:
    from jobs.settings import SearchSettings

# A stratified share rounds each class's rows, so a quarter of the rows can be a few rows short
# of a quarter: a rung sits this share below its nominal images, so four quarter-row epochs
# reach the rung of one full-row epoch.
RUNG_TOLERANCE = 0.01


def rung_images(full_epochs: float, train_rows: int) -> int:
    """A rung of `full_epochs` epochs of all `train_rows` rows, in images seen."""
    return max(1, math.floor(full_epochs * train_rows * (1 - RUNG_TOLERANCE)))


def epochs_to_reach(images: int, rows: int) -> int:
    """Epochs of `rows` rows a trial trains before it has seen `images` images."""
    return max(1, math.ceil(images / max(1, rows)))


def grace_epochs(settings: SearchSettings, train_fraction: float, train_rows: int = 0) -> float:
    """ASHA's first rung in full-data epochs' worth of images: `grace_epochs`, or more where
    that is fewer than `min_rung_images` of the data set's `train_rows` (a small data set; 0:
    no such floor, for given plans), or fewer where a trial on `train_fraction` of the rows
    cannot see that many images in `max_epochs` (a quarter of the rows takes four times the
    epochs to see as many images, and a CNN needs that many before it ranks above a DNN)."""
    floor = settings.min_rung_images / train_rows if train_rows > 0 else 0.0
    wanted = max(float(settings.grace_epochs), floor)
    return min(wanted, settings.max_epochs * train_fraction)


def first_rung_images(settings: SearchSettings, train_rows: int) -> int:
    """The explore phase's first rung in images seen, for trials on `settings.explore_fraction`
    of the data set's `train_rows`."""
    return rung_images(grace_epochs(settings, settings.explore_fraction, train_rows), train_rows)


class ImageRungASHA(AsyncHyperBandScheduler):
    """`ASHAScheduler` on images seen (rungs from `grace_images` up to `max_images`, by
    `reduction_factor`), less the plans named in `unranked`."""

    def __init__(
        self, unranked: tuple[str, ...], grace_images: int, max_images: int, **asha: Any
    ) -> None:
        super().__init__(
            time_attr=layout.METRIC_IMAGES_SEEN,
            grace_period=grace_images,
            max_t=max(grace_images, max_images),
            **asha,
        )
        self.unranked = tuple(unranked)

    def ranks(self, trial: Any) -> bool:
        return plan_of(trial.config).get("name") not in self.unranked

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if not self.ranks(trial):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if not self.ranks(trial):
            self.on_trial_remove(tune_controller, trial)  # forget it, record nothing
            return
        super().on_trial_complete(tune_controller, trial, result)
