"""Points of the search space from what trials logged: how a later search reuses them.

`point_from_config` turns a trial's model and training configs back into the point of
`jobs.space.define_space` they stand for (checked by re-encoding it); `point_distributions`
gives Optuna's distribution of each of a point's parameters, so the model-based searcher can
be told the point as evaluated (jobs/search/explore.py).
"""

from __future__ import annotations

import json
from typing import Any

from jobs.plan import TrainingConfig
from jobs.space import (
    AUGMENTATIONS,
    _units_text,
    define_space,
    model_from_params,
    training_from_params,
)


def point_distributions(point: dict[str, Any], families: tuple[str, ...]) -> dict[str, Any]:
    """Optuna's distribution of each parameter of `point` (what `define_space` suggests for
    it); ValueError naming the parameter when the point is not one of the space."""
    import optuna

    trial = optuna.trial.FixedTrial(point)
    try:
        define_space(trial, families)
    except ValueError as error:  # a parameter missing, or a choice the space does not offer
        raise ValueError(f"point: not a point of the space of {families}: {error}") from error
    distributions = trial.distributions
    extra = sorted(set(point) - set(distributions))
    if extra:
        raise ValueError(f"point: {extra} are not parameters of the space of {families}")
    # A choice outside the space fails in `define_space` above; a number out of its range
    # only warns there.
    for name, distribution in distributions.items():
        if isinstance(distribution, optuna.distributions.FloatDistribution) and not (
            distribution.low <= float(point[name]) <= distribution.high
        ):
            raise ValueError(f"point: {name}={point[name]!r} is outside {distribution}")
    return distributions


def point_from_config(
    model: dict[str, Any], training: TrainingConfig, families: tuple[str, ...]
) -> dict[str, Any] | None:
    """The point of `define_space` over `families` (the searched ones, as in `Space`) a
    trial's model and training configs (as logged) stand for; None when they are not one.

    Checked by re-encoding: the point must give back the same model config and training
    fields through `model_from_params` and `training_from_params`."""
    from model.configs import config_to_dict

    try:
        candidates = _candidate_points(model, training, families)
        for point in candidates:
            encoded = config_to_dict(model_from_params({"family": model["family"], **point}))
            if _json(encoded) != _json(model):
                continue
            trained = training_from_params(point, 1, 0)
            if any(trained[key] != getattr(training, key) for key in _SEARCHED_TRAINING):
                continue
            point_distributions(point, families)
            return point
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return None


_SEARCHED_TRAINING = (
    "batch_size",
    "learning_rate",
    "optimizer",
    "lr_schedule",
    "weight_decay",
    "label_smoothing",
    "mixup",
)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _candidate_points(
    model: dict[str, Any], training: TrainingConfig, families: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Points that may encode `model` and `training` (one per augmentation for a CNN: the
    logged config holds the augmentation's fields, not its name)."""
    family = model["family"]
    if family not in families:
        return []
    point: dict[str, Any] = {"family": family} if len(families) > 1 else {}
    optimizer = training.optimizer
    rate_key = "training.sgd_learning_rate" if optimizer == "sgd" else "training.learning_rate"
    point.update(
        {
            "training.optimizer": optimizer,
            rate_key: float(training.learning_rate),
            "training.batch_size": int(training.batch_size),
            "training.weight_decay": float(training.weight_decay),
            "training.label_smoothing": float(training.label_smoothing),
            "training.mixup": float(training.mixup),
            "training.lr_schedule": training.lr_schedule,
        }
    )
    if family == "dnn":
        units = list(model["hidden_units"])
        point.update(
            {
                "dnn.depth": len(units),
                "dnn.width": int(units[0]),
                "dnn.dropout": float(model["dropout"]),
                "dnn.batch_norm": bool(model["batch_norm"]),
            }
        )
        return [point]
    filters = list(model["filters"])
    point.update(
        {
            "cnn.blocks": len(filters),
            "cnn.base_filters": int(filters[0]),
            "cnn.convs_per_block": int(model["convs_per_block"]),
            "cnn.kernel_size": int(model["kernel_size"]),
            "cnn.pooling": model["pooling"],
            "cnn.batch_norm": bool(model["batch_norm"]),
            "cnn.residual": bool(model["residual"]),
            "cnn.head_pooling": model["head_pooling"],
            "cnn.dropout": float(model["dropout"]),
            "cnn.dense_units": _units_text(model["dense_units"]),
            "cnn.normalization": model["normalization"],
        }
    )
    return [{**point, "cnn.augmentation": name} for name in AUGMENTATIONS]
