"""What one image costs a model, counted from the layer graph without running it.

Two counts: multiply-accumulates of the conv and dense layers (the arithmetic that fast
kernels do), and the elements every other layer writes (batch norm, activations, pooling,
dropout, add: memory-bound work whose cost per element is far higher than per MAC on a CPU).
A time estimate weighs the two with a throughput measured on the machine (`jobs/timing.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

# Layers that write nothing of their own (views of their input) or run only in training as
# input preprocessing (counted as elementwise work like any other layer, see `image_cost`).
_FREE = (keras.layers.InputLayer, keras.layers.Flatten, keras.layers.Reshape)


@dataclass(frozen=True)
class ImageCost:
    """Forward-pass work per image."""

    macs: int  # multiply-accumulates of Conv2D and Dense layers
    elements: int  # output elements of every other layer


def _elements(shape: tuple[int | None, ...]) -> int:
    return int(np.prod([d for d in shape[1:]], dtype=np.int64))


def image_cost(model: keras.Model) -> ImageCost:
    """Forward MACs and elementwise outputs per image of a functional model."""
    if not isinstance(model, keras.Model):
        raise ValueError(f"model: expected a keras.Model, found {type(model).__name__}")
    macs = 0
    elements = 0
    for layer in model.layers:
        if isinstance(layer, _FREE):
            continue
        out = _elements(layer.output.shape)
        if isinstance(layer, keras.layers.Conv2D):
            kernel_h, kernel_w = layer.kernel_size
            fan_in = int(layer.input.shape[-1]) // layer.groups
            macs += out * kernel_h * kernel_w * fan_in
        elif isinstance(layer, keras.layers.Dense):
            macs += out * int(layer.input.shape[-1])
        else:
            elements += out
    return ImageCost(macs=macs, elements=elements)


# Fitted (least squares on relative error) to one-thread training throughput of 7 CNNs and
# DNNs (33 K to 121 M MACs per image, batch 64, TF 2.21 on an AMD EPYC core):
# an elementwise output costs about as much as 37 MACs, and each optimizer step about as much
# as 67 M MACs (a batch of 64 at ~1 M per image). Only ratios matter: the machine's own
# speed comes from a calibration run (`jobs/timing.py`). Residuals: -20 % .. +12 %.
ELEMENT_WEIGHT = 37.0
STEP_OVERHEAD = 6.7e7
# A backward pass costs about twice the forward: validation (forward only) is a third of
# the training work per image.
FORWARD_SHARE = 1.0 / 3.0


def epoch_work(cost: ImageCost, train_rows: int, val_rows: int, batch_size: int) -> float:
    """One epoch (training then validation) in MAC-equivalents: divide by a measured rate."""
    if train_rows < 1 or val_rows < 0 or batch_size < 1:
        raise ValueError(
            f"epoch_work: expected train_rows >= 1, val_rows >= 0, batch_size >= 1, found "
            f"{train_rows}, {val_rows}, {batch_size}"
        )
    per_image = cost.macs + ELEMENT_WEIGHT * cost.elements
    steps = -(-train_rows // batch_size)
    val_steps = -(-val_rows // batch_size)
    train = train_rows * per_image + steps * STEP_OVERHEAD
    validation = FORWARD_SHARE * (val_rows * per_image + val_steps * STEP_OVERHEAD)
    return float(train + validation)
