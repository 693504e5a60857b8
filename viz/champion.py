"""What the viz says about an ensemble champion: its members, the report-half table, and which
member's filters stand for it (gradient ascent needs conv layers, which sit inside members)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlflow.entities import Run

from schema.ensemble import EnsembleConfig, ReportTable
from schema.run import MEMBER_REPORT_METRIC


@dataclass(frozen=True)
class Member:
    run_id: str
    name: str
    family: str
    weight: float
    report_accuracy: float | None


@dataclass
class EnsembleFacts:
    """An ensemble run's members and its accuracies on the `report` half of the validation
    rows (which took no part in choosing it)."""

    members: list[Member]
    flip: bool
    table: ReportTable
    report_rows: int
    filters_member: Member | None = None
    notes: list[str] = field(default_factory=list)

    def strongest_cnn(self) -> Member | None:
        """The CNN member with the best report accuracy (None when no member is a CNN)."""
        cnns = [m for m in self.members if m.family == "cnn"]
        return max(cnns, key=lambda m: m.report_accuracy or 0.0) if cnns else None


def ensemble_facts(run: Run, config: dict[str, Any]) -> EnsembleFacts:
    """The facts of an ensemble run, from its config.json and metrics."""
    logged = EnsembleConfig.from_dict(config, f"run {run.info.run_id}: config.json")
    members = [
        Member(
            run_id=m.run_id,
            name=m.name,
            family=m.family,
            weight=m.weight,
            report_accuracy=run.data.metrics.get(MEMBER_REPORT_METRIC + m.name),
        )
        for m in logged.members
    ]
    rows = int(float(run.data.params.get("report_rows", 0) or 0))
    return EnsembleFacts(
        members=members, flip=logged.flip, table=logged.report_table, report_rows=rows
    )
