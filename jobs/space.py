"""The search space: what a model-based searcher (Optuna's TPE through Ray Tune) proposes from.

`define_space` is the space; `model_from_params` and `training_from_params` turn a proposed
point into the model and training configs of a trial plan (`jobs/proposals.py` places it
before Ray sees it). Fixed points anchor the search: the known-good `FAST_CNN` (a point of the
space, so the searcher learns from it), the coursework CNN `SEED2017` and a DNN with its
parameter count (coursework questions 1 and 2).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any

from jobs.plan import TrainingConfig, TrialPlan
from model.cnn import SEED2017, SEED2017_PARAMS, CNNConfig
from model.configs import config_to_dict
from model.dnn import DNNConfig, param_matched_dnn

FAMILIES = ("cnn", "dnn")
AUGMENTATIONS: dict[str, dict[str, Any]] = {
    "none": {"flip": False, "shift": 0.0, "rotation": 0.0, "zoom": 0.0},
    "light": {"flip": True, "shift": 0.05, "rotation": 0.0, "zoom": 0.0},
    "strong": {"flip": True, "shift": 0.1, "rotation": 0.05, "zoom": 0.1},
    # Pad-and-crop by 4 pixels with flips, as in most published FER2013 training code.
    "crop": {"flip": True, "crop": 4},
}
# The known-good CNN, as a point of the space (`define_space`): the one definition of it; its
# model config is `FAST_CNN` below. Lightly regularised: an hour on a CPU core trains it for
# about 20 epochs, too few for heavy regularisation to pay (dropout 0.1 with flips and 5 %
# shifts against heavier recipes side by side: BENCHMARKS.md, "recipes"). Explored at a
# constant rate; the final trains it on a cosine that ends with the budget.
KNOWN_GOOD_CNN: dict[str, Any] = {
    "cnn.blocks": 4,
    "cnn.base_filters": 32,
    "cnn.convs_per_block": 1,
    "cnn.kernel_size": 3,
    "cnn.pooling": "max",
    "cnn.batch_norm": True,
    "cnn.residual": False,
    "cnn.head_pooling": "flatten",
    "cnn.dropout": 0.1,
    "cnn.dense_units": "256",
    "cnn.normalization": "standardize",
    "cnn.augmentation": "light",
    "training.optimizer": "adam",
    "training.learning_rate": 0.001,
    "training.batch_size": 64,
    "training.weight_decay": 0.0,
    "training.label_smoothing": 0.0,
    "training.mixup": 0.0,
    "training.lr_schedule": "constant",
}
FAST_CNN_SCHEDULE = KNOWN_GOOD_CNN["training.lr_schedule"]
# The first proposals after the known-good CNN (or the best config of earlier searches): the same
# model, more strongly regularised, as the model-based searcher's start-up points in place of
# random ones. Its light regularisation won at 20 epochs of every row (the recipes benchmark);
# on fewer rows or over more epochs, heavier is the likely gain. They cost what it costs per
# epoch, where TPE's random points of the whole space cost 2-8x more (BENCHMARKS.md, search
# value, large regime). Pad-and-crop keeps the known-good dropout: over 80 epochs of 10 % of
# the rows it beat cnn-fast by 2 points, and with dropout 0.3 it only tied it and was 9 points
# behind at 10 epochs, where an early rung ranks it (BENCHMARKS.md, recipes).
NEIGHBOURS: dict[str, dict[str, Any]] = {
    "crop": {"cnn.augmentation": "crop"},
    "smooth": {"training.label_smoothing": 0.1, "cnn.dropout": 0.3},
    "strong": {"cnn.augmentation": "strong", "cnn.dropout": 0.4},
}


def matched_dnn() -> DNNConfig:
    """The DNN of coursework question 2: SEED2017's parameter count in three equal layers.

    Batch norm, dropout 0.2, flips and small shifts, trained with a cosine schedule: 0.478
    PublicTest accuracy in 24 epochs on one core (BENCHMARKS.md), where the plain version
    (dropout 0.3, constant rate) reached 0.429 in 30.
    """
    return param_matched_dnn(
        SEED2017_PARAMS,
        depth=3,
        dropout=0.2,
        batch_norm=True,
        normalization="standardize",
        augmentation={"flip": True, "shift": 0.05},
    )


# What the adaptive part of the search explores (logged on the parent run as
# search/space.json): ranges as [low, high], choices as lists. `define_space` samples it.
SPACE: dict[str, Any] = {
    "cnn": {
        "blocks": [2, 3, 4],
        "base_filters": [16, 32, 64],
        "convs_per_block": [1, 2],
        "kernel_size": [3, 5],
        "pooling": ["max", "avg"],
        "batch_norm": [True, False],
        "residual": [False, True],
        "head_pooling": ["flatten", "global_avg"],
        "dropout": [0.1, 0.5],
        "dense_units": [[], [128], [256], [512, 256]],
        "normalization": ["standardize", "rescale"],
        "augmentation": ["none", "light", "strong", "crop"],
    },
    "dnn": {
        "depth": [2, 3, 4],
        "width": [256, 512, 1024, 2048],
        "dropout": [0.1, 0.5],
        "batch_norm": [True, False],
    },
    "training": {
        "learning_rate": [3e-4, 3e-3],  # adam, adamw (log-uniform)
        "sgd_learning_rate": [1e-2, 1e-1],  # SGD with Nesterov momentum (log-uniform)
        "batch_size": [32, 64, 128],
        "optimizer": ["adam", "adamw", "sgd"],
        "weight_decay": [0.0, 1e-4, 5e-4],
        "label_smoothing": [0.0, 0.1],
        "mixup": [0.0, 0.2],
        "lr_schedule": ["constant", "cosine"],
    },
}

# The coursework anchors: trained for questions 1 and 2, never a candidate for the final.
COURSEWORK_POINTS = ("dnn-matched", "seed2017")
# Trained to its end for question 2, so ASHA never ranks it (nor does it set a cut-off for the
# CNNs: jobs/scheduling.py). SEED2017 stays ranked: on a CPU its 30 epochs would take the
# budget.
UNRANKED_POINTS = ("dnn-matched",)


def adaptive_families(families: tuple[str, ...]) -> tuple[str, ...]:
    """The families the model-based searcher proposes from: the CNNs wherever they are searched.

    Measured in a 60-minute search (BENCHMARKS.md): at the first rung of a
    lower-fidelity exploration, DNNs are ahead (0.30 against 0.25 for the known-good CNN,
    which reaches 0.58 trained in full), so TPE proposed 11 DNNs out of 14 and the CNNs that
    win at the end were stopped. DNN-only searches propose DNNs; the param-matched DNN stays a
    fixed point for the CNN/DNN comparison.
    """
    return ("cnn",) if "cnn" in families else families


def parse_families(text: str) -> tuple[str, ...]:
    names = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in FAMILIES]
    if not names or unknown:
        raise ValueError(f"families: expected a comma list of {FAMILIES}, got {text!r}")
    return names


def define_space(trial: Any, families: tuple[str, ...]) -> dict[str, Any]:
    """Optuna define-by-run space (Ray Tune's `OptunaSearch(space=...)`): family-conditional
    parameters, flat names. Returns the constants (the family where only one is searched)."""
    constants: dict[str, Any] = {}
    if len(families) > 1:
        family = trial.suggest_categorical("family", list(families))
    else:
        family = constants["family"] = families[0]
    if family == "cnn":
        cnn = SPACE["cnn"]
        trial.suggest_categorical("cnn.blocks", cnn["blocks"])
        trial.suggest_categorical("cnn.base_filters", cnn["base_filters"])
        trial.suggest_categorical("cnn.convs_per_block", cnn["convs_per_block"])
        trial.suggest_categorical("cnn.kernel_size", cnn["kernel_size"])
        trial.suggest_categorical("cnn.pooling", cnn["pooling"])
        trial.suggest_categorical("cnn.batch_norm", cnn["batch_norm"])
        trial.suggest_categorical("cnn.residual", cnn["residual"])
        trial.suggest_categorical("cnn.head_pooling", cnn["head_pooling"])
        trial.suggest_float("cnn.dropout", *cnn["dropout"])
        # Optuna's choices must be plain scalars: the hidden layers as text.
        trial.suggest_categorical("cnn.dense_units", [_units_text(u) for u in cnn["dense_units"]])
        trial.suggest_categorical("cnn.normalization", cnn["normalization"])
        trial.suggest_categorical("cnn.augmentation", cnn["augmentation"])
    else:
        dnn = SPACE["dnn"]
        trial.suggest_categorical("dnn.depth", dnn["depth"])
        trial.suggest_categorical("dnn.width", dnn["width"])
        trial.suggest_float("dnn.dropout", *dnn["dropout"])
        trial.suggest_categorical("dnn.batch_norm", dnn["batch_norm"])
    training = SPACE["training"]
    optimizer = trial.suggest_categorical("training.optimizer", training["optimizer"])
    # SGD needs a rate ten times Adam's: two parameters, so each keeps one distribution.
    if optimizer == "sgd":
        trial.suggest_float("training.sgd_learning_rate", *training["sgd_learning_rate"], log=True)
    else:
        trial.suggest_float("training.learning_rate", *training["learning_rate"], log=True)
    for name in ("batch_size", "weight_decay", "label_smoothing", "mixup", "lr_schedule"):
        trial.suggest_categorical(f"training.{name}", training[name])
    return constants


class Space:
    """`define_space` for some families, as a picklable callable (the searcher that holds it
    is checkpointed with the search)."""

    def __init__(self, families: tuple[str, ...]) -> None:
        self.families = families

    def __call__(self, trial: Any) -> dict[str, Any]:
        return define_space(trial, self.families)


def _units_text(units: list[int] | tuple[int, ...]) -> str:
    return ",".join(str(u) for u in units) or "none"


def _units(text: str) -> tuple[int, ...]:
    return () if text == "none" else tuple(int(u) for u in text.split(","))


def model_from_params(params: dict[str, Any]) -> CNNConfig | DNNConfig:
    """The model config a point of `define_space` stands for."""
    if params["family"] == "cnn":
        blocks, base = int(params["cnn.blocks"]), int(params["cnn.base_filters"])
        return CNNConfig(
            filters=tuple(min(base * 2**i, 512) for i in range(blocks)),
            convs_per_block=int(params["cnn.convs_per_block"]),
            kernel_size=int(params["cnn.kernel_size"]),
            pooling=params["cnn.pooling"],
            batch_norm=bool(params["cnn.batch_norm"]),
            residual=bool(params["cnn.residual"]),
            head_pooling=params["cnn.head_pooling"],
            dropout=round(float(params["cnn.dropout"]), 3),
            dense_units=_units(params["cnn.dense_units"]),
            normalization=params["cnn.normalization"],
            augmentation=AUGMENTATIONS[params["cnn.augmentation"]],
        )
    depth, width = int(params["dnn.depth"]), int(params["dnn.width"])
    return DNNConfig(
        hidden_units=tuple(max(64, width // 2**i) for i in range(depth)),
        dropout=round(float(params["dnn.dropout"]), 3),
        batch_norm=bool(params["dnn.batch_norm"]),
        normalization="standardize",
    )


def training_from_params(params: dict[str, Any], max_epochs: int, seed: int) -> dict[str, Any]:
    """The training fields (jobs.training.TrainingConfig) a point of `define_space` stands for."""
    optimizer = params["training.optimizer"]
    rate_key = "training.sgd_learning_rate" if optimizer == "sgd" else "training.learning_rate"
    batch = int(params["training.batch_size"])
    return {
        "batch_size": batch,
        "micro_batch_size": batch,
        "learning_rate": round(float(params[rate_key]), 6),
        "optimizer": optimizer,
        "max_epochs": max_epochs,
        "seed": seed,
        "lr_schedule": params["training.lr_schedule"],
        "weight_decay": float(params["training.weight_decay"]),
        "label_smoothing": float(params["training.label_smoothing"]),
        "mixup": float(params["training.mixup"]),
    }


def space_digest(families: tuple[str, ...]) -> str:
    """SHA-256 of what the model-based searcher proposes from for `families`: the searched
    families' ranges, the training ranges and the augmentations, as canonical JSON. Two
    searches with the same digest (and data) can learn from each other's trials
    (jobs/tracking/history.py)."""
    searched = adaptive_families(families)
    definition = {
        "families": list(searched),
        "space": {name: SPACE[name] for name in (*searched, "training")},
        "augmentations": AUGMENTATIONS,
    }
    canonical = json.dumps(definition, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def fast_cnn_point(families: tuple[str, ...]) -> dict[str, Any]:
    """The known-good CNN trained as the fixed points are, as a point of `define_space` (the
    searcher evaluates it first and learns from it like from its own proposals)."""
    return {**KNOWN_GOOD_CNN, "family": "cnn"} if len(families) > 1 else dict(KNOWN_GOOD_CNN)


def neighbours(point: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(suffix, point) for each of NEIGHBOURS that applies to `point` (all its parameters are
    the point's) and changes it, in NEIGHBOURS' order."""
    found = []
    for suffix, changes in NEIGHBOURS.items():
        if set(changes) <= set(point):
            near = {**point, **changes}
            if near != point:
                found.append((suffix, near))
    return found


def fixed_points(
    families: tuple[str, ...],
    max_epochs: int,
    seed: int,
    train_fraction: float = 1.0,
    precision: str = "auto",
) -> list[TrialPlan]:
    """The CPU-efficient CNN, then SEED2017's parameter-matched DNN, then SEED2017 itself,
    trained as in the coursework (Adam, batch 64), on `train_fraction` of the rows (the DNN on
    every row).

    Cheap first: Tune launches in this order, and on a laptop CPU one SEED2017 epoch takes
    tens of minutes, so a time-boxed search must not wait behind it. The first is also a point
    of the adaptive space (`fast_cnn_point`); the coursework pair lies outside it.
    """
    training = TrainingConfig(
        batch_size=64,
        micro_batch_size=64,
        learning_rate=0.001,
        optimizer="adam",
        max_epochs=max_epochs,
        seed=seed,
        train_fraction=train_fraction,
        precision=precision,
    )
    points = []
    if "cnn" in families:
        # One conv per block with batch norm: about 5x SEED2017's throughput on a laptop core.
        points.append(
            TrialPlan(
                "cnn-fast",
                config_to_dict(FAST_CNN),
                replace(training, lr_schedule=FAST_CNN_SCHEDULE),
            )
        )
    if "dnn" in families:
        # A cosine schedule: the DNN runs all max_epochs inside a budget, and at a constant
        # rate it plateaus; the CNNs usually stop early (ASHA, time budget) and keep theirs.
        # Every row, whatever the explored share: its answer to question 2 is the DNN's, not a
        # low-fidelity probe's (0.420 on a quarter of the rows, 0.492 on all of them in a
        # 60-minute search, BENCHMARKS.md), and a full DNN epoch (about 12 s on one core)
        # costs half a quarter-row epoch of the known-good CNN. ASHA leaves it out of its
        # rungs (jobs/scheduling.py).
        points.append(
            TrialPlan(
                "dnn-matched",
                config_to_dict(matched_dnn()),
                replace(training, lr_schedule="cosine", train_fraction=1.0),
            )
        )
    if "cnn" in families:
        points.append(TrialPlan("seed2017", config_to_dict(SEED2017), training))
    return points


FAST_CNN = model_from_params({**KNOWN_GOOD_CNN, "family": "cnn"})
