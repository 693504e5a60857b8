"""Trials on either Keras backend: the setting agrees everywhere, a JAX trial trains without
TensorFlow, its model loads under TensorFlow and predicts the same, and JAX's out-of-memory
error takes the same path as TensorFlow's.

This process runs Keras on TensorFlow (Keras picks its backend once, at import), so the JAX side
runs in a fresh process (tests/jax_worker.py) with TensorFlow made unimportable.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import yaml

from jobs.settings import SearchSettings, TrainSettings, add_arguments, from_namespace
from model.backend import (
    BACKENDS,
    JAX_MEM_FRACTION_ENV,
    JAX_PREALLOCATE_ENV,
    is_out_of_memory,
    select_backend,
)
from model.batches import array_batches, mixup, one_hot
from model.host_batches import array_batches as host_array_batches

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("jax-trial")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "jax_worker.py"), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out, json.loads((out / "result.json").read_text())


def test_the_backend_setting_agrees_across_mlproject_cli_and_settings() -> None:
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    for name, settings_class in (("main", SearchSettings), ("search", SearchSettings)) + (
        ("train", TrainSettings),
    ):
        parameter = entry_points[name]["parameters"]["backend"]
        assert parameter["default"] == settings_class.backend == "tensorflow", name
        assert "--backend {backend}" in entry_points[name]["command"], name
        parser = argparse.ArgumentParser()
        add_arguments(parser, settings_class)
        assert from_namespace(settings_class, parser.parse_args(["--backend", "jax"])).backend == (
            "jax"
        )
        with pytest.raises(ValueError, match=r"backend: expected one of \('tensorflow', 'jax'\)"):
            from_namespace(settings_class, parser.parse_args(["--backend", "theano"]))
    assert BACKENDS == ("tensorflow", "jax")


def test_selecting_jax_caps_its_gpu_allocator_at_the_placement_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("KERAS_BACKEND", JAX_PREALLOCATE_ENV, JAX_MEM_FRACTION_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")  # restored after the test
    select_backend("jax", 0.25)
    assert os.environ["KERAS_BACKEND"] == "jax"
    assert os.environ[JAX_PREALLOCATE_ENV] == "false"
    assert float(os.environ[JAX_MEM_FRACTION_ENV]) == 0.25
    with pytest.raises(ValueError, match="gpu_share"):
        select_backend("jax", 1.5)


@pytest.mark.integration
def test_a_trial_trains_under_jax_without_tensorflow(jax_run: tuple[Path, dict]) -> None:
    _, result = jax_run
    assert result["backend"] == "jax"
    assert result["tensorflow_imported"] is False
    trial = result["trial"]
    assert trial["epochs"] == [1, 2]
    assert trial["accumulation_steps"] == 2  # micro-batch 8 of a batch of 16
    assert trial["rows_predicted"] == 16 and trial["flipped_differs"]
    facts = result["facts"]
    assert facts["auto_precision"] == "float32" and facts["gpu_memory_info"] is None
    assert facts["measured_memory_keys"] == ["peak_memory_mb", "shared_memory_mb"]  # no GPU peak
    assert facts["other_runtime_error_is_oom"] is False


@pytest.mark.integration
def test_a_jax_model_loads_under_tensorflow_and_predicts_the_same(
    jax_run: tuple[Path, dict],
) -> None:
    out, _ = jax_run
    assert keras.backend.backend() == "tensorflow"
    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    probe = np.load(out / "probe.npz")
    again = model.predict(probe["images"], verbose=0)
    assert again.shape == probe["probabilities"].shape == (12, 7)
    np.testing.assert_allclose(again, probe["probabilities"], atol=1e-4, rtol=0)


@pytest.mark.integration
def test_a_jax_out_of_memory_error_takes_the_tensorflow_path(jax_run: tuple[Path, dict]) -> None:
    """Halved micro-batch, resumed from the checkpoint: no epoch lost or repeated."""
    _, result = jax_run
    oom = result["oom"]
    assert oom["epochs"] == [1, 2, 3]
    assert oom["micro_batch_sizes"] == [32, 16, 16]
    assert oom["oom_retries"] == 1 and oom["accumulation_steps"] == 2


def test_tensorflow_out_of_memory_is_recognised_and_other_errors_are_not() -> None:
    import tensorflow as tf

    assert is_out_of_memory(tf.errors.ResourceExhaustedError(None, None, "OOM"))
    assert not is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED"))


def _rows(batches: Any) -> list[np.ndarray]:
    return [batches[i] for i in range(len(batches))]


def test_host_batches_see_every_row_once_in_a_seeded_order() -> None:
    x = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * np.ones((1, 2, 2, 1), np.uint8)
    y = np.arange(10) % 7
    first = _rows(host_array_batches(x, y, 4, shuffle_seed=3))
    assert [len(b[0]) for b in first] == [4, 4, 2]  # the last batch is smaller
    seen = np.concatenate([b[0][:, 0, 0, 0] for b in first])
    assert sorted(seen) == list(range(10)) and list(seen) != list(range(10))
    again = np.concatenate([b[0][:, 0, 0, 0] for b in _rows(host_array_batches(x, y, 4, 3))])
    other = np.concatenate([b[0][:, 0, 0, 0] for b in _rows(host_array_batches(x, y, 4, 4))])
    assert list(again) == list(seen) and list(other) != list(seen)
    plain = _rows(host_array_batches(x, None, 4, None))
    assert [int(b[0, 0, 0, 0]) for b in plain] == [0, 4, 8]  # x only, stored order


def test_host_batches_one_hot_and_mixup() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 4, 4, 1), dtype=np.uint8)
    y = rng.integers(0, 7, 16)
    batches = one_hot(host_array_batches(x, y, 8, shuffle_seed=1))
    bx, by = batches[0]
    assert by.shape == (8, 7) and by.dtype == np.float32 and np.all(by.sum(axis=1) == 1)
    mixed = mixup(batches, 0.4, seed=5)
    mx, my = mixed[0]
    assert mx.dtype == np.float32 and np.allclose(my.sum(axis=1), 1.0)
    assert not np.array_equal(mx, bx.astype(np.float32))  # rows were mixed
    assert mx.min() >= 0 and mx.max() <= 255
    same = mixup(batches, 0.4, seed=5)[0]
    assert np.array_equal(same[0], mx) and np.array_equal(same[1], my)
    with pytest.raises(ValueError, match="mixup alpha"):
        mixup(batches, 0.0, seed=5)


def test_the_tensorflow_path_still_builds_tf_data() -> None:
    import tensorflow as tf

    x = np.zeros((5, 2, 2, 1), np.uint8)
    assert isinstance(array_batches(x, np.zeros(5), 2), tf.data.Dataset)
