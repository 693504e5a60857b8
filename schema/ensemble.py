"""The ensemble run's config.json (`model/config.json` of the run with `fer.role` "ensemble"):
jobs/ensemble.py writes it, viz/ reads it, both through `EnsembleConfig`.

Its JSON keys are the file format existing stores hold: "family" ("ensemble"), "members"
(run_id, name, family, weight each), "flip", "data", "param_count", "report_table".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from schema.run import ENSEMBLE


@dataclass(frozen=True)
class EnsembleMember:
    """One trial in the ensemble and the weight of its probabilities in the mean."""

    run_id: str
    name: str
    family: str
    weight: float


@dataclass(frozen=True)
class ReportTable:
    """Accuracies on the `report` half of the validation rows (no part in choosing members)."""

    best_single: float
    best_single_flip: float
    ensemble: float
    ensemble_flip: float

    def chosen(self, flip: bool) -> float:
        """The accuracy of the ensemble as built (flip-averaged or not)."""
        return self.ensemble_flip if flip else self.ensemble


@dataclass(frozen=True)
class EnsembleConfig:
    """What the ensemble run logged about itself: members, weights, flip averaging, the data it
    was judged on and its accuracies on the report half."""

    members: tuple[EnsembleMember, ...]
    flip: bool
    report_table: ReportTable
    param_count: int
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The config.json content (the keys existing stores hold)."""
        return {
            "family": ENSEMBLE,
            "members": [
                {"run_id": m.run_id, "name": m.name, "family": m.family, "weight": m.weight}
                for m in self.members
            ],
            "flip": self.flip,
            "data": dict(self.data),
            "param_count": self.param_count,
            "report_table": {
                f.name: getattr(self.report_table, f.name) for f in fields(ReportTable)
            },
        }

    def params(self) -> dict[str, str]:
        """The run's MLflow params for the same facts (the UI's run table shows these)."""
        return {
            "members": ",".join(m.name for m in self.members),
            "weights": ",".join(f"{m.weight:.4f}" for m in self.members),
            "flip": str(self.flip),
        }

    @classmethod
    def from_dict(cls, found: Any, where: str = "ensemble config.json") -> EnsembleConfig:
        """The config from its JSON form; a ValueError names the field and what was expected."""
        if not isinstance(found, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(found).__name__}")
        if found.get("family") != ENSEMBLE:
            raise ValueError(f"{where}: family: expected {ENSEMBLE!r}, got {found.get('family')!r}")
        raw_members = found.get("members")
        if not isinstance(raw_members, list) or not raw_members:
            raise ValueError(f"{where}: members: expected a non-empty list, got {raw_members!r}")
        members = tuple(_member(m, f"{where}: members[{i}]") for i, m in enumerate(raw_members))
        flip = found.get("flip")
        if not isinstance(flip, bool):
            raise ValueError(f"{where}: flip: expected true or false, got {flip!r}")
        table = found.get("report_table")
        if not isinstance(table, dict):
            raise ValueError(f"{where}: report_table: expected an object, got {table!r}")
        report = ReportTable(
            **{
                f.name: _number(table.get(f.name), f"{where}: report_table.{f.name}")
                for f in fields(ReportTable)
            }
        )
        count = found.get("param_count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{where}: param_count: expected a positive integer, got {count!r}")
        data = found.get("data", {})
        if not isinstance(data, dict):
            raise ValueError(f"{where}: data: expected an object, got {data!r}")
        return cls(members=members, flip=flip, report_table=report, param_count=count, data=data)


def is_ensemble(config: dict[str, Any]) -> bool:
    """Whether a run's config.json is an ensemble's."""
    return config.get("family") == ENSEMBLE


def _member(found: Any, where: str) -> EnsembleMember:
    if not isinstance(found, dict):
        raise ValueError(f"{where}: expected an object with run_id, name, family, weight")
    text = {}
    for key in ("run_id", "name", "family"):
        value = found.get(key)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}.{key}: expected a non-empty string, got {value!r}")
        text[key] = value
    weight = _number(found.get("weight"), f"{where}.weight")
    if weight < 0:
        raise ValueError(f"{where}.weight: expected a weight >= 0, got {weight!r}")
    return EnsembleMember(weight=weight, **text)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return float(value)
