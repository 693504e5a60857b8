"""The trial contract: a trial's plan, its placement, and the one codec to and from Tune's config.

The searcher (`jobs/proposals.py`) builds a `PlacedTrial`; Tune carries it to the trial as the
config `PlacedTrial.tune_config()` returns; the trial (`jobs/trial.py`) and the MLflow callback
(`jobs/tracking/`) read it back with `placed_from_config`. Nothing else spells its keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from schema import run as layout

EXPLORE = layout.PHASE_EXPLORE
FINAL = layout.PHASE_FINAL


@dataclass(frozen=True)
class TrialPlan:
    """One trial as planned: the model and training configs (plain JSON dicts, as logged)."""

    name: str
    model: dict[str, Any]
    training: dict[str, Any]
    phase: str = EXPLORE
    # A final trial starts from the weights of the explored trial it continues (a Tune
    # checkpoint's path or URI), named in `warm_start_from`.
    warm_start: str = ""
    warm_start_from: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "training": self.training}


@dataclass(frozen=True)
class PlacedTrial:
    """A plan with its placement (see jobs/resources.py) and time estimate."""

    plan: TrialPlan
    placement: dict[str, Any]
    estimated_epoch_seconds: float
    refusal: str = ""  # "", layout.STATUS_DOES_NOT_FIT or layout.STATUS_OVER_BUDGET
    reason: str = ""

    def tune_config(self) -> dict[str, Any]:
        """What Tune's trial config holds: everything the trial and the logger need."""
        trial = {
            **self.plan.to_dict(),
            "phase": self.plan.phase,
            "warm_start": self.plan.warm_start,
            "warm_start_from": self.plan.warm_start_from,
            "resources": self.placement["resources"],
            "label_selector": self.placement["label_selector"],
            "gpu_memory_limit_mb": self.placement["gpu_memory_limit_mb"],
            "placement": self.placement,
            "estimated_epoch_seconds": self.estimated_epoch_seconds,
        }
        return {"plan": self.plan.name, "trial": trial}


def placed_from_config(config: dict[str, Any]) -> PlacedTrial:
    """The placed trial a Tune trial config stands for (see `PlacedTrial.tune_config`)."""
    trial = config["trial"]
    plan = TrialPlan(
        trial["name"],
        trial["model"],
        trial["training"],
        trial.get("phase", EXPLORE),
        trial.get("warm_start", ""),
        trial.get("warm_start_from", ""),
    )
    return PlacedTrial(plan, trial["placement"], float(trial.get("estimated_epoch_seconds", 0.0)))


def flat_params(placed: PlacedTrial) -> dict[str, str]:
    """A trial's MLflow params: family, size, estimates, training and model config fields."""
    plan = placed.plan
    params = {
        "family": plan.model["family"],
        "plan_name": plan.name,
        "phase": plan.phase,
        "param_count": str(placed.placement["param_count"]),
        "estimated_memory_mb": f"{placed.placement['estimated_mb']:.1f}",
        "estimated_epoch_seconds": f"{placed.estimated_epoch_seconds:.4g}",
        "placement": placed.placement["status"],
    }
    if plan.warm_start_from:
        params["warm_start_from"] = plan.warm_start_from
    for key, value in plan.training.items():
        params[key] = str(value)
    for key, value in plan.model.items():
        if key != "family":
            text = json.dumps(value) if isinstance(value, dict | list | tuple) else str(value)
            params[f"model.{key}"] = text[:6000]
    return params
