"""The shared epoch loop: checkpoints, best model, resume, and the OOM fallback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest

from fault_hooks import faulty_epoch_loop
from jobs.training import (
    BEST_MODEL,
    LAST_MODEL,
    STATE_FILE,
    EpochLoop,
    TrainData,
    TrainingConfig,
    learning_rate_at,
)
from schema.run import METRIC_IMAGES_SEEN


def tiny_model() -> keras.Model:
    inputs = keras.Input((48, 48, 1), name="pixels")
    x = keras.layers.Rescaling(1 / 255, name="rescale")(inputs)
    x = keras.layers.Conv2D(4, 3, strides=4, activation="relu", name="conv")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(7, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="tiny")


@pytest.fixture
def data() -> TrainData:
    rng = np.random.default_rng(0)
    return TrainData(
        x_train=rng.integers(0, 256, (64, 48, 48, 1)).astype("float32"),
        y_train=rng.integers(0, 7, 64),
        x_val=rng.integers(0, 256, (16, 48, 48, 1)).astype("float32"),
        y_val=rng.integers(0, 7, 16),
    )


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="micro_batch_size"):
        TrainingConfig(batch_size=64, micro_batch_size=24)
    with pytest.raises(ValueError, match="optimizer"):
        TrainingConfig(optimizer="lbfgs")
    assert TrainingConfig(batch_size=64, micro_batch_size=16).accumulation_steps == 4
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainingConfig(lr_schedule="step")


def test_a_training_config_travels_as_json_and_names_the_fields_it_does_not_know() -> None:
    import dataclasses

    config = TrainingConfig(batch_size=128, micro_batch_size=32, train_fraction=0.25)
    assert TrainingConfig.from_dict(config.to_dict()) == config
    assert TrainingConfig.from_dict({"seed": 7}) == TrainingConfig(seed=7)  # defaults fill in
    with pytest.raises(ValueError, match=r"plan cnn-x: training: unknown fields \['batch'\]"):
        TrainingConfig.from_dict({"batch": 64, "seed": 7}, "plan cnn-x: training")
    with pytest.raises(ValueError, match="micro_batch_size"):  # and validates what it knows
        TrainingConfig.from_dict({"batch_size": 64, "micro_batch_size": 24})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize("micro_batch", [16, 8])
def test_cosine_schedule_falls_by_epoch(tmp_path: Path, data: TrainData, micro_batch: int) -> None:
    """Each epoch trains at its point on a half cosine over max_epochs, with or without
    gradient accumulation (Keras schedules count micro-steps; ours counts epochs)."""
    config = TrainingConfig(
        batch_size=16,
        micro_batch_size=micro_batch,
        learning_rate=0.01,
        max_epochs=4,
        lr_schedule="cosine",
    )
    loop = EpochLoop(tiny_model, data, config, tmp_path)
    rates = []
    loop.run(lambda metrics, _: rates.append(float(loop.model.optimizer.learning_rate)))
    assert rates == pytest.approx([0.01, 0.008536, 0.005, 0.001464], abs=1e-6)
    assert learning_rate_at(TrainingConfig(learning_rate=0.01), 7) == 0.01  # constant


def test_a_time_budgeted_run_plans_its_epochs_on_its_measured_epoch_time(
    tmp_path: Path, data: TrainData
) -> None:
    config = TrainingConfig(
        batch_size=16, micro_batch_size=16, max_epochs=12, lr_schedule="cosine", time_budget_s=32
    )
    loop = EpochLoop(tiny_model, data, config, tmp_path)
    assert loop.planned_epochs == 12  # nothing measured yet: max_epochs
    loop.state.epoch, loop.state.train_seconds = 2, 10.0
    loop._plan_on_the_clock()
    assert loop.planned_epochs == 6  # 5 s an epoch, 22 s left: four more
    assert learning_rate_at(config, 4, loop.planned_epochs) == pytest.approx(0.0005)
    loop.state.train_seconds = 2.0
    loop._plan_on_the_clock()
    assert loop.planned_epochs == 12  # 1 s an epoch: at most max_epochs
    loop.state.train_seconds = 40.0
    loop._plan_on_the_clock()
    assert loop.planned_epochs == 2  # over budget: the run ends here
    with pytest.raises(ValueError, match="time_budget_s"):
        TrainingConfig(time_budget_s=-1)


def test_a_run_out_of_time_ends_finished_after_the_epochs_that_fit(
    tmp_path: Path, data: TrainData
) -> None:
    config = TrainingConfig(batch_size=16, micro_batch_size=16, max_epochs=5, time_budget_s=1e-6)
    reported = []
    state = EpochLoop(tiny_model, data, config, tmp_path).run(
        lambda metrics, _: reported.append(metrics)
    )
    assert [m["epoch"] for m in reported] == [1]
    assert reported[0]["planned_epochs"] == 1 and state.planned_epochs == 1
    # Resumed, it does not train again.
    again = EpochLoop(tiny_model, data, config, tmp_path / "more", resume_from=tmp_path)
    assert again.run(lambda metrics, _: reported.append(metrics)).epoch == 1
    assert len(reported) == 1


def test_loop_checkpoints_every_epoch_and_keeps_the_best(tmp_path: Path, data: TrainData) -> None:
    reported = []
    loop = EpochLoop(
        tiny_model, data, TrainingConfig(batch_size=16, micro_batch_size=16, max_epochs=3), tmp_path
    )
    state = loop.run(lambda metrics, _: reported.append(metrics))
    assert [m["epoch"] for m in reported] == [1, 2, 3]
    for key in (
        "loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
        "epoch_seconds",
        "images_per_second",
        "best_val_accuracy",
    ):
        assert all(np.isfinite(m[key]) for m in reported), key
    assert state.best_val_accuracy == max(m["val_accuracy"] for m in reported)
    assert (tmp_path / BEST_MODEL).exists() and (tmp_path / LAST_MODEL).exists()
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    assert saved["epoch"] == 3 and len(saved["history"]) == 3
    best = keras.saving.load_model(tmp_path / BEST_MODEL, safe_mode=True)
    assert best.predict(data.x_val, verbose=0).shape == (16, 7)


def test_resume_continues_from_the_checkpoint(tmp_path: Path, data: TrainData) -> None:
    first = EpochLoop(
        tiny_model,
        data,
        TrainingConfig(batch_size=16, micro_batch_size=16, max_epochs=2),
        tmp_path / "a",
    )
    first.run(lambda *_: None)
    iterations = int(first.model.optimizer.iterations.numpy())
    epochs_seen = []
    resumed = EpochLoop(
        tiny_model,
        data,
        TrainingConfig(batch_size=16, micro_batch_size=16, max_epochs=4),
        tmp_path / "b",
        resume_from=tmp_path / "a",
    )
    assert int(resumed.model.optimizer.iterations.numpy()) == iterations
    state = resumed.run(lambda metrics, _: epochs_seen.append(metrics["epoch"]))
    assert epochs_seen == [3, 4] and state.epoch == 4 and len(state.history) == 4


def test_oom_halves_the_micro_batch_and_resumes(tmp_path: Path, data: TrainData) -> None:
    reported = []
    loop = faulty_epoch_loop({"oom_at_epoch": 2, "above_micro_batch": 16})(
        tiny_model,
        data,
        TrainingConfig(batch_size=32, micro_batch_size=32, max_epochs=3),
        tmp_path,
    )
    state = loop.run(lambda metrics, _: reported.append(metrics))
    assert [m["epoch"] for m in reported] == [1, 2, 3]  # no epoch lost or repeated
    assert [m["micro_batch_size"] for m in reported] == [32, 16, 16]
    assert state.oom_retries == 1 and reported[-1]["oom_retries"] == 1
    # The effective batch is kept: 16 x 2 accumulation steps.
    assert loop.model.optimizer.gradient_accumulation_steps == 2


def test_oom_gives_up_below_the_minimum(tmp_path: Path, data: TrainData) -> None:
    loop = faulty_epoch_loop({"oom_at_epoch": 1, "above_micro_batch": 0})(
        tiny_model,
        data,
        TrainingConfig(batch_size=8, micro_batch_size=8, max_epochs=1),
        tmp_path,
    )
    with pytest.raises(RuntimeError, match="cannot halve"):
        loop.run(lambda *_: None)


def test_sweep_removes_only_the_directories_of_exited_trials(tmp_path: Path) -> None:
    """Tune kills a stopped trial's process, so its own cleanup never runs: the sweep must
    remove what such trials left and keep what running ones use."""
    import subprocess
    import sys

    from jobs.trial import WORKDIR_PREFIX, sweep_workdirs

    exited = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = tmp_path / f"{WORKDIR_PREFIX}{exited.stdout.strip()}-abc"
    alive = tmp_path / f"{WORKDIR_PREFIX}{os.getpid()}-def"
    unrelated = tmp_path / f"{WORKDIR_PREFIX}old-style"
    for directory in (dead, alive, unrelated):
        (directory / "current").mkdir(parents=True)
        (directory / "current" / LAST_MODEL).write_bytes(b"x" * 1024)
    assert sweep_workdirs(tmp_path) == 1
    assert not dead.exists() and alive.exists() and unrelated.exists()


def test_mixup_mixes_rows_and_labels_alike() -> None:
    from model.batches import array_batches, mixup, one_hot

    x = np.stack([np.full((48, 48, 1), float(i)) for i in range(8)]).astype("float32")
    y = np.arange(8) % 7
    batches = list(mixup(one_hot(array_batches(x, y, 8, shuffle_seed=3)), 0.4, seed=11))
    (mixed_x, mixed_y) = batches[0]
    mixed_x, mixed_y = np.asarray(mixed_x), np.asarray(mixed_y)
    assert np.allclose(mixed_y.sum(axis=1), 1.0, atol=1e-6)
    # Each mixed image is a constant image whose value is the label-weighted mean of the rows
    # it mixes: the pixel and label weights are the same draw.
    order = np.asarray(next(iter(array_batches(x, y, 8, shuffle_seed=3)))[0])[:, 0, 0, 0]
    for image, label in zip(mixed_x, mixed_y, strict=True):
        assert np.allclose(image, image.flat[0], atol=1e-4)  # constant rows stay constant
        assert 0.0 <= image.flat[0] <= 7.0
        assert label.max() >= 0.5 - 1e-6  # each row keeps at least half of one label
    assert not np.allclose(mixed_x[:, 0, 0, 0], order)  # something was mixed
    # Seeded: the same seed mixes the same way.
    again = next(iter(mixup(one_hot(array_batches(x, y, 8, shuffle_seed=3)), 0.4, seed=11)))
    assert np.allclose(np.asarray(again[0]), mixed_x)


def test_soft_labels_train_with_categorical_loss_and_a_stratified_row_share(
    tmp_path: Path, data: TrainData
) -> None:
    config = TrainingConfig(
        batch_size=16,
        micro_batch_size=16,
        max_epochs=1,
        optimizer="sgd",
        weight_decay=5e-4,
        label_smoothing=0.1,
        mixup=0.2,
        train_fraction=0.5,
    )
    loop = EpochLoop(tiny_model, data, config, tmp_path)
    assert isinstance(loop.model.loss, keras.losses.CategoricalCrossentropy)
    assert loop.model.optimizer.weight_decay == pytest.approx(5e-4)
    # About half of every class's rows (at least one each), and no row twice.
    counts = np.bincount(data.y_train, minlength=7)
    kept = np.bincount(loop.data.y_train, minlength=7)
    assert np.all(np.abs(kept - counts / 2) <= 1) and len(loop.data.x_train) < len(data.x_train)
    reported: list[dict] = []
    state = loop.run(lambda metrics, _: reported.append(metrics))
    assert state.epoch == 1 and 0.0 <= state.best_val_accuracy <= 1.0
    # ASHA's rungs count the images of its share, not of every row.
    assert reported[-1][METRIC_IMAGES_SEEN] == len(loop.data.x_train)
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainingConfig(label_smoothing=0.9)
    with pytest.raises(ValueError, match="train_fraction"):
        TrainingConfig(train_fraction=0.0)


@pytest.mark.parametrize(
    ("optimizer", "weight_decay"), [("adamw", 0.0), ("adamw", 5e-4), ("adam", 0.0), ("sgd", 1e-4)]
)
def test_the_report_states_the_weight_decay_the_optimizer_applies(
    optimizer: str, weight_decay: float
) -> None:
    """weight_decay=0 means no decay for every optimizer, AdamW included, and the report's
    regularisation line says what the built optimizer applies."""
    from model.optimizers import build_optimizer
    from viz.recipe import regularisation_text

    applied = build_optimizer(optimizer, 1e-3, weight_decay).weight_decay or 0.0
    assert applied == pytest.approx(weight_decay)
    text = regularisation_text({"optimizer": optimizer, "weight_decay": weight_decay}, {})
    assert text == (f"weight decay {weight_decay:g}" if weight_decay else "none")
