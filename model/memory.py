"""Analytic peak memory of one training step, computed from the model graph without running it.

    peak = weights + gradients + optimizer slots            exact, from the variable sizes
         + ACT_FACTOR * kept activations                    walk of the layer graph, below
         + UPDATE_FACTOR * (gradients + slots)              update temporaries, allocator slack
         + WORKSPACE_FACTOR * largest conv backprop buffer  im2col, capped per kernel call
         + FRAMEWORK_OVERHEAD                               traced train_function, runtime

Kept activations are the tensors the forward pass must keep for backprop: the input of every
conv/dense/max-pool/batch-norm layer, the output of relu-like activations and max-pools, and
the 1-byte dropout masks; flatten/reshape alias their input. Augmentation and normalisation
intermediates are transient (nothing before the first trainable layer is differentiated).
ACT_FACTOR > 1 covers the activation gradients alive during backprop and allocator slack.

The constants were fitted (least squares on relative error) to the RSS high-water mark of
fresh CPU processes running 5 `train_on_batch` steps (TensorFlow 2.21, Keras 3.15, glibc
malloc, 2 cores) over 49 runs of 19 CNN/DNN architectures, batch 8..2048, sgd/rmsprop/adam
(then Keras's plain SGD; slot counts now come from model/optimizers.py, whose sgd has momentum);
leaving each architecture out in turn gave a 7% median (11% mean) absolute error on it. See
bench/bench_memory.py for the protocol. glibc arena fragmentation makes
repeated measurements of one config differ by up to ~40% after a few steps, so expect ~10%
typical and ~25% worst-case error against a single measurement, and more RSS growth over long
runs than the estimate shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from model.optimizers import slots_per_variable

MB = 1 << 20

DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}

# Fitted constants (see the module docstring).
ACT_FACTOR = 1.55
UPDATE_FACTOR = 0.73
WORKSPACE_FACTOR = 2.8
FRAMEWORK_OVERHEAD = 36 * MB
# TensorFlow's CPU conv backprop kernels shard their im2col buffer to about 30 MB per call.
CONV_WORKSPACE_CAP = 30 * MB

_ALIAS = (keras.layers.Flatten, keras.layers.Reshape)
# Activations whose gradient TensorFlow computes from the output rather than the input.
_OUTPUT_GRAD_ACTIVATIONS = {"relu", "elu", "selu", "tanh", "sigmoid", "softmax", "exponential"}


@dataclass(frozen=True)
class LayerMemory:
    """Per-sample bytes of one layer (multiply by the batch size)."""

    name: str
    output: int  # output tensor (0 for aliases such as flatten)
    kept: int  # kept from forward for backprop: output if a gradient reads it, dropout mask
    workspace: int  # conv backprop im2col buffer (before the per-call cap); 0 otherwise


def _elements(shape: tuple[int | None, ...]) -> int:
    return int(np.prod([d for d in shape[1:]], dtype=np.int64))


def _activation_name(layer: keras.layers.Layer) -> str | None:
    fn = getattr(layer, "activation", None)
    name = getattr(fn, "__name__", None)
    return None if name in (None, "linear") else name


def _needs_input(layer: keras.layers.Layer) -> bool:
    """Does the layer's own backward read its forward input?"""
    if isinstance(
        layer,
        keras.layers.Conv2D
        | keras.layers.Dense
        | keras.layers.MaxPooling2D
        | keras.layers.BatchNormalization
        | keras.layers.GlobalMaxPooling2D,
    ):
        return True
    if isinstance(layer, keras.layers.Activation):
        return _activation_name(layer) not in _OUTPUT_GRAD_ACTIVATIONS
    return False


def _needs_output(layer: keras.layers.Layer) -> bool:
    """Does the layer's own backward read its forward output?"""
    if isinstance(layer, keras.layers.MaxPooling2D | keras.layers.GlobalMaxPooling2D):
        return True
    return _activation_name(layer) in _OUTPUT_GRAD_ACTIVATIONS


def layer_profile(model: keras.Model, dtype: str = "float32") -> list[LayerMemory]:
    """Per-layer, per-sample memory of a single-input, single-path functional model."""
    _check_model(model)
    size = _dtype_bytes(dtype)
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    producer = {id(layer.output): layer for layer in layers}
    consumers: dict[int, list[keras.layers.Layer]] = {}
    for layer in layers:
        source = producer.get(id(layer.input))
        consumers.setdefault(id(source), []).append(layer)

    def read_by_consumer(layer: keras.layers.Layer) -> bool:
        # An alias shares its producer's buffer, so the alias's readers keep that buffer.
        for user in consumers.get(id(layer), []):
            if _needs_input(user) or (isinstance(user, _ALIAS) and read_by_consumer(user)):
                return True
        return False

    # Layers from the first one with trainable weights on take part in backprop.
    first_trainable = next(
        (i for i, layer in enumerate(layers) if layer.trainable_weights), len(layers)
    )
    profile = []
    for i, layer in enumerate(layers):
        elements = _elements(layer.output.shape)
        out = 0 if isinstance(layer, _ALIAS) else elements * size
        kept = out if (_needs_output(layer) or read_by_consumer(layer)) else 0
        if isinstance(layer, keras.layers.Dropout) and layer.rate > 0:
            kept += elements  # boolean keep-mask, 1 byte per element
        workspace = 0
        if isinstance(layer, keras.layers.Conv2D) and i >= first_trainable:
            out_h, out_w = layer.output.shape[1:3]
            patch = layer.input.shape[-1] * int(np.prod(layer.kernel_size))
            workspace = int(out_h * out_w * patch) * size
        profile.append(LayerMemory(layer.name, out, kept, workspace))
    return profile


