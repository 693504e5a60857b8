"""How a trial was trained, in the report's words: optimizer, schedule, batch, augmentation,
regularisation, and its phases (a final trial continues an explored one's weights, so its
epochs are the explored ones plus its own, on different rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlflow.entities import Run

from schema import run as layout
from viz.runs import BEST_METRIC


@dataclass(frozen=True)
class Phase:
    """One run's share of a model's training."""

    name: str  # "explored", "final" or "trained"
    run_id: str
    run_name: str
    epochs: int
    train_fraction: float
    rows: int | None  # training rows per epoch (None where the data's size is not recorded)
    schedule: str
    best_val_accuracy: float | None


@dataclass
class Recipe:
    settings: list[tuple[str, str]]  # (what, how), in reading order
    phases: list[Phase]

    @property
    def epochs(self) -> int:
        return sum(p.epochs for p in self.phases)


def explored_of(run: Run, children: list[Run]) -> Run | None:
    """The explored trial a final trial started from (None for any other run)."""
    source = run.data.params.get(layout.PARAM_WARM_START_FROM, "")
    if not source:
        return None
    found = [
        c
        for c in children
        if c.info.run_name == source
        and c.info.run_id != run.info.run_id
        and c.data.tags.get(layout.TAG_PHASE) != layout.PHASE_FINAL
        and BEST_METRIC in c.data.metrics
    ]
    return max(found, key=lambda c: c.info.start_time) if found else None


def _phase(name: str, run: Run, training: dict[str, Any], train_rows: int | None) -> Phase:
    params = run.data.params
    fraction = float(params.get(layout.PARAM_TRAIN_FRACTION, training.get("train_fraction", 1.0)))
    epochs = run.data.tags.get(layout.TAG_EPOCHS_DONE)
    return Phase(
        name=name,
        run_id=run.info.run_id,
        run_name=run.info.run_name or run.info.run_id[:8],
        epochs=int(epochs) if epochs else int(training.get("max_epochs", 0) or 0),
        train_fraction=fraction,
        rows=max(1, round(train_rows * fraction)) if train_rows else None,
        schedule=str(params.get("lr_schedule", training.get("lr_schedule", "constant"))),
        best_val_accuracy=run.data.metrics.get(BEST_METRIC),
    )


def recipe_of(run: Run, config: dict[str, Any], children: list[Run]) -> Recipe:
    """The recipe of the model `run` saved (config.json), with the explored phase a final
    trial continued."""
    training = dict(config.get("training") or {})
    model = dict(config.get("model") or {})
    rows = config.get("data", {}).get("train_rows")
    train_rows = int(rows) if rows else None
    explored = explored_of(run, children)
    if explored is not None:
        phases = [
            _phase("explored", explored, {}, train_rows),
            _phase("final", run, training, train_rows),
        ]
    else:
        phases = [_phase("trained", run, training, train_rows)]
    return Recipe(_settings(training, model, phases), phases)


def _settings(
    training: dict[str, Any], model: dict[str, Any], phases: list[Phase]
) -> list[tuple[str, str]]:
    optimizer = str(training.get("optimizer", "?"))
    rate = training.get("learning_rate")
    distinct = list(dict.fromkeys(p.schedule for p in phases))
    schedules = (
        distinct[0]
        if len(distinct) == 1
        else ", then ".join(f"{p.schedule} ({p.name})" for p in phases)
    )
    batch = training.get("batch_size")
    micro = training.get("micro_batch_size")
    batch_text = str(batch) if batch is not None else "?"
    if batch and micro and int(micro) < int(batch):
        batch_text += f" (micro-batches of {micro}, gradients accumulated)"
    found = [
        ("optimizer", optimizer + (f", learning rate {rate:g}" if rate is not None else "")),
        ("learning-rate schedule", schedules),
        ("batch size", batch_text),
        ("input normalisation", str(model.get("normalization", "?"))),
        ("augmentation", augmentation_text(model.get("augmentation") or {})),
        ("regularisation", regularisation_text(training, model)),
        ("precision", str(training.get("precision", "?"))),
        ("seed", str(training.get("seed", "?"))),
    ]
    return [(what, how) for what, how in found if how != "?"]


def augmentation_text(augmentation: dict[str, Any]) -> str:
    """The training-only augmentation in words ("none" when every layer is off)."""
    parts = []
    if augmentation.get("flip"):
        parts.append("horizontal flips")
    if augmentation.get("shift"):
        parts.append(f"shifts up to {float(augmentation['shift']) * 100:g} %")
    if augmentation.get("rotation"):
        parts.append(f"rotations up to {float(augmentation['rotation']) * 360:g}°")
    if augmentation.get("zoom"):
        parts.append(f"zoom up to {float(augmentation['zoom']) * 100:g} %")
    if augmentation.get("crop"):
        parts.append(f"pad-and-crop by up to {int(augmentation['crop'])} pixels")
    return ", ".join(parts) or "none"


def regularisation_text(training: dict[str, Any], model: dict[str, Any]) -> str:
    """Dropout, batch norm, weight decay, label smoothing and mixup, in words."""
    parts = []
    if model.get("dropout"):
        where = (
            "after each block and hidden dense layer"
            if model.get("layers") is None
            else ("after each hidden dense layer, plus the extractor's own dropout layers")
        )
        parts.append(f"dropout {float(model['dropout']):g} {where}")
    if model.get("batch_norm"):
        parts.append("batch normalisation")
    if training.get("weight_decay"):
        parts.append(f"weight decay {float(training['weight_decay']):g}")
    if training.get("label_smoothing"):
        parts.append(f"label smoothing {float(training['label_smoothing']):g}")
    if training.get("mixup"):
        parts.append(f"mixup (alpha {float(training['mixup']):g})")
    return ", ".join(parts) or "none"
