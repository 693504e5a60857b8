"""Run by tests/test_backend.py in a fresh process: a tiny trial on Keras's JAX backend.

    KERAS_BACKEND=jax python tests/jax_worker.py OUT_DIR

TensorFlow is made unimportable first, as on the GPU machine that has none: the JAX path must
not need it. Writes to OUT_DIR: the trained model (`model.keras`), `probe.npz` (images and the
JAX model's probabilities for them) and `result.json` (what the tests assert on).
"""

from __future__ import annotations

import importlib.abc
import json
import sys
from pathlib import Path
from typing import Any


class NoTensorFlow(importlib.abc.MetaPathFinder):
    """`import tensorflow` fails, as where it is not installed."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoTensorFlow())
TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

import numpy as np  # noqa: E402

from jobs.trial import configure_backend  # noqa: E402


def tiny_trial(out: Path) -> dict:
    """Every part of the training path: augmentation, mixup and label smoothing (one-hot
    labels), gradient accumulation, best-epoch predictions with the flipped copy."""
    from jobs.training import BEST_PREDICTIONS, LAST_MODEL, EpochLoop, TrainData, TrainingConfig
    from model.cnn import CNNConfig
    from model.configs import build_model
    from model.preprocessing import AugmentationConfig, pixel_statistics

    rng = np.random.default_rng(0)
    data = TrainData(
        rng.integers(0, 256, (48, 48, 48, 1), dtype=np.uint8),
        rng.integers(0, 7, 48),
        rng.integers(0, 256, (16, 48, 48, 1), dtype=np.uint8),
        rng.integers(0, 7, 16),
    )
    config = CNNConfig(
        filters=(4, 8),
        convs_per_block=1,
        batch_norm=True,
        dense_units=(8,),
        augmentation=AugmentationConfig(flip=True, shift=0.1),
    )
    training = TrainingConfig(
        batch_size=16, micro_batch_size=8, max_epochs=2, mixup=0.2, label_smoothing=0.1
    )
    stats = pixel_statistics(data.x_train)
    loop = EpochLoop(lambda: build_model(config, stats=stats), data, training, out / "trial")
    reported: list[dict] = []
    loop.run(lambda metrics, _: reported.append(metrics))
    model_file = out / "model.keras"
    (out / "trial" / LAST_MODEL).replace(model_file)
    probe = rng.integers(0, 256, (12, 48, 48, 1), dtype=np.uint8)
    probabilities = loop.model.predict(probe, verbose=0)
    np.savez(out / "probe.npz", images=probe, probabilities=probabilities)
    best = np.load(out / "trial" / BEST_PREDICTIONS)
    return {
        "epochs": [m["epoch"] for m in reported],
        "val_accuracy": [m["val_accuracy"] for m in reported],
        "accumulation_steps": int(loop.model.optimizer.gradient_accumulation_steps),
        "flipped_differs": bool(
            np.abs(best["probabilities"] - best["probabilities_flipped"]).max() > 0
        ),
        "rows_predicted": int(best["probabilities"].shape[0]),
    }


def injected_oom(out: Path) -> dict:
    """JAX's RESOURCE_EXHAUSTED error out of epoch 2 takes TensorFlow's path: a halved
    micro-batch, resumed from the epoch-1 checkpoint."""
    import keras

    from fault_hooks import faulty_epoch_loop
    from jobs.training import EpochLoop, TrainData, TrainingConfig

    def tiny() -> keras.Model:
        inputs = keras.Input((48, 48, 1))
        x = keras.layers.Rescaling(1 / 255)(inputs)
        x = keras.layers.Conv2D(4, 3, strides=4, activation="relu")(x)
        x = keras.layers.Flatten()(x)
        return keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(x))

    rng = np.random.default_rng(1)
    data = TrainData(
        rng.integers(0, 256, (64, 48, 48, 1)).astype("float32"),
        rng.integers(0, 7, 64),
        rng.integers(0, 256, (16, 48, 48, 1)).astype("float32"),
        rng.integers(0, 7, 16),
    )
    reported: list[dict] = []
    loop_class: type[EpochLoop] = faulty_epoch_loop({"oom_at_epoch": 2, "above_micro_batch": 16})
    loop = loop_class(
        tiny, data, TrainingConfig(batch_size=32, micro_batch_size=32, max_epochs=3), out / "oom"
    )
    state = loop.run(lambda metrics, _: reported.append(metrics))
    return {
        "epochs": [m["epoch"] for m in reported],
        "micro_batch_sizes": [m["micro_batch_size"] for m in reported],
        "oom_retries": state.oom_retries,
        "accumulation_steps": int(loop.model.optimizer.gradient_accumulation_steps),
    }


def backend_facts() -> dict:
    import jax

    from jobs.trial import measured_memory
    from model.backend import gpu_memory_info, is_out_of_memory
    from model.precision import resolve_precision

    return {
        "other_runtime_error_is_oom": is_out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: x")),
        "gpu_memory_info": gpu_memory_info(),
        "auto_precision": resolve_precision("auto"),
        "measured_memory_keys": sorted(measured_memory(0)),
    }


def main() -> int:
    out = Path(sys.argv[1])
    backend = configure_backend(1, 0.0)
    result = {
        "backend": backend,
        "trial": tiny_trial(out),
        "oom": injected_oom(out),
        "facts": backend_facts(),
        "tensorflow_imported": "tensorflow" in sys.modules,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
