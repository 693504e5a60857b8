"""The explore phase's trial scheduler: ASHA that ranks trials of one fidelity only.

A rung compares trials after the same number of epochs. Epochs of every training row and
epochs of a quarter of them are not the same work: the coursework DNN, trained on every row so
that its accuracy answers coursework question 2, is ahead of CNNs explored on a quarter of the
rows at the same epoch; ranked together, it would set the first rung's cut-off and stop the
CNNs. A trial of another fidelity runs to its own end (its `max_epochs`, the time budget) and
leaves the rungs to the others. So does a plan named in `unranked`, whatever its fidelity:
where the explored share is every row (a small data set, `jobs.search.explore.
EXPLORE_MIN_ROWS`), the coursework DNN shares the explored fidelity and would otherwise stop
the known-good CNN at the first rung (BENCHMARKS.md, the 20 % budget search).
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from jobs.trial import plan_of


class SameFidelityASHA(AsyncHyperBandScheduler):
    """`ASHAScheduler` whose rungs hold only trials on `train_fraction` of the rows, less the
    plans named in `unranked`."""

    def __init__(self, train_fraction: float, unranked: tuple[str, ...] = (), **asha: Any) -> None:
        super().__init__(**asha)
        self.train_fraction = float(train_fraction)
        self.unranked = tuple(unranked)

    def ranks(self, trial: Any) -> bool:
        plan = plan_of(trial.config)
        if plan.get("name") in self.unranked:
            return False
        fraction = float(plan["training"].get("train_fraction", 1.0))
        return abs(fraction - self.train_fraction) < 1e-9

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if not self.ranks(trial):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if not self.ranks(trial):
            self.on_trial_remove(tune_controller, trial)  # forget it, record nothing
            return
        super().on_trial_complete(tune_controller, trial, result)
