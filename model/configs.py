"""One entry point for both model families: JSON (de)serialisation and building.

`config_to_dict` output is plain JSON (lists, dicts, numbers, strings, bools, null) with a
"family" key; `config_from_dict` inverts it exactly.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import keras
import numpy as np

from model.cnn import CNNConfig, build_cnn, layer_spec_to_dict
from model.dnn import DNNConfig, build_dnn

ModelConfig = CNNConfig | DNNConfig
FAMILIES: dict[str, type] = {"cnn": CNNConfig, "dnn": DNNConfig}

__all__ = [
    "CNNConfig",
    "DNNConfig",
    "FAMILIES",
    "ModelConfig",
    "build_model",
    "config_family",
    "config_from_dict",
    "config_to_dict",
    "config_to_params",
]


def config_family(config: ModelConfig) -> str:
    """'cnn' or 'dnn'."""
    for family, cls in FAMILIES.items():
        if isinstance(config, cls):
            return family
    raise ValueError(f"config: expected CNNConfig or DNNConfig, found {type(config).__name__}")


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """JSON-ready dict of every field plus "family"; tuples become lists."""
    family = config_family(config)
    out: dict[str, Any] = {"family": family}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "augmentation":
            value = value.to_dict()
        elif f.name == "layers" and value is not None:
            value = [layer_spec_to_dict(spec) for spec in value]
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Rebuild a config from `config_to_dict` output (or its JSON round trip)."""
    if not isinstance(data, dict):
        raise ValueError(f"config: expected a dict, found {type(data).__name__}")
    family = data.get("family")
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {sorted(FAMILIES)}, found {family!r}")
    cls = FAMILIES[family]
    known = {f.name for f in dataclasses.fields(cls)}
    args = {k: v for k, v in data.items() if k != "family"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(
            f"config: unknown fields {unknown} for family {family!r}, expected {sorted(known)}"
        )
    # The dataclasses accept lists/dicts and normalise them (tuples, nested dataclasses).
    return cls(**args)


def config_to_params(config: ModelConfig, prefix: str = "model.") -> dict[str, str]:
    """Flat string form of every field, e.g. for MLflow params `model.<field>`.

    Scalars print as themselves; lists/dicts (filters, augmentation, layers) as compact JSON.
    """
    out = {}
    for key, value in config_to_dict(config).items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        out[f"{prefix}{key}"] = text
    return out


def build_model(
    config: ModelConfig, stats: tuple[np.ndarray, np.ndarray] | None = None
) -> keras.Model:
    """Build the model a config describes (`stats` required for normalization='standardize')."""
    if config_family(config) == "cnn":
        return build_cnn(config, stats)
    return build_dnn(config, stats)
