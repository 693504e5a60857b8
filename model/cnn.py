"""Configurable CNN for 48x48 grey faces, and the SEED2017 coursework preset.

Two ways to describe the feature extractor:
- block mode (default): `filters` blocks of `convs_per_block` same-padded convolutions, each
  block followed by a 2x2 pool and dropout (the shape a search space samples);
- explicit mode: `layers`, a tuple of small layer specs (conv / pool / pad / dropout) used
  verbatim, which is what it takes to reproduce an irregular historical net such as SEED2017.
Both end in flatten (or global pooling) -> dense head -> 7-way softmax named "predictions".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import keras
import numpy as np

from model.preprocessing import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    AugmentationConfig,
    coerce_augmentation,
    image_input,
    preprocessing_block,
    validate_normalization,
)

ACTIVATIONS: tuple[str, ...] = ("relu", "elu", "selu", "gelu", "swish", "tanh", "leaky_relu")
POOLINGS: tuple[str, ...] = ("max", "avg")
HEAD_POOLINGS: tuple[str, ...] = ("flatten", "global_avg", "global_max")
PADDINGS: tuple[str, ...] = ("valid", "same")


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    # bool is an int subclass; a True filter count is a bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name}: expected an int >= {minimum}, found {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, found {value}")
    return int(value)


def _check_rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: expected a float in [0, 1), found {value!r}")
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name}: expected a float in [0, 1), found {value}")
    return float(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, found {value!r}")
    return value


def _int_tuple(name: str, value: Any, allow_empty: bool) -> tuple[int, ...]:
    if not isinstance(value, tuple | list):
        raise ValueError(f"{name}: expected a tuple of ints, found {type(value).__name__}")
    if not value and not allow_empty:
        raise ValueError(f"{name}: expected at least one entry, found an empty tuple")
    return tuple(_check_int(f"{name}[{i}]", v) for i, v in enumerate(value))


# ---------------------------------------------------------------- explicit layer specs


@dataclass(frozen=True)
class ConvSpec:
    """Conv2D + (batch norm if the config asks) + activation."""

    filters: int
    kernel_size: int = 3
    strides: int = 1
    padding: str = "valid"

    def __post_init__(self) -> None:
        _check_int("conv.filters", self.filters)
        _check_int("conv.kernel_size", self.kernel_size)
        _check_int("conv.strides", self.strides)
        _check_choice("conv.padding", self.padding, PADDINGS)


@dataclass(frozen=True)
class PoolSpec:
    """MaxPooling2D / AveragePooling2D with 'valid' padding."""

    kind: str = "max"
    pool_size: int = 2
    strides: int = 2

    def __post_init__(self) -> None:
        _check_choice("pool.kind", self.kind, POOLINGS)
        _check_int("pool.pool_size", self.pool_size)
        _check_int("pool.strides", self.strides)


@dataclass(frozen=True)
class PadSpec:
    """ZeroPadding2D, the same amount on every side."""

    padding: int = 1

    def __post_init__(self) -> None:
        _check_int("pad.padding", self.padding)


@dataclass(frozen=True)
class DropoutSpec:
    rate: float = 0.25

    def __post_init__(self) -> None:
        _check_rate("dropout.rate", self.rate)


LayerSpec = ConvSpec | PoolSpec | PadSpec | DropoutSpec
_SPEC_TYPES: dict[str, type] = {
    "conv": ConvSpec,
    "pool": PoolSpec,
    "pad": PadSpec,
    "dropout": DropoutSpec,
}
_SPEC_NAMES: dict[type, str] = {cls: name for name, cls in _SPEC_TYPES.items()}


def layer_spec_to_dict(spec: LayerSpec) -> dict[str, Any]:
    """JSON form of a spec: its fields plus "type"."""
    return {"type": _SPEC_NAMES[type(spec)], **asdict(spec)}


def layer_spec_from_dict(data: dict[str, Any] | LayerSpec, where: str = "layers") -> LayerSpec:
    """Rebuild a spec from its JSON form (specs pass through unchanged)."""
    if isinstance(data, tuple(_SPEC_TYPES.values())):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a layer spec dict, found {type(data).__name__}")
    kind = data.get("type")
    if kind not in _SPEC_TYPES:
        raise ValueError(f"{where}.type: expected one of {sorted(_SPEC_TYPES)}, found {kind!r}")
    cls = _SPEC_TYPES[kind]
    known = {f.name for f in fields(cls)}
    args = {k: v for k, v in data.items() if k != "type"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(
            f"{where}: unknown fields {unknown} for type {kind!r}, expected {sorted(known)}"
        )
    return cls(**args)


# ---------------------------------------------------------------- config


@dataclass(frozen=True)
class CNNConfig:
    """A CNN architecture.

    `layers`, when given, replaces the block-based generator (`filters`, `convs_per_block`,
    `kernel_size`, `pooling`, `residual` are then ignored; dropout inside the extractor comes
    from its dropout specs). `dropout` always applies after each hidden dense layer, and in
    block mode after each block; `batch_norm` goes after every conv and hidden dense layer.
    `residual` (block mode) adds each block's input to its last conv's output before the
    activation (He et al. 2016), through a 1x1 conv where the channel count changes.
    """

    filters: tuple[int, ...] = (32, 64, 128)
    convs_per_block: int = 2
    kernel_size: int = 3
    pooling: str = "max"
    batch_norm: bool = False
    dropout: float = 0.25
    dense_units: tuple[int, ...] = (256,)
    activation: str = "relu"
    head_pooling: str = "flatten"
    normalization: str = "rescale"
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    layers: tuple[LayerSpec, ...] | None = None
    residual: bool = False

    def __post_init__(self) -> None:
        # Lists and dicts (from JSON) are normalised to tuples and dataclasses, so equality and
        # round trips hold whichever form the caller used.
        set_ = object.__setattr__
        set_(self, "filters", _int_tuple("filters", self.filters, allow_empty=True))
        _check_int("convs_per_block", self.convs_per_block)
        _check_int("kernel_size", self.kernel_size)
        _check_choice("pooling", self.pooling, POOLINGS)
        if not isinstance(self.batch_norm, bool):
            raise ValueError(f"batch_norm: expected a bool, found {self.batch_norm!r}")
        if not isinstance(self.residual, bool):
            raise ValueError(f"residual: expected a bool, found {self.residual!r}")
        set_(self, "dropout", _check_rate("dropout", self.dropout))
        set_(self, "dense_units", _int_tuple("dense_units", self.dense_units, allow_empty=True))
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("head_pooling", self.head_pooling, HEAD_POOLINGS)
        validate_normalization(self.normalization)
        set_(self, "augmentation", coerce_augmentation(self.augmentation))
        if self.layers is not None:
            if not isinstance(self.layers, tuple | list) or not self.layers:
                raise ValueError(
                    f"layers: expected None or a non-empty tuple of layer specs, "
                    f"found {self.layers!r}"
                )
            specs = tuple(
                layer_spec_from_dict(s, f"layers[{i}]") for i, s in enumerate(self.layers)
            )
            set_(self, "layers", specs)
            if not any(isinstance(s, ConvSpec) for s in specs):
                raise ValueError("layers: expected at least one conv spec, found none")
        elif not self.filters:
            raise ValueError("filters: expected at least one block when layers is None, found ()")
        feature_shapes(self)  # raises if the spatial size collapses

    @property
    def specs(self) -> tuple[LayerSpec, ...]:
        """The feature extractor as explicit specs (block mode expanded)."""
        return tuple(spec for _, spec in _named_specs(self))


def feature_shapes(config: CNNConfig) -> list[tuple[int, int, int]]:
    """Output (height, width, channels) of every spec, computed without building the model.

    Raises ValueError naming the field whose layers shrink the image below 1x1.
    """
    height, width, channels = IMAGE_SHAPE
    where = "layers" if config.layers is not None else "filters"
    shapes = []
    for i, spec in enumerate(config.specs):
        if isinstance(spec, ConvSpec):
            if spec.padding == "same":
                height, width = -(-height // spec.strides), -(-width // spec.strides)
            else:
                height = (height - spec.kernel_size) // spec.strides + 1
                width = (width - spec.kernel_size) // spec.strides + 1
            channels = spec.filters
        elif isinstance(spec, PoolSpec):
            height = (height - spec.pool_size) // spec.strides + 1
            width = (width - spec.pool_size) // spec.strides + 1
        elif isinstance(spec, PadSpec):
            height, width = height + 2 * spec.padding, width + 2 * spec.padding
        if height < 1 or width < 1:
            raise ValueError(
                f"{where}: expected every layer to keep at least 1x1 pixels, found "
                f"{max(height, 0)}x{max(width, 0)} after layer {i} ({spec})"
            )
        shapes.append((height, width, channels))
    return shapes


# ---------------------------------------------------------------- builder


def dense_head(
    x: keras.KerasTensor, units: tuple[int, ...], dropout: float, batch_norm: bool, activation: str
) -> keras.KerasTensor:
    """Hidden dense layers (each: Dense [-> BN] -> activation [-> dropout]) then the softmax.

    The softmax is the final Dense's own activation so tf-keras-vis can swap it to linear.
    """
    for i, n in enumerate(units, start=1):
        if batch_norm:
            x = keras.layers.Dense(n, use_bias=False, name=f"dense{i}")(x)
            x = keras.layers.BatchNormalization(name=f"dense{i}_bn")(x)
            x = keras.layers.Activation(activation, name=f"dense{i}_{activation}")(x)
        else:
            x = keras.layers.Dense(n, activation=activation, name=f"dense{i}")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"dense{i}_dropout")(x)
    # float32 whatever the precision policy: mixed-precision models predict as float32 ones.
    return keras.layers.Dense(
        NUM_CLASSES, activation="softmax", name="predictions", dtype="float32"
    )(x)


def _named_specs(config: CNNConfig) -> list[tuple[str, LayerSpec]]:
    """Each feature-extractor spec with its layer name.

    Block mode: block{b}_conv{c}, block{b}_maxpool, block{b}_dropout; explicit mode: conv1,
    pad1, maxpool1, avgpool1, dropout1, ... numbered per kind.
    """
    if config.layers is None:
        named: list[tuple[str, LayerSpec]] = []
        for b, filters in enumerate(config.filters, start=1):
            for c in range(1, config.convs_per_block + 1):
                spec = ConvSpec(filters, config.kernel_size, 1, "same")
                named.append((f"block{b}_conv{c}", spec))
            named.append((f"block{b}_{config.pooling}pool", PoolSpec(config.pooling, 2, 2)))
            if config.dropout > 0:
                named.append((f"block{b}_dropout", DropoutSpec(config.dropout)))
        return named
    counts: dict[str, int] = {}
    named = []
    for spec in config.layers:
        kind = f"{spec.kind}pool" if isinstance(spec, PoolSpec) else _SPEC_NAMES[type(spec)]
        counts[kind] = counts.get(kind, 0) + 1
        named.append((f"{kind}{counts[kind]}", spec))
    return named


def build_cnn(config: CNNConfig, stats: tuple[np.ndarray, np.ndarray] | None = None) -> keras.Model:
    """Build the (uncompiled) CNN: raw pixels (None, 48, 48, 1) -> 7 softmax probabilities.

    `stats` = (mean, variance) from `pixel_statistics` is required for "standardize".
    """
    if not isinstance(config, CNNConfig):
        raise ValueError(f"config: expected CNNConfig, found {type(config).__name__}")
    inputs = image_input()
    x = preprocessing_block(inputs, config.normalization, config.augmentation, stats)
    residual = config.residual and config.layers is None
    block_input = x
    for layer_name, spec in _named_specs(config):
        if isinstance(spec, ConvSpec):
            block = layer_name.split("_", 1)[0]
            last_of_block = layer_name == f"{block}_conv{config.convs_per_block}"
            if residual and last_of_block:
                x = _residual_conv(x, block_input, spec, layer_name, block, config)
            else:
                x = _conv(x, spec, layer_name, config, activate=True)
        elif isinstance(spec, PoolSpec):
            pool_cls = (
                keras.layers.MaxPooling2D if spec.kind == "max" else keras.layers.AveragePooling2D
            )
            x = pool_cls(spec.pool_size, strides=spec.strides, name=layer_name)(x)
        elif isinstance(spec, PadSpec):
            x = keras.layers.ZeroPadding2D(spec.padding, name=layer_name)(x)
        else:
            x = keras.layers.Dropout(spec.rate, name=layer_name)(x)
        if residual and layer_name.endswith(("pool", "dropout")):
            block_input = x  # the next block's shortcut starts after this pool (and dropout)

    if config.head_pooling == "flatten":
        x = keras.layers.Flatten(name="flatten")(x)
    elif config.head_pooling == "global_avg":
        x = keras.layers.GlobalAveragePooling2D(name="global_avgpool")(x)
    else:
        x = keras.layers.GlobalMaxPooling2D(name="global_maxpool")(x)
    outputs = dense_head(
        x, config.dense_units, config.dropout, config.batch_norm, config.activation
    )
    return keras.Model(inputs, outputs, name="cnn")


def _conv(
    x: keras.KerasTensor, spec: ConvSpec, name: str, config: CNNConfig, activate: bool
) -> keras.KerasTensor:
    """Conv2D [-> BN] [-> activation]."""
    # With batch norm the conv bias is redundant (BN's beta plays its role) and the activation
    # must come after BN, so it cannot be fused into the conv.
    fused = activate and not config.batch_norm
    x = keras.layers.Conv2D(
        spec.filters,
        spec.kernel_size,
        strides=spec.strides,
        padding=spec.padding,
        activation=config.activation if fused else None,
        use_bias=not config.batch_norm,
        name=name,
    )(x)
    if config.batch_norm:
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    if activate and not fused:
        x = keras.layers.Activation(config.activation, name=f"{name}_{config.activation}")(x)
    return x


def _residual_conv(
    x: keras.KerasTensor,
    block_input: keras.KerasTensor,
    spec: ConvSpec,
    name: str,
    block: str,
    config: CNNConfig,
) -> keras.KerasTensor:
    """The block's last conv, plus the block's input (projected where channels differ),
    then the activation."""
    x = _conv(x, spec, name, config, activate=False)
    shortcut = block_input
    if block_input.shape[-1] != spec.filters:
        shortcut = _conv(
            block_input, ConvSpec(spec.filters, 1, 1, "same"), f"{block}_shortcut", config, False
        )
    x = keras.layers.Add(name=f"{block}_add")([x, shortcut])
    return keras.layers.Activation(config.activation, name=f"{block}_{config.activation}")(x)


# ---------------------------------------------------------------- SEED2017 preset

# The 2017 coursework net. Pads and pools are what it takes to reproduce its conv output
# shapes 44x44x32, 19x19x64, 19x19x128, 9x9x256, 3x3x512 and its 3,146,503 parameters:
# 44 -pad1-> 46 -max5/2-> 21 -conv3-> 19 -pad1-> 21 -conv3-> 19 -avg3/2-> 9 -pad1-> 11
# -conv3-> 9 -pad1-> 11 -avg3/2-> 5 -conv3-> 3 -pad1-> 5 -avg3/2-> 2 -> flatten 2048.
SEED2017 = CNNConfig(
    dropout=0.5,
    dense_units=(512, 512, 512),
    activation="relu",
    batch_norm=False,
    normalization="rescale",
    layers=(
        ConvSpec(32, 5),
        PadSpec(1),
        PoolSpec("max", 5, 2),
        DropoutSpec(0.25),
        ConvSpec(64, 3),
        PadSpec(1),
        DropoutSpec(0.25),
        ConvSpec(128, 3),
        PoolSpec("avg", 3, 2),
        PadSpec(1),
        DropoutSpec(0.25),
        ConvSpec(256, 3),
        PadSpec(1),
        PoolSpec("avg", 3, 2),
        DropoutSpec(0.25),
        ConvSpec(512, 3),
        PadSpec(1),
        PoolSpec("avg", 3, 2),
        DropoutSpec(0.25),
    ),
)
SEED2017_PARAMS = 3146503
