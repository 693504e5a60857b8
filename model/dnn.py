"""Fully connected baseline (flattened pixels -> dense stack -> softmax), and sizing it to a
parameter budget so it can be compared with a CNN of the same size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from model.cnn import ACTIVATIONS, _check_choice, _check_int, _check_rate, _int_tuple, dense_head
from model.preprocessing import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    AugmentationConfig,
    coerce_augmentation,
    image_input,
    preprocessing_block,
    validate_normalization,
)

_INPUT_FEATURES = int(np.prod(IMAGE_SHAPE))


@dataclass(frozen=True)
class DNNConfig:
    """A multilayer perceptron on the 2304 (normalised, augmented) pixels."""

    hidden_units: tuple[int, ...] = (512, 512, 512)
    dropout: float = 0.5
    batch_norm: bool = False
    activation: str = "relu"
    normalization: str = "rescale"
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "hidden_units", _int_tuple("hidden_units", self.hidden_units, allow_empty=True))
        set_(self, "dropout", _check_rate("dropout", self.dropout))
        if not isinstance(self.batch_norm, bool):
            raise ValueError(f"batch_norm: expected a bool, found {self.batch_norm!r}")
        _check_choice("activation", self.activation, ACTIVATIONS)
        validate_normalization(self.normalization)
        set_(self, "augmentation", coerce_augmentation(self.augmentation))


def dnn_param_count(hidden_units: tuple[int, ...], batch_norm: bool = False) -> int:
    """What `build_dnn(...).count_params()` will be, without building it.

    With batch norm a hidden Dense has no bias and its BN has 4 weights per unit (gamma, beta,
    moving mean, moving variance; count_params counts the non-trainable ones too).
    """
    total, fan_in = 0, _INPUT_FEATURES
    for units in hidden_units:
        total += fan_in * units + (4 * units if batch_norm else units)
        fan_in = units
    return total + fan_in * NUM_CLASSES + NUM_CLASSES


def build_dnn(config: DNNConfig, stats: tuple[np.ndarray, np.ndarray] | None = None) -> keras.Model:
    """Build the (uncompiled) DNN: raw pixels (None, 48, 48, 1) -> 7 softmax probabilities.

    `stats` = (mean, variance) from `pixel_statistics` is required for "standardize".
    """
    if not isinstance(config, DNNConfig):
        raise ValueError(f"config: expected DNNConfig, found {type(config).__name__}")
    inputs = image_input()
    x = preprocessing_block(inputs, config.normalization, config.augmentation, stats)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = dense_head(
        x, config.hidden_units, config.dropout, config.batch_norm, config.activation
    )
    return keras.Model(inputs, outputs, name="dnn")


def _tapered(width: int, depth: int, taper: float) -> tuple[int, ...]:
    return tuple(max(1, round(width * taper**i)) for i in range(depth))


def param_matched_dnn(
    target_params: int, depth: int = 3, taper: float = 1.0, **config_kwargs: Any
) -> DNNConfig:
    """A DNNConfig with `depth` hidden layers whose parameter count is within 1% of the target.

    Layer i has width round(w * taper**i) (taper=1: equal widths); w is solved by bisection,
    since the count grows monotonically with w. Other DNNConfig fields come from config_kwargs.
    """
    target = _check_int("target_params", target_params)
    depth = _check_int("depth", depth)
    if isinstance(taper, bool) or not isinstance(taper, int | float) or not 0 < taper <= 1:
        raise ValueError(f"taper: expected a float in (0, 1], found {taper!r}")
    if "hidden_units" in config_kwargs:
        raise ValueError("hidden_units: solved by param_matched_dnn, found it in config_kwargs")
    batch_norm = config_kwargs.get("batch_norm", False)

    def count(width: int) -> int:
        return dnn_param_count(_tapered(width, depth, taper), bool(batch_norm))

    # Smallest w whose count reaches the target; the answer is it or its predecessor.
    low, high = 1, 2
    while count(high) < target:
        high *= 2
    while low < high:
        mid = (low + high) // 2
        if count(mid) < target:
            low = mid + 1
        else:
            high = mid
    best = min((w for w in (low - 1, low) if w >= 1), key=lambda w: abs(count(w) - target))
    error = abs(count(best) - target) / target
    if error > 0.01:
        raise ValueError(
            f"target_params: expected a target reachable within 1% with depth={depth}, "
            f"taper={taper}, found {target} (closest {count(best)}, {error:.1%} off)"
        )
    return DNNConfig(hidden_units=_tapered(best, depth, taper), **config_kwargs)
