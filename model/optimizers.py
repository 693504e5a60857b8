"""The optimizers a trial can train with: names, construction and memory, in one place.

`build_optimizer` makes them (jobs/training.py) and `slots_per_variable` tells the memory
estimate (model/memory.py) how many copies of the trainable weights each one keeps, so the two
cannot drift apart (tests/test_memory.py builds each and counts its variables).
"""

from __future__ import annotations

from typing import Any

# Slots per trainable variable: Adam/AdamW keep two moments, SGD with momentum one velocity,
# RMSprop (momentum 0, not centred) one mean square.
OPTIMIZER_SLOTS: dict[str, int] = {"adam": 2, "adamw": 2, "sgd": 1, "rmsprop": 1}
OPTIMIZERS: tuple[str, ...] = tuple(OPTIMIZER_SLOTS)
SGD_MOMENTUM = 0.9


def _check(name: str) -> str:
    if name not in OPTIMIZER_SLOTS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, found {name!r}")
    return name


def slots_per_variable(name: str, accumulation_steps: int = 1) -> int:
    """Copies of each trainable variable the optimizer keeps; gradient accumulation (a
    micro-batch smaller than the batch) adds one accumulator per variable."""
    return OPTIMIZER_SLOTS[_check(name)] + (1 if accumulation_steps > 1 else 0)


def build_optimizer(
    name: str, learning_rate: float, weight_decay: float = 0.0, accumulation_steps: int = 1
) -> Any:
    """The Keras optimizer `name` stands for (SGD: Nesterov momentum 0.9), with decoupled
    `weight_decay` (0: none, AdamW included)."""
    import keras

    kwargs: dict[str, Any] = {"learning_rate": learning_rate}
    if accumulation_steps > 1:
        kwargs["gradient_accumulation_steps"] = accumulation_steps
    if _check(name) == "adamw":
        # Keras's AdamW defaults to 0.004; 0 here means no decay, as for the others.
        return keras.optimizers.AdamW(weight_decay=weight_decay, **kwargs)
    if weight_decay > 0:
        kwargs["weight_decay"] = weight_decay
    if name == "adam":
        return keras.optimizers.Adam(**kwargs)
    if name == "sgd":
        return keras.optimizers.SGD(momentum=SGD_MOMENTUM, nesterov=True, **kwargs)
    return keras.optimizers.RMSprop(**kwargs)
