"""The trial contract: a trial's plan, its placement, and the one codec to and from Tune's config.

The searcher (`jobs/proposals.py`) builds a `PlacedTrial`; Tune carries it to the trial as the
config `PlacedTrial.tune_config()` returns; the trial (`jobs/trial.py`) and the MLflow callback
(`jobs/tracking/`) read it back with `placed_from_config`. Nothing else spells its keys.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from model.optimizers import OPTIMIZERS
from schema import run as layout

# "cosine": the rate falls along a half cosine over max_epochs, set at the start of each epoch
# (by epoch, not by optimizer step, so a resume or a smaller micro-batch after an OOM keeps it).
LR_SCHEDULES = ("constant", "cosine")
MIN_MICRO_BATCH = 4
EXPLORE = layout.PHASE_EXPLORE
FINAL = layout.PHASE_FINAL


def _known_fields(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` where every key is a field of the dataclass `cls`; else a ValueError naming
    the others, under `where`."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}; expected some of {sorted(known)}")
    return values


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = 64
    micro_batch_size: int = 64
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    max_epochs: int = 10
    seed: int = 2017
    lr_schedule: str = "constant"
    # Decoupled weight decay of every optimizer (0: none, AdamW included).
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup (Zhang et al. 2018); 0: off
    # Stratified share of the training rows this run sees: a lower-fidelity trial
    # (BENCHMARKS.md, "Budget search"). Validation always uses every row.
    train_fraction: float = 1.0
    precision: str = "auto"  # see model/precision.py; resolved by the process that trains
    # Seconds the epochs may take in all; > 0: after each epoch the run plans as many epochs
    # as fit in what is left at the measured epoch time (at most max_epochs), and a cosine
    # schedule ends on the last of them. 0: exactly max_epochs.
    time_budget_s: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule: expected one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError(
                f"batch_size/micro_batch_size: expected >= 1, got "
                f"{self.batch_size}/{self.micro_batch_size}"
            )
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size: expected a divisor of batch_size {self.batch_size}, "
                f"got {self.micro_batch_size}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: expected > 0, got {self.learning_rate}")
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs: expected >= 1, got {self.max_epochs}")
        for name, low, high in (
            ("weight_decay", 0.0, 0.1),
            ("label_smoothing", 0.0, 0.5),
            ("mixup", 0.0, 2.0),
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and low <= value <= high):
                raise ValueError(f"{name}: expected a number in [{low}, {high}], got {value!r}")
        from model.precision import check_precision

        check_precision(self.precision)
        if not (isinstance(self.train_fraction, int | float) and 0 < self.train_fraction <= 1):
            raise ValueError(
                f"train_fraction: expected a number in (0, 1], got {self.train_fraction!r}"
            )
        if not (isinstance(self.time_budget_s, int | float) and self.time_budget_s >= 0):
            raise ValueError(f"time_budget_s: expected a number >= 0, got {self.time_budget_s!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "training") -> TrainingConfig:
        """A config from its JSON form (a field it lacks keeps its default); a ValueError
        names the fields it does not know."""
        return cls(**_known_fields(cls, values, where))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: what Tune's trial config and the logged run config hold."""
        return asdict(self)

    @property
    def soft_labels(self) -> bool:
        """Label smoothing and mixup train on one-hot (mixed) labels, not class indices."""
        return self.label_smoothing > 0 or self.mixup > 0

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size


@dataclass(frozen=True)
class TrialPlan:
    """One trial as planned: its model config (a plain JSON dict, as logged) and training
    config."""

    name: str
    model: dict[str, Any]
    training: TrainingConfig
    phase: str = EXPLORE
    # A final trial starts from the weights of the explored trial it continues (a Tune
    # checkpoint's path or URI), named in `warm_start_from`.
    warm_start: str = ""
    warm_start_from: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "training": self.training.to_dict()}


