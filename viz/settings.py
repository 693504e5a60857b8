"""Every default of the `viz` entry point, in one place: the CLI and MLproject derive from it."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

# Layer names as Keras allows them; the check keeps a typo such as "conv 1" from reaching Keras.
_LAYER_NAME = re.compile(r"^[A-Za-z0-9_.\-/]+$")


def _int_at_least(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"VizSettings.{name}: expected an int >= {minimum}, found {value!r}")


def _positive_float(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"VizSettings.{name}: expected a finite float >= 0, found {value!r}")


@dataclass(frozen=True)
class VizSettings:
    """What to visualise and how hard to try.

    The first six fields are the MLproject `viz` parameters (same names, same defaults); the
    rest are tuning knobs with CLI flags but no MLproject parameter.
    """

    # "" = auto: best_run_id of the latest search, else the best best_val_accuracy run.
    run_id: str = ""
    # Data to rebuild the split from; "" or a path that does not exist = the source recorded
    # in the run's config.json (the SHA-256 check guards either way).
    data: str = "data/fer2013.csv"
    split: str = "PublicTest"
    # "" = only log to the run; else also write figures/ and the reports to this folder.
    out: str = ""
    filters_per_layer: int = 8
    # "" = every conv layer; else comma-separated layer names.
    layers: str = ""
    # Gradient ascent (ActivationMaximization): iterations and regularisers.
    ascent_steps: int = 100
    ascent_learning_rate: float = 4.0
    ascent_jitter: int = 2
    ascent_tv_weight: float = 0.5
    ascent_l2_weight: float = 0.05
    # SmoothGrad: noisy copies per image and noise as a fraction of the image's value range.
    smooth_samples: int = 20
    smooth_noise: float = 0.2
    # Adebayo et al. (2018) sanity check: warn when trained vs randomised saliency correlate
    # above this Spearman rho (saliency that survives randomisation explains nothing).
    sanity_threshold: float = 0.5
    # Most-confused pairs listed in the report.
    top_confused: int = 5
    predict_batch_size: int = 256
    seed: int = 2017

    def __post_init__(self) -> None:
        for name in ("run_id", "data", "split", "out", "layers"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"VizSettings.{name}: expected a str, found {value!r}")
        if not self.split:
            raise ValueError(
                "VizSettings.split: expected a usage name such as 'PublicTest', found ''"
            )
        _int_at_least("filters_per_layer", self.filters_per_layer, 1)
        _int_at_least("ascent_steps", self.ascent_steps, 1)
        _int_at_least("ascent_jitter", self.ascent_jitter, 0)
        _int_at_least("smooth_samples", self.smooth_samples, 1)
        _int_at_least("top_confused", self.top_confused, 1)
        _int_at_least("predict_batch_size", self.predict_batch_size, 1)
        _int_at_least("seed", self.seed, 0)
        for name in ("ascent_learning_rate", "ascent_tv_weight", "ascent_l2_weight"):
            _positive_float(name, getattr(self, name))
        if self.ascent_learning_rate == 0:
            raise ValueError("VizSettings.ascent_learning_rate: expected > 0, found 0")
        _positive_float("smooth_noise", self.smooth_noise)
        _positive_float("sanity_threshold", self.sanity_threshold)
        if self.sanity_threshold > 1:
            raise ValueError(
                f"VizSettings.sanity_threshold: expected a rank correlation in [0, 1], "
                f"found {self.sanity_threshold}"
            )
        for name in self.layer_names():
            if not _LAYER_NAME.match(name):
                raise ValueError(
                    f"VizSettings.layers: expected comma-separated layer names, found {name!r}"
                )

    def layer_names(self) -> list[str]:
        """The `layers` setting as a list; empty means every conv layer."""
        return [name.strip() for name in self.layers.split(",") if name.strip()]