def memory_breakdown(
    model: keras.Model,
    batch_size: int,
    optimizer: str = "adam",
    dtype: str = "float32",
    accumulation_steps: int = 1,
    compute_dtype: str | None = None,
) -> dict[str, int]:
    """The terms of `estimate_training_memory`, in bytes (their sum is the estimate).

    `optimizer` is a name of `model.optimizers.OPTIMIZERS`; `accumulation_steps` > 1 (a
    micro-batch of `batch_size` rows accumulating into a bigger batch) adds one accumulator
    per trainable variable. `dtype` is the variables' (master weights, gradients, slots);
    `compute_dtype` the activations' (mixed precision: "bfloat16" or "float16"; default
    `dtype`).
    """
    _check_model(model)
    batch_size = _check_batch(batch_size)
    size = _dtype_bytes(dtype)
    slots = slots_per_variable(optimizer, accumulation_steps)
    profile = layer_profile(model, compute_dtype or dtype)
    trainable = sum(_variable_bytes(model.trainable_weights, size))
    workspace = max((min(p.workspace * batch_size, CONV_WORKSPACE_CAP) for p in profile), default=0)
    return {
        "weights": sum(_variable_bytes(model.weights, size)),
        "gradients": trainable,
        "optimizer_slots": trainable * slots,
        "activations": int(ACT_FACTOR * sum(p.kept for p in profile) * batch_size),
        "update_temporaries": int(UPDATE_FACTOR * trainable * (1 + slots)),
        "conv_workspace": int(WORKSPACE_FACTOR * workspace),
        "framework": FRAMEWORK_OVERHEAD,
    }


def estimate_training_memory(
    model: keras.Model,
    batch_size: int,
    optimizer: str = "adam",
    dtype: str = "float32",
    accumulation_steps: int = 1,
    compute_dtype: str | None = None,
) -> int:
    """Estimated peak bytes of one training step of `model` at `batch_size`.

    Includes the weights, so it is the memory a trial needs on top of an idle framework.
    """
    parts = memory_breakdown(model, batch_size, optimizer, dtype, accumulation_steps, compute_dtype)
    return int(sum(parts.values()))


def estimate_inference_memory(model: keras.Model, batch_size: int, dtype: str = "float32") -> int:
    """Rough peak bytes of `predict` on one batch (not calibrated): weights, the float input and
    the largest pair of consecutive layer outputs (nothing is kept for backprop), plus the
    framework overhead."""
    _check_model(model)
    batch_size = _check_batch(batch_size)
    size = _dtype_bytes(dtype)
    weights = sum(_variable_bytes(model.weights, size))
    outs = [_elements(layer.output.shape) for layer in model.layers]
    pairs = max((a + b for a, b in zip(outs, outs[1:], strict=False)), default=0)
    inputs = _elements(model.input.shape) * (size + 1)  # uint8 feed + float copy
    return int(weights + (pairs * size + inputs) * batch_size + FRAMEWORK_OVERHEAD)


def max_batch_size(
    model: keras.Model,
    budget_bytes: int,
    optimizer: str = "adam",
    dtype: str = "float32",
    limit: int = 1 << 20,
) -> int:
    """Largest batch whose estimated training peak fits `budget_bytes` (0 if not even 1 does).

    Binary search (the estimate is non-decreasing in the batch size), up to `limit`.
    """
    _check_model(model)
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int | np.integer):
        raise ValueError(f"budget_bytes: expected an int >= 0, found {budget_bytes!r}")
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes: expected an int >= 0, found {budget_bytes}")
    limit = _check_batch(limit)
    _dtype_bytes(dtype)
    slots_per_variable(optimizer)

    def fits(batch: int) -> bool:
        return estimate_training_memory(model, batch, optimizer, dtype) <= budget_bytes

    if not fits(1):
        return 0
    low, high = 1, 2  # invariant: fits(low); high is the next candidate
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)  # first batch known (or assumed, past limit) not to fit
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPE_BYTES)}, found {dtype!r}")
    return DTYPE_BYTES[dtype]


def _check_model(model: keras.Model) -> None:
    if not isinstance(model, keras.Model):
        raise ValueError(f"model: expected a keras.Model, found {type(model).__name__}")


def _check_batch(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise ValueError(f"batch_size: expected an int >= 1, found {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, found {batch_size}")
    return int(batch_size)


def _variable_bytes(variables: list[keras.Variable], size: int) -> list[int]:
    return [int(np.prod(v.shape, dtype=np.int64)) * size for v in variables]
