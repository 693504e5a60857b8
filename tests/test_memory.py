"""Analytic training-memory estimate: monotonicity, optimizer ordering, max_batch_size
consistency, validation, and one quick real measurement in a fresh subprocess."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from model.cnn import SEED2017, CNNConfig, build_cnn
from model.configs import build_model
from model.dnn import DNNConfig, build_dnn
from model.memory import (
    MB,
    estimate_inference_memory,
    estimate_training_memory,
    layer_profile,
    max_batch_size,
    memory_breakdown,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def seed_model() -> keras.Model:
    return build_cnn(SEED2017)


@pytest.fixture(scope="module")
def small_models() -> list[keras.Model]:
    return [
        build_model(CNNConfig(filters=(8, 16), convs_per_block=1, dense_units=(32,))),
        build_model(CNNConfig(filters=(8, 16), batch_norm=True, head_pooling="global_avg")),
        build_model(DNNConfig(hidden_units=(64, 32), batch_norm=True)),
    ]


def test_estimate_is_strictly_increasing_in_batch(
    seed_model: keras.Model, small_models: list[keras.Model]
) -> None:
    for model in [seed_model, *small_models]:
        estimates = [estimate_training_memory(model, b) for b in (1, 2, 8, 32, 128, 512)]
        assert all(a < b for a, b in zip(estimates, estimates[1:], strict=False)), estimates


def test_estimate_counts_weights_gradients_and_slots(seed_model: keras.Model) -> None:
    weights = seed_model.count_params() * 4
    sgd, rms, adam = (
        estimate_training_memory(seed_model, 32, opt) for opt in ("sgd", "rmsprop", "adam")
    )
    # SGD (Nesterov momentum) and RMSprop keep one slot each, Adam two.
    assert adam > rms == sgd
    # Each optimizer slot is one more copy of the trainable weights (an accumulator too).
    accumulating = estimate_training_memory(seed_model, 32, "sgd", accumulation_steps=2)
    assert adam - rms >= weights and accumulating - sgd >= weights
    assert sgd > 2 * weights  # weights + gradients at least
    half = estimate_training_memory(seed_model, 128, dtype="float16")
    assert half < estimate_training_memory(seed_model, 128, dtype="float32")


def test_estimate_magnitude_for_seed2017(seed_model: keras.Model) -> None:
    # Measured on CPU (bench/bench_memory.py): ~200 MB at batch 32, ~400 MB at batch 128.
    assert 120 * MB < estimate_training_memory(seed_model, 32) < 320 * MB
    assert 280 * MB < estimate_training_memory(seed_model, 128) < 600 * MB


def test_bigger_architecture_costs_more() -> None:
    small = build_cnn(CNNConfig(filters=(8, 16), convs_per_block=1))
    wide = build_cnn(CNNConfig(filters=(64, 128), convs_per_block=1))
    assert estimate_training_memory(wide, 64) > estimate_training_memory(small, 64)
    wide_parts, small_parts = memory_breakdown(wide, 64), memory_breakdown(small, 64)
    assert wide_parts["activations"] > small_parts["activations"]
    assert wide_parts["conv_workspace"] > small_parts["conv_workspace"]


def test_layer_profile_keeps_what_backprop_needs() -> None:
    model = build_cnn(
        CNNConfig(filters=(4,), convs_per_block=1, dropout=0.5, dense_units=(), pooling="avg")
    )
    profile = {p.name: p for p in layer_profile(model)}
    conv_out = 48 * 48 * 4 * 4  # bytes per sample
    # A relu conv keeps its output; the rescaled input is kept for the kernel gradient.
    assert profile["block1_conv1"].kept == conv_out
    assert profile["normalize_rescale"].kept == 48 * 48 * 4
    # Average pooling's gradient needs only shapes; dropout keeps a 1-byte mask per element
    # plus its output, which the dense layer reads through the flatten alias.
    assert profile["block1_avgpool"].kept == 0
    assert profile["block1_dropout"].kept == 24 * 24 * 4 * (4 + 1)
    assert profile["flatten"].output == 0 and profile["flatten"].kept == 0
    # The 3x3 conv's backprop im2col buffer: output pixels x (in_channels x 3 x 3) floats.
    assert profile["block1_conv1"].workspace == 48 * 48 * 9 * 4


def test_breakdown_sums_to_estimate_and_counts_exact_state(seed_model: keras.Model) -> None:
    parts = memory_breakdown(seed_model, 64, "adam")
    assert sum(parts.values()) == estimate_training_memory(seed_model, 64, "adam")
    assert parts["weights"] == parts["gradients"] == 3146503 * 4
    assert parts["optimizer_slots"] == 2 * 3146503 * 4
    # SGD with momentum keeps one velocity per weight; accumulation adds one accumulator.
    assert memory_breakdown(seed_model, 64, "sgd")["optimizer_slots"] == 3146503 * 4
    with_accumulation = memory_breakdown(seed_model, 16, "sgd", accumulation_steps=4)
    assert with_accumulation["optimizer_slots"] == 2 * 3146503 * 4
    # Doubling the batch doubles the activation term and nothing batch-free.
    double = memory_breakdown(seed_model, 128, "adam")
    assert abs(double["activations"] - 2 * parts["activations"]) <= 1
    assert double["weights"] == parts["weights"] and double["framework"] == parts["framework"]


def test_max_batch_size_brackets_the_budget(
    seed_model: keras.Model, small_models: list[keras.Model]
) -> None:
    for model in [seed_model, *small_models]:
        for budget_mb in (150, 400, 2000):
            budget = budget_mb * MB
            for optimizer in ("adam", "sgd"):
                best = max_batch_size(model, budget, optimizer)
                if best == 0:
                    assert estimate_training_memory(model, 1, optimizer) > budget
                    continue
                assert estimate_training_memory(model, best, optimizer) <= budget
                assert estimate_training_memory(model, best + 1, optimizer) > budget


def test_max_batch_size_zero_when_nothing_fits(seed_model: keras.Model) -> None:
    assert max_batch_size(seed_model, 10 * MB) == 0
    assert max_batch_size(seed_model, 0) == 0
    # Adam needs more memory than SGD, so it never fits a larger batch.
    budget = 500 * MB
    assert max_batch_size(seed_model, budget, "adam") <= max_batch_size(seed_model, budget, "sgd")


def test_inference_estimate_below_training(seed_model: keras.Model) -> None:
    assert estimate_inference_memory(seed_model, 128) < estimate_training_memory(seed_model, 128)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda m: estimate_training_memory(m, 0), "batch_size"),
        (lambda m: estimate_training_memory(m, 2.5), "batch_size"),
        (lambda m: estimate_training_memory(m, 8, optimizer="lbfgs"), "optimizer"),
        (lambda m: estimate_training_memory(m, 8, dtype="int8"), "dtype"),
        (lambda m: estimate_training_memory("model", 8), "model"),
        (lambda m: max_batch_size(m, -1), "budget_bytes"),
        (lambda m: max_batch_size(m, 1e9), "budget_bytes"),
    ],
)
def test_bad_input_raises(call, field: str, small_models: list[keras.Model]) -> None:
    with pytest.raises(ValueError, match=field):
        call(small_models[0])


@pytest.mark.slow  # ~15-35 s on the shared 2-core box: a fresh TF process plus two steps
def test_quick_measurement_matches_estimate_loosely(monkeypatch: pytest.MonkeyPatch) -> None:
    """One real fresh-process measurement of a tiny DNN (the bench covers the rest)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.bench_memory import measure

    case = {
        "name": "dnn-tiny",
        "model": {"family": "dnn", "hidden_units": [256]},
        "batch": 64,
        "optimizer": "adam",
    }
    raw = measure(case, steps=2)
    estimate = estimate_training_memory(build_dnn(DNNConfig(hidden_units=(256,))), 64)
    assert raw["hwm_reset"] in (True, False)
    assert raw["params"] == build_dnn(DNNConfig(hidden_units=(256,))).count_params()
    # Loose: fragmentation and thread scheduling move small measurements by tens of percent.
    assert 0.5 < estimate / raw["measured_bytes"] < 2.0, (estimate, raw)


@pytest.mark.parametrize("accumulation_steps", [1, 4])
@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "rmsprop"])
def test_slot_count_equals_the_variables_the_built_optimizer_creates(
    name: str, accumulation_steps: int
) -> None:
    from jobs.space import SPACE
    from model.optimizers import OPTIMIZERS, build_optimizer, slots_per_variable

    assert set(SPACE["training"]["optimizer"]) <= set(OPTIMIZERS)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5)(inputs)
    x = keras.layers.BatchNormalization()(x)  # non-trainable moments get no slots
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    optimizer = build_optimizer(name, 1e-3, accumulation_steps=accumulation_steps)
    optimizer.build(model.trainable_variables)
    trainable = model.trainable_variables
    # Besides the slots: the step counter and the learning rate (scalars).
    per_weight = [v for v in optimizer.variables if len(v.shape) > 0]
    assert len(per_weight) == slots_per_variable(name, accumulation_steps) * len(trainable)
    sizes = sum(int(np.prod(v.shape)) for v in per_weight)
    assert sizes == slots_per_variable(name, accumulation_steps) * sum(
        int(np.prod(v.shape)) for v in trainable
    )
