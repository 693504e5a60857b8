"""What differs between the Keras backends a trial can train on: TensorFlow (the default) and JAX.

Keras picks its backend once, when it is first imported, from KERAS_BACKEND: `select_backend`
sets it (and JAX's GPU memory cap) before that, `require_backend` checks what the process got.
Everything else here asks `keras.backend.backend()` and imports only that backend's framework,
so a JAX process never needs TensorFlow (the lent GPU machine has none). Arrays stay NumPy on the
JAX path: its batches are NumPy (model/batches.py), copied to the device by Keras's trainer.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

import numpy as np

BACKENDS: tuple[str, ...] = ("tensorflow", "jax")
DEFAULT_BACKEND = "tensorflow"
# JAX takes 75 % of a GPU when it starts unless told otherwise: a trial grows on demand up to
# its placement's share of the card instead.
JAX_PREALLOCATE_ENV = "XLA_PYTHON_CLIENT_PREALLOCATE"
JAX_MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
# JAX's out-of-memory errors are runtime errors whose status is this.
_JAX_OOM_STATUS = "RESOURCE_EXHAUSTED"


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def select_backend(name: str, gpu_share: float = 0.0) -> None:
    """Make this process's Keras use `name`; must run before Keras (and JAX) are imported.

    On JAX, `gpu_share` in (0, 1] caps its GPU allocator at that fraction of the card (the
    placement's share); memory is taken as it is needed, not up front. A value the user set wins.
    """
    check_backend(name)
    if not 0.0 <= gpu_share <= 1.0:
        raise ValueError(f"gpu_share: expected a number in [0, 1], got {gpu_share!r}")
    os.environ["KERAS_BACKEND"] = name
    if name == "jax":
        os.environ.setdefault(JAX_PREALLOCATE_ENV, "false")
        if gpu_share > 0:
            os.environ.setdefault(JAX_MEM_FRACTION_ENV, f"{gpu_share:.4f}")


def require_backend(name: str) -> str:
    """Import Keras and check it runs on `name` (a clear error where Keras was imported first
    under another backend); returns it."""
    check_backend(name)
    if "keras" not in sys.modules:
        select_backend(name)
    actual = backend_name()
    if actual != name:
        raise ValueError(
            f"backend: expected Keras on {name!r}, but this process imported it on {actual!r} "
            f"(set KERAS_BACKEND={name} before Keras is imported)"
        )
    return actual


def backend_name() -> str:
    import keras

    return keras.backend.backend()


def is_tensorflow() -> bool:
    return backend_name() == "tensorflow"


def to_tensor(array: Any) -> Any:
    """An array made once for batching every epoch: a TF tensor, or a NumPy array on JAX."""
    if is_tensorflow():
        import tensorflow as tf

        return tf.convert_to_tensor(array)
    return np.asarray(array)


def flip_left_right(images: Any) -> Any:
    """Images (N, H, W, C) mirrored left-right, of the kind `to_tensor` makes."""
    if is_tensorflow():
        import tensorflow as tf

        return tf.reverse(images, axis=[2])
    return np.ascontiguousarray(np.flip(np.asarray(images), axis=2))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the backend's device out-of-memory error."""
    if is_tensorflow():
        import tensorflow as tf

        return isinstance(error, tf.errors.ResourceExhaustedError)
    import jax

    return isinstance(error, jax.errors.JaxRuntimeError) and _JAX_OOM_STATUS in str(error)


def release_memory() -> None:
    """After an out-of-memory error: JAX frees device buffers when their Python objects go."""
    if not is_tensorflow():
        gc.collect()


def _jax_gpus() -> list[Any]:
    import jax

    try:
        return list(jax.devices("gpu"))
    except RuntimeError:  # no GPU platform in this process
        return []


def gpu_devices() -> list[Any]:
    """The backend's GPU devices visible to this process ([] on a CPU)."""
    if is_tensorflow():
        import tensorflow as tf

        return tf.config.list_physical_devices("GPU")
    return _jax_gpus()


def compute_capability(device: Any) -> tuple[int, int] | None:
    """(major, minor) of a device of `gpu_devices()`; None where the backend does not say."""
    if is_tensorflow():
        import tensorflow as tf

        found = tf.config.experimental.get_device_details(device).get("compute_capability")
        return (int(found[0]), int(found[1])) if found else None
    found = getattr(device, "compute_capability", None)  # JAX's CUDA devices: "9.0"
    if not found:
        return None
    major, _, minor = str(found).partition(".")
    return int(major), int(minor or 0)


def gpu_memory_info() -> dict[str, int] | None:
    """This process's allocation on its first GPU in bytes, "peak" and "current" (None without
    a GPU): TensorFlow's allocator, or JAX's `memory_stats()` (peak_bytes_in_use)."""
    if is_tensorflow():
        import tensorflow as tf

        if not tf.config.list_logical_devices("GPU"):
            return None
        info = tf.config.experimental.get_memory_info("GPU:0")
        return {"peak": int(info["peak"]), "current": int(info["current"])}
    gpus = _jax_gpus()
    stats = gpus[0].memory_stats() if gpus else None
    if not stats:
        return None
    found = {"peak": int(stats["peak_bytes_in_use"]), "current": int(stats["bytes_in_use"])}
    if "bytes_limit" in stats:
        found["limit"] = int(stats["bytes_limit"])
    return found


def framework_version() -> str:
    """The backend framework's name and version, e.g. "jax 0.10.2"."""
    name = backend_name()
    module = __import__(name)
    return f"{name} {module.__version__}"
