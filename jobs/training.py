"""The epoch loop shared by a Tune trial and the single `train` job.

It owns what both need: optimizer construction (with gradient accumulation when the micro-batch
is smaller than the batch), a checkpoint after every epoch, the best-epoch model, and the runtime
OOM fallback: halve the micro-batch, double accumulation, resume from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from jobs.plan import MIN_MICRO_BATCH, TrainingConfig
from schema import run as layout

log = logging.getLogger(__name__)

LAST_MODEL = "model.keras"
BEST_MODEL = "best.keras"
# The best epoch's class probabilities on the validation rows, as they are and flipped
# left-right: what the search's ensemble is chosen from without reloading models.
BEST_PREDICTIONS = "best_predictions.npz"
STATE_FILE = "state.json"
# Keras clips probabilities to this before taking their log (keras.config.epsilon()).
_EPSILON = 1e-7


@dataclass
class TrainState:
    """What a checkpoint remembers besides the model itself."""

    epoch: int = 0
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    micro_batch_size: int = 0
    oom_retries: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    # The epochs a time-budgeted run plans now (0: max_epochs) and the seconds its epochs took.
    planned_epochs: int = 0
    train_seconds: float = 0.0

    def save(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, directory: Path) -> TrainState:
        return cls(**json.loads((directory / STATE_FILE).read_text()))


@dataclass
class TrainData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def learning_rate_at(config: TrainingConfig, epoch: int, epochs: int = 0) -> float:
    """The learning rate of epoch `epoch` (1-based) under `config.lr_schedule`, in a run of
    `epochs` epochs (0: `config.max_epochs`)."""
    if config.lr_schedule == "cosine":
        progress = (epoch - 1) / (epochs or config.max_epochs)
        return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.learning_rate


def make_optimizer(config: TrainingConfig) -> Any:
    from model.optimizers import build_optimizer

    return build_optimizer(
        config.optimizer, config.learning_rate, config.weight_decay, config.accumulation_steps
    )


def compile_model(model: Any, config: TrainingConfig) -> None:
    import keras

    if config.soft_labels:
        # The batches carry one-hot (or mixed) labels: see EpochLoop._batches.
        loss: Any = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
        metrics: list[Any] = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    else:
        loss, metrics = "sparse_categorical_crossentropy", ["accuracy"]
    model.compile(optimizer=make_optimizer(config), loss=loss, metrics=metrics)


def _transfer_optimizer_state(old: Any, new: Any, model: Any) -> None:
    """Carry step count and moment estimates into a re-made optimizer (accumulators start at 0)."""
    new.build(model.trainable_variables)
    by_key = {v.path.split("/", 1)[-1]: v for v in old.variables}
    for variable in new.variables:
        source = by_key.get(variable.path.split("/", 1)[-1])
        if source is not None and tuple(source.shape) == tuple(variable.shape):
            variable.assign(source)


def _training_share(data: TrainData, config: TrainingConfig) -> TrainData:
    """`data` with a stratified `config.train_fraction` of its training rows (seeded)."""
    if config.train_fraction >= 1.0:
        return data
    from model.batches import stratified_indices

    keep = stratified_indices(data.y_train, config.train_fraction, config.seed)
    return replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])


class EpochLoop:
    """Train epoch by epoch, checkpointing into `workdir` after each one.

    `build_model` makes a fresh compiled-from-scratch model (used when there is no checkpoint yet).
    `on_epoch_end(metrics, workdir)` is called after the checkpoint of each epoch is written.
    """

    def __init__(
        self,
        build_model: Callable[[], Any],
        data: TrainData,
        config: TrainingConfig,
        workdir: Path,
        *,
        resume_from: Path | None = None,
    ) -> None:
        self.build_model = build_model
        self.data = _training_share(data, config)
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Tensors made once (not per epoch), and the validation batches per micro-batch size.
        self._tensors: tuple[Any, Any, Any, Any] | None = None
        self._val_batches: dict[str, tuple[int, Any]] = {}
        if resume_from is not None and (Path(resume_from) / STATE_FILE).exists():
            self._restore(Path(resume_from))
        else:
            self.state = TrainState(micro_batch_size=config.micro_batch_size)
            self.model = build_model()
            compile_model(self.model, self._effective_config())

    def _effective_config(self) -> TrainingConfig:
        # The configured run at the micro-batch in use now (smaller after an OOM).
        return replace(self.config, micro_batch_size=self.state.micro_batch_size)

    def _restore(self, checkpoint: Path) -> None:
        import keras

        self.state = TrainState.load(checkpoint)
        self.model = keras.saving.load_model(checkpoint / LAST_MODEL, safe_mode=True)
        if checkpoint.resolve() != self.workdir.resolve():
            for name in (LAST_MODEL, BEST_MODEL, BEST_PREDICTIONS, STATE_FILE):
                if (checkpoint / name).exists():
                    shutil.copy2(checkpoint / name, self.workdir / name)
        log.info("resumed from %s at epoch %d", checkpoint, self.state.epoch)

    def _recover_from_oom(self, error: Exception) -> None:
        new_micro = self.state.micro_batch_size // 2
        if new_micro < MIN_MICRO_BATCH or self.config.batch_size % new_micro:
            raise RuntimeError(
                f"out of memory at micro-batch {self.state.micro_batch_size}; cannot halve "
                f"further (minimum {MIN_MICRO_BATCH}, must divide batch {self.config.batch_size})"
            ) from error
        log.warning(
            "out of memory at micro-batch %d (%s); retrying with %d from the last checkpoint",
            self.state.micro_batch_size,
            str(error).splitlines()[0][:200],
            new_micro,
        )
        oom_retries = self.state.oom_retries + 1
        from model.backend import release_memory

        self.model = None  # the failed attempt's buffers go before the retry's are made
        release_memory()
        if (self.workdir / STATE_FILE).exists():
            self._restore(self.workdir)
        else:
            self.state = TrainState()
            self.model = self.build_model()
        self.state.micro_batch_size = new_micro
        self.state.oom_retries = oom_retries
        old_optimizer = getattr(self.model, "optimizer", None)
        compile_model(self.model, self._effective_config())
        if old_optimizer is not None and old_optimizer.built:
            _transfer_optimizer_state(old_optimizer, self.model.optimizer, self.model)

    def _train_tensors(self) -> tuple[Any, Any, Any, Any]:
        from model.backend import to_tensor

        if self._tensors is None:
            data = self.data
            self._tensors = tuple(
                to_tensor(array) for array in (data.x_train, data.y_train, data.x_val, data.y_val)
            )
        return self._tensors

    def _batches(self, epoch: int) -> Any:
        """This epoch's shuffled training batches (see model/batches.py for why not
        `fit(x, y)`)."""
        from model.batches import array_batches, epoch_seed, mixup, one_hot

        x_train, y_train, _, _ = self._train_tensors()
        seed = epoch_seed(self.config.seed, epoch)
        train = array_batches(x_train, y_train, self.state.micro_batch_size, shuffle_seed=seed)
        if self.config.soft_labels:
            train = one_hot(train)
        if self.config.mixup > 0:
            train = mixup(train, self.config.mixup, seed)
        return train

    def _predict_validation(self, flipped: bool = False) -> np.ndarray:
        """Class probabilities of every validation row (mirrored left-right when `flipped`)."""
        from model.backend import flip_left_right
        from model.batches import array_batches

        micro = self.state.micro_batch_size
        key = "flipped" if flipped else "plain"
        cached = self._val_batches.get(key)
        if cached is None or cached[0] != micro:
            x_val = self._train_tensors()[2]
            if flipped:
                x_val = flip_left_right(x_val)
            cached = (micro, array_batches(x_val, None, micro))
            self._val_batches[key] = cached
        return np.asarray(self.model.predict(cached[1], verbose=0), dtype=np.float32)

    def _validation_metrics(self, probabilities: np.ndarray) -> dict[str, float]:
        """Validation loss and accuracy as Keras computes them (the training loss, with its
        label smoothing), from predicted probabilities: the same pass keeps the predictions."""
        labels = np.asarray(self.data.y_val, dtype=np.int64)
        clipped = np.clip(probabilities, _EPSILON, 1.0 - _EPSILON)
        log_p = np.log(clipped)
        classes = probabilities.shape[1]
        target = np.eye(classes, dtype=np.float32)[labels]
        if self.config.soft_labels and self.config.label_smoothing > 0:
            smoothing = self.config.label_smoothing
            target = target * (1.0 - smoothing) + smoothing / classes
        return {
            "val_loss": float(np.mean(-np.sum(target * log_p, axis=1))),
            "val_accuracy": float(np.mean(np.argmax(probabilities, axis=1) == labels)),
        }

    def _one_epoch(self, epoch: int) -> tuple[dict[str, float], np.ndarray]:
        if self.config.lr_schedule != "constant":
            self.model.optimizer.learning_rate = learning_rate_at(
                self.config, epoch, self.planned_epochs
            )
        started = time.perf_counter()
        history = self.model.fit(
            self._batches(epoch),
            epochs=epoch,
            initial_epoch=epoch - 1,
            shuffle=False,  # the batches are shuffled already, by (seed, epoch)
            verbose=0,
        ).history
        probabilities = self._predict_validation()
        seconds = time.perf_counter() - started
        metrics = {
            "loss": float(history["loss"][-1]),
            "accuracy": float(history["accuracy"][-1]),
            **self._validation_metrics(probabilities),
            "epoch_seconds": seconds,
            "images_per_second": len(self.data.x_train) / seconds,
        }
        return metrics, probabilities

    def _save_best_predictions(self, probabilities: np.ndarray, epoch: int) -> None:
        flipped = self._predict_validation(flipped=True)
        staged = self.workdir / f".{BEST_PREDICTIONS}"
        with open(staged, "wb") as handle:
            np.savez(
                handle,
                probabilities=probabilities,
                probabilities_flipped=flipped,
                labels=np.asarray(self.data.y_val, dtype=np.int64),
                epoch=np.int64(epoch),
            )
        staged.replace(self.workdir / BEST_PREDICTIONS)

    @property
    def planned_epochs(self) -> int:
        """The epochs this run plans now: max_epochs, or what fits in its time budget."""
        return self.state.planned_epochs or self.config.max_epochs

    def _plan_on_the_clock(self) -> None:
        """Re-plan a time-budgeted run on its measured epoch time (epochs start to start, so
        checkpoints and best-epoch predictions count)."""
        if self.config.time_budget_s <= 0 or self.state.epoch < 1:
            return
        per_epoch = self.state.train_seconds / self.state.epoch
        left = self.config.time_budget_s - self.state.train_seconds
        fits = int(left // per_epoch) if per_epoch > 0 else 0
        self.state.planned_epochs = max(
            self.state.epoch, min(self.config.max_epochs, self.state.epoch + fits)
        )

    def run(self, on_epoch_end: Callable[[dict[str, Any], Path], None]) -> TrainState:
        from model.backend import is_out_of_memory

        while self.state.epoch < self.planned_epochs:
            epoch = self.state.epoch + 1
            started = time.perf_counter()
            try:
                metrics, probabilities = self._one_epoch(epoch)
            except Exception as error:
                # TensorFlow's ResourceExhaustedError, or JAX's RESOURCE_EXHAUSTED runtime error.
                if not is_out_of_memory(error):
                    raise
                self._recover_from_oom(error)
                continue
            self.state.epoch = epoch
            self.model.save(self.workdir / LAST_MODEL)
            if metrics["val_accuracy"] > self.state.best_val_accuracy:
                self.state.best_val_accuracy = metrics["val_accuracy"]
                self.state.best_epoch = epoch
                # The same bytes as the model just saved: a file copy, not a second save.
                shutil.copyfile(self.workdir / LAST_MODEL, self.workdir / BEST_MODEL)
                self._save_best_predictions(probabilities, epoch)
            self.state.history.append({"epoch": epoch, **metrics})
            self.state.train_seconds += time.perf_counter() - started
            self._plan_on_the_clock()
            self.state.save(self.workdir)
            reporting = time.perf_counter()
            on_epoch_end(
                {
                    "epoch": epoch,
                    **metrics,
                    "best_val_accuracy": self.state.best_val_accuracy,
                    "micro_batch_size": self.state.micro_batch_size,
                    "oom_retries": self.state.oom_retries,
                    "planned_epochs": self.planned_epochs,
                    # What ASHA's rungs count (jobs/scheduling.py), whatever the row share.
                    layout.METRIC_IMAGES_SEEN: epoch * len(self.data.x_train),
                },
                self.workdir,
            )
            # Reporting (Tune's checkpoint copy, the tracking writes) spends the budget too: on
            # short epochs it is a large share of each, and a plan without it overruns.
            self.state.train_seconds += time.perf_counter() - reporting
            self._plan_on_the_clock()
        return self.state
