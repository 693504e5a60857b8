"""Pixel statistics and the in-model preprocessing (normalisation + augmentation) layers.

Preprocessing lives inside every model so a saved `.keras` file predicts from raw 0..255
pixels and reloads with `safe_mode=True`: only stock Keras layers, no Lambda, no custom objects.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import keras
import numpy as np

from model.data.dataset import CLASS_NAMES, IMAGE_SIDE

IMAGE_SHAPE: tuple[int, int, int] = (IMAGE_SIDE, IMAGE_SIDE, 1)
NUM_CLASSES = len(CLASS_NAMES)
NORMALIZATIONS: tuple[str, ...] = ("rescale", "standardize", "none")
MAX_CROP = 12  # a quarter of the image: beyond that a crop loses the face

# Statistics are accumulated in float64 over chunks: exact enough and bounded memory on 28k images.
_STATS_CHUNK = 4096


def pixel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and (population) variance of uint8 images `(N, 48, 48, 1)`.

    Returns two float32 arrays of shape `(48, 48, 1)`, the `stats` argument of the builders.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images: expected dtype uint8, found {images.dtype}")
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"images: expected shape (N, 48, 48, 1), found {images.shape}")
    if images.shape[0] == 0:
        raise ValueError("images: expected at least one image, found N=0")
    total = np.zeros(IMAGE_SHAPE, np.float64)
    total_sq = np.zeros(IMAGE_SHAPE, np.float64)
    for start in range(0, images.shape[0], _STATS_CHUNK):
        chunk = images[start : start + _STATS_CHUNK].astype(np.float64)
        total += chunk.sum(axis=0)
        total_sq += np.square(chunk).sum(axis=0)
    count = float(images.shape[0])
    mean = total / count
    # Clip tiny negative values from cancellation; sums of squares are exact in float64 here.
    variance = np.maximum(total_sq / count - np.square(mean), 0.0)
    return mean.astype(np.float32), variance.astype(np.float32)


@dataclass(frozen=True)
class AugmentationConfig:
    """Training-only augmentation; each 0 / False disables that layer.

    shift: max translation as a fraction of height/width; rotation: max rotation as a fraction
    of a full turn (Keras `RandomRotation` factor); zoom: max zoom in/out as a fraction;
    crop: pad-and-crop by up to this many pixels (zero padding, whole-pixel shifts).
    """

    flip: bool = False
    shift: float = 0.0
    rotation: float = 0.0
    zoom: float = 0.0
    crop: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.flip, bool):
            raise ValueError(f"augmentation.flip: expected a bool, found {self.flip!r}")
        if (
            isinstance(self.crop, bool)
            or not isinstance(self.crop, int | np.integer)
            or not 0 <= self.crop <= MAX_CROP
        ):
            raise ValueError(
                f"augmentation.crop: expected an int of pixels in [0, {MAX_CROP}], "
                f"found {self.crop!r}"
            )
        object.__setattr__(self, "crop", int(self.crop))
        for name in ("shift", "rotation", "zoom"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"augmentation.{name}: expected a number, found {value!r}")
            if not (math.isfinite(value) and 0.0 <= value < 1.0):
                raise ValueError(f"augmentation.{name}: expected 0 <= value < 1, found {value!r}")
            object.__setattr__(self, name, float(value))

    @property
    def enabled(self) -> bool:
        return self.flip or self.shift > 0 or self.rotation > 0 or self.zoom > 0 or self.crop > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentationConfig:
        if not isinstance(data, dict):
            raise ValueError(f"augmentation: expected a dict, found {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"augmentation: unknown fields {unknown}, expected a subset of {sorted(known)}"
            )
        return cls(**data)


def coerce_augmentation(value: AugmentationConfig | dict[str, Any] | None) -> AugmentationConfig:
    """An AugmentationConfig from a config, a dict (JSON) or None (no augmentation)."""
    if value is None:
        return AugmentationConfig()
    if isinstance(value, AugmentationConfig):
        return value
    if isinstance(value, dict):
        return AugmentationConfig.from_dict(value)
    raise ValueError(
        f"augmentation: expected AugmentationConfig or dict, found {type(value).__name__}"
    )


def validate_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization: expected one of {NORMALIZATIONS}, found {normalization!r}"
        )


def _check_stats(stats: Any) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(stats, tuple | list) or len(stats) != 2:
        raise ValueError("stats: expected a (mean, variance) pair from pixel_statistics()")
    mean, variance = (np.asarray(s, dtype=np.float32) for s in stats)
    for name, arr in (("mean", mean), ("variance", variance)):
        if arr.shape != IMAGE_SHAPE:
            raise ValueError(f"stats {name}: expected shape {IMAGE_SHAPE}, found {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"stats {name}: expected finite values, found NaN/inf")
    if np.any(variance < 0):
        raise ValueError("stats variance: expected values >= 0, found negatives")
    return mean, variance


def preprocessing_block(
    inputs: keras.KerasTensor,
    normalization: str,
    augmentation: AugmentationConfig,
    stats: tuple[np.ndarray, np.ndarray] | None,
) -> keras.KerasTensor:
    """Apply augmentation (training only) then normalisation to the raw-pixel input tensor.

    Augmentation runs on raw pixels so 'reflect' fill and interpolation see real pixel values
    whatever the normalisation; Keras random layers are identity at inference.
    """
    validate_normalization(normalization)
    x = inputs
    if augmentation.flip:
        x = keras.layers.RandomFlip("horizontal", name="augment_flip")(x)
    if augmentation.shift > 0:
        x = keras.layers.RandomTranslation(
            augmentation.shift, augmentation.shift, name="augment_shift"
        )(x)
    if augmentation.crop > 0:
        # Pad-and-crop as a whole-pixel zero-filled translation. Not ZeroPadding2D +
        # RandomCrop: Keras 3.15's RandomCrop returns the padded image unchanged at inference,
        # so the model's output shape would differ between training and prediction.
        factor = augmentation.crop / IMAGE_SHAPE[0]
        x = keras.layers.RandomTranslation(
            factor,
            factor,
            fill_mode="constant",
            interpolation="nearest",
            name="augment_crop",
        )(x)
    if augmentation.rotation > 0:
        x = keras.layers.RandomRotation(augmentation.rotation, name="augment_rotation")(x)
    if augmentation.zoom > 0:
        x = keras.layers.RandomZoom(augmentation.zoom, name="augment_zoom")(x)
    if normalization == "rescale":
        x = keras.layers.Rescaling(1.0 / 255.0, name="normalize_rescale")(x)
    elif normalization == "standardize":
        if stats is None:
            raise ValueError(
                "stats: normalization='standardize' requires stats=(mean, variance) from "
                "pixel_statistics() on the Training split, found None"
            )
        mean, variance = _check_stats(stats)
        # Per-pixel statistics: keep every non-batch axis. Passed values become layer config
        # (not weights), so they survive a safe_mode reload and add nothing to count_params().
        x = keras.layers.Normalization(
            axis=(1, 2, 3), mean=mean, variance=variance, name="normalize_standardize"
        )(x)
    return x


def image_input() -> keras.KerasTensor:
    """The shared model input: raw pixels `(None, 48, 48, 1)` (uint8 arrays are cast on entry)."""
    return keras.Input(shape=IMAGE_SHAPE, dtype="float32", name="pixels")
