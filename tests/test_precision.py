"""Mixed precision: the policy is applied, the output stays float32, and a saved mixed model
loads and predicts the same on a CPU-only machine."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from jobs.training import EpochLoop, TrainData, TrainingConfig
from model.configs import CNNConfig, build_model
from model.memory import estimate_training_memory
from model.precision import apply_precision, compute_bytes, resolve_precision


@pytest.fixture
def mixed_policy() -> None:
    apply_precision("mixed_bfloat16")
    yield
    apply_precision("float32")


def test_auto_is_float32_on_a_cpu_and_mixed_on_gpus() -> None:
    assert resolve_precision("auto", gpus=[]) == "float32"
    assert resolve_precision("mixed_float16", gpus=[]) == "mixed_float16"
    assert compute_bytes("mixed_bfloat16") == 2 and compute_bytes("float32") == 4
    with pytest.raises(ValueError, match="precision: expected one of"):
        resolve_precision("half")
    with pytest.raises(ValueError, match="precision"):
        TrainingConfig(precision="fp8")


def test_a_mixed_model_trains_saves_and_predicts_the_same_in_float32(
    tmp_path: Path, mixed_policy: None
) -> None:
    config = CNNConfig(filters=(4, 8), convs_per_block=1, batch_norm=True, dense_units=(8,))
    rng = np.random.default_rng(0)
    data = TrainData(
        rng.integers(0, 256, (32, 48, 48, 1), dtype=np.uint8),
        rng.integers(0, 7, 32),
        rng.integers(0, 256, (8, 48, 48, 1), dtype=np.uint8),
        rng.integers(0, 7, 8),
    )
    training = TrainingConfig(batch_size=16, micro_batch_size=16, max_epochs=1)
    loop = EpochLoop(lambda: build_model(config), data, training, tmp_path)
    model = loop.model
    assert model.get_layer("block1_conv1").compute_dtype == "bfloat16"
    assert model.get_layer("block1_conv1").variable_dtype == "float32"  # master weights
    assert model.get_layer("predictions").compute_dtype == "float32"
    loop.run(lambda metrics, _: None)
    images = data.x_val.astype("float32")
    mixed = model.predict(images, verbose=0)
    assert mixed.dtype == np.float32 and np.allclose(mixed.sum(axis=1), 1.0, atol=1e-5)

    apply_precision("float32")  # a CPU-only machine with the default policy
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    again = loaded.predict(images, verbose=0)
    assert again.dtype == np.float32
    # The layers keep the policy they were saved with: the same bf16 arithmetic, same answer.
    assert np.allclose(again, mixed, atol=1e-6)


def test_the_estimate_counts_activations_at_the_compute_dtype() -> None:
    model = build_model(CNNConfig(filters=(16, 32), dense_units=(64,)))
    full = estimate_training_memory(model, 64)
    mixed = estimate_training_memory(model, 64, compute_dtype="bfloat16")
    weights_only = estimate_training_memory(model, 1, compute_dtype="bfloat16")
    assert weights_only < mixed < full  # activations halve, master weights stay float32