@dataclass(frozen=True)
class TrialPlacement:
    """What a trial was placed by (`jobs.resources.place` on the planner's worker budget), in
    MiB: what counts against the worker budget (the whole trial on a CPU worker, the card's
    share on a GPU worker: against `gpu_peak_memory_mb`), the host memory reserved (against the
    trial's `peak_memory_mb`), the Ray resources and label selector that reserve it, and the
    factor on the calibration's epoch time estimate the trials so far measured."""

    status: str  # "fits", "downsized", "does_not_fit"
    estimated_mb: float
    host_mb: float
    param_count: int
    resources: dict[str, float] = field(default_factory=dict)
    label_selector: dict[str, str] = field(default_factory=dict)
    gpu_memory_limit_mb: float = 0.0
    reason: str = ""
    min_estimated_mb: float = 0.0  # at the smallest micro-batch tried (refusals only)
    epoch_time_correction: float = 1.0

    @property
    def on_card(self) -> bool:
        return bool(self.resources.get("GPU"))

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "placement") -> TrialPlacement:
        """A placement from its JSON form; a ValueError names the fields it does not know."""
        return cls(**_known_fields(cls, values, where))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: what Tune's trial config and the parent's search/space.json hold."""
        return asdict(self)


@dataclass(frozen=True)
class PlacedTrial:
    """A plan with its placement and time estimate."""

    plan: TrialPlan
    placement: TrialPlacement
    estimated_epoch_seconds: float
    refusal: str = ""  # "", layout.STATUS_DOES_NOT_FIT or layout.STATUS_OVER_BUDGET
    reason: str = ""

    @property
    def uncorrected_epoch_seconds(self) -> float:
        """The calibration's epoch time estimate, before the correction the trials measured
        (`epoch_time_correction`) was applied: what a measured epoch is compared with."""
        return self.estimated_epoch_seconds / self.placement.epoch_time_correction

    def tune_config(self) -> dict[str, Any]:
        """What Tune's trial config holds: everything the trial and the logger need."""
        trial = {
            **self.plan.to_dict(),
            "phase": self.plan.phase,
            "warm_start": self.plan.warm_start,
            "warm_start_from": self.plan.warm_start_from,
            "resources": self.placement.resources,
            "label_selector": self.placement.label_selector,
            "gpu_memory_limit_mb": self.placement.gpu_memory_limit_mb,
            "placement": self.placement.to_dict(),
            "estimated_epoch_seconds": self.estimated_epoch_seconds,
        }
        return {"plan": self.plan.name, "trial": trial}


def placed_from_config(config: dict[str, Any]) -> PlacedTrial:
    """The placed trial a Tune trial config stands for (see `PlacedTrial.tune_config`)."""
    trial = config["trial"]
    plan = TrialPlan(
        trial["name"],
        trial["model"],
        TrainingConfig.from_dict(trial["training"], f"trial {trial['name']}: training"),
        trial.get("phase", EXPLORE),
        trial.get("warm_start", ""),
        trial.get("warm_start_from", ""),
    )
    placement = TrialPlacement.from_dict(trial["placement"], f"trial {trial['name']}: placement")
    return PlacedTrial(plan, placement, float(trial.get("estimated_epoch_seconds", 0.0)))


def flat_params(placed: PlacedTrial) -> dict[str, str]:
    """A trial's MLflow params: family, size, estimates, training and model config fields."""
    plan = placed.plan
    params = {
        "family": plan.model["family"],
        "plan_name": plan.name,
        "phase": plan.phase,
        "param_count": str(placed.placement.param_count),
        "estimated_memory_mb": f"{placed.placement.estimated_mb:.1f}",
        "estimated_epoch_seconds": f"{placed.estimated_epoch_seconds:.4g}",
        "placement": placed.placement.status,
        "estimated_host_memory_mb": f"{placed.placement.host_mb:.1f}",
    }
    if plan.warm_start_from:
        params["warm_start_from"] = plan.warm_start_from
    for key, value in plan.training.to_dict().items():
        params[key] = str(value)
    for key, value in plan.model.items():
        if key != "family":
            text = json.dumps(value) if isinstance(value, dict | list | tuple) else str(value)
            params[f"model.{key}"] = text[:6000]
    return params
