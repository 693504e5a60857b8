"""Numeric precision of training: float32, or mixed (bf16/fp16 compute, float32 weights).

A GPU's tensor cores run bf16/fp16; a CPU gains nothing. `resolve_precision("auto")` picks
`mixed_bfloat16` on GPUs that support it (compute capability 8.0 and newer), `mixed_float16`
(Keras adds loss scaling when it compiles) on older ones, and `float32` on a CPU. Models keep
their softmax in float32 (`model.cnn.dense_head`), so a saved model predicts the same on a
CPU-only machine.
"""

from __future__ import annotations

from typing import Any

PRECISIONS: tuple[str, ...] = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
BF16_MIN_COMPUTE_CAPABILITY = (8, 0)


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, found {name!r}")
    return name


def resolve_precision(requested: str, gpus: list[Any] | None = None) -> str:
    """The Keras dtype policy for `requested` on this process's devices (`gpus`: the Keras
    backend's GPU devices, `model.backend.gpu_devices()`; None asks the backend)."""
    if check_precision(requested) != "auto":
        return requested
    from model.backend import compute_capability, gpu_devices

    if gpus is None:
        gpus = gpu_devices()
    if not gpus:
        return "float32"
    capability = compute_capability(gpus[0])
    if capability and capability >= BF16_MIN_COMPUTE_CAPABILITY:
        return "mixed_bfloat16"
    return "mixed_float16"


def compute_bytes(policy: str) -> int:
    """Bytes per activation element under a resolved policy (weights stay float32)."""
    return 4 if check_precision(policy) in ("float32", "auto") else 2


def apply_precision(policy: str) -> None:
    """Set Keras's global dtype policy; must run before the model is built."""
    import keras

    if check_precision(policy) == "auto":
        raise ValueError("precision: resolve 'auto' with resolve_precision() first")
    keras.mixed_precision.set_global_policy(policy)
