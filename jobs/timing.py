"""How fast a worker trains: a calibration at search start, and each trial's epoch time estimate.

The driver trains a fixed reference CNN (`jobs.space.FAST_CNN`) for a few batches on a worker,
with the CPU (and GPU) share a trial gets, through plain Keras. That gives two things: the
machine's `reference_images_per_second` (recorded with every budget result, so results from
machines of different speed can be compared) and its rate of work, which turns any model's
counted work per epoch (`model.flops.epoch_work`) into seconds before the trial is launched.

The same process then runs the reference through the trial's own epoch loop for a few short
epochs (validation, mirrored predictions, checkpoints) and measures its memory above what it
held before: less the model's one-step estimate and the data copies, that is the host memory
the framework adds to every trial on this worker (`runtime_memory_bytes`, applied to every
placement as `jobs.resources.TrialOverhead`).

The calibration is one short measurement: a load spike during it would set every estimate of
the search. The trials' own measured epochs correct it (`EpochTimeCorrection`).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

log = logging.getLogger(__name__)

REFERENCE_BATCH = 64
REFERENCE_IMAGES = 1024  # timed; one more batch first, to build the train function
COPIES_START_DELAY_S = 20.0
CALIBRATION_TIMEOUT_S = 600  # a worker still starting (a cluster scaling up) may take minutes
# Per epoch besides the batches: Keras's fit set-up, the validation iterator, the epoch's
# metrics (0.5-1 s on a laptop core for a DNN whose batches take 2 s).
EPOCH_OVERHEAD_S = 0.5
# The memory probe: long enough to trace and run everything an epoch does (fit, validation,
# mirrored predictions, checkpoints) twice, short enough to add seconds to the calibration.
MEMORY_PROBE_EPOCHS = 2
MEMORY_PROBE_ROWS = 512
MEMORY_PROBE_VAL_ROWS = 128
# The correction's range: a machine busy during the calibration only made every estimate 2-5x
# high (issue 28); a ratio beyond this says more about one trial (swapping, a stray process)
# than about the machine.
CORRECTION_RANGE = (0.2, 5.0)
# A new correction is logged once it moves this far (relative) from the last one logged.
CORRECTION_LOG_STEP = 0.25
# A trial's ratio is the median of its latest epochs: one epoch of a small model is jitter.
CORRECTION_EPOCHS = 3


@dataclass(frozen=True)
class Calibration:
    """What one worker measured on the reference CNN."""

    reference_images_per_second: float
    work_per_second: float  # MAC-equivalents per second (see model/flops.py)
    threads: int
    seconds: float  # wall time of the timed part
    # Host bytes the epoch loop holds besides the model's step and the data (0: not measured).
    runtime_memory_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_reference(threads: int, start_at: float = 0.0) -> Calibration:
    """Train the reference CNN on random pixels in this process; must run before TF is used.

    The timed part starts at wall time `start_at` (if still ahead), so copies started
    together time the same seconds whatever their start-up took. The memory probe runs after
    it (see the module docstring).
    """
    import gc

    import numpy as np

    from jobs.trial import configure_backend, private_resident_bytes

    configure_backend(threads, 0.0)
    import keras

    from jobs.space import FAST_CNN
    from model.batches import array_batches
    from model.configs import build_model
    from model.flops import epoch_work, image_cost
    from model.preprocessing import pixel_statistics

    # Where a trial takes its baseline: TensorFlow up, before the data and the model.
    baseline = private_resident_bytes()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (REFERENCE_IMAGES, 48, 48, 1), dtype=np.uint8)
    labels = rng.integers(0, 7, REFERENCE_IMAGES)
    stats = pixel_statistics(images)
    model = build_model(FAST_CNN, stats=stats)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x = images  # uint8, as trials feed them (the model casts on entry)
    warm = array_batches(x[:REFERENCE_BATCH], labels[:REFERENCE_BATCH], REFERENCE_BATCH)
    # shuffle=False: Keras cannot shuffle a tf.data.Dataset (it warns); `batches` has its seed
    model.fit(warm, epochs=1, shuffle=False, verbose=0)
    batches = array_batches(x, labels, REFERENCE_BATCH, shuffle_seed=1)
    time.sleep(max(0.0, start_at - time.time()))
    started = time.perf_counter()
    model.fit(batches, epochs=1, shuffle=False, verbose=0)
    seconds = time.perf_counter() - started
    work = epoch_work(image_cost(model), REFERENCE_IMAGES, 0, REFERENCE_BATCH)
    del model, warm, batches
    keras.backend.clear_session()
    gc.collect()
    probe = images[:MEMORY_PROBE_ROWS], labels[:MEMORY_PROBE_ROWS]
    runtime = runtime_memory(baseline, *probe, lambda: build_model(FAST_CNN, stats=stats))
    keras.backend.clear_session()
    return Calibration(REFERENCE_IMAGES / seconds, work / seconds, threads, seconds, runtime)


def runtime_memory(baseline: int, images: Any, labels: Any, build: Any) -> int:
    """Host bytes above `baseline` that a short run of the trial's epoch loop holds besides
    its model's one-step estimate, its checkpoints and its data (`images` and the loop's
    copies of them)."""
    import tempfile
    from pathlib import Path

    from jobs.resources import TrialOverhead
    from jobs.training import EpochLoop, TrainData, TrainingConfig
    from jobs.trial import peak_private_bytes
    from model.memory import memory_breakdown

    val = MEMORY_PROBE_VAL_ROWS
    data = TrainData(images, labels, images[:val], labels[:val])
    config = TrainingConfig(
        batch_size=REFERENCE_BATCH,
        micro_batch_size=REFERENCE_BATCH,
        max_epochs=MEMORY_PROBE_EPOCHS,
        seed=0,
    )
    with tempfile.TemporaryDirectory(prefix="fer-calibration-") as workdir:
        loop = EpochLoop(build, data, config, Path(workdir))
        loop.run(lambda metrics, directory: None)
        parts = memory_breakdown(loop.model, REFERENCE_BATCH, config.optimizer)
    step = sum(parts.values())
    checkpoint = TrialOverhead.checkpoint_bytes(parts["weights"] + parts["optimizer_slots"])
    held = TrialOverhead(0).data_bytes(len(images), val) + images.nbytes + labels.nbytes
    return max(0, peak_private_bytes() - baseline - step - checkpoint - held)


def calibrate(resources: dict[str, float], copies: int = 1) -> Calibration:
    """Measure on workers with a trial's `resources` (Ray tasks with the same CPU and GPU
    share, each in a fresh worker process, so TensorFlow's thread pools can be set).

    `copies` run at once, as many as trials will share the workers: two trials on two cores
    run about 20 % slower each than one alone (memory bandwidth, caches; BENCHMARKS.md), and
    the estimate is for trials that share. The median copy is returned.
    """
    import ray

    threads = max(1, int(round(resources.get("CPU", 1.0))))
    task = ray.remote(
        num_cpus=resources.get("CPU", 1.0),
        num_gpus=resources.get("GPU", 0.0),
        max_calls=1,  # a fresh process: TF's thread pools are set before its first op
    )(measure_reference)
    runs = ray.get(
        [task.remote(threads) for _ in range(max(1, copies))], timeout=CALIBRATION_TIMEOUT_S
    )
    runs.sort(key=lambda run: run.work_per_second)
    memory = sorted(run.runtime_memory_bytes for run in runs)
    return replace(runs[len(runs) // 2], runtime_memory_bytes=memory[len(memory) // 2])


def estimate_epoch_seconds(
    model: Any, train_rows: int, val_rows: int, micro_batch: int, calibration: Calibration
) -> float:
    """Seconds of one epoch of `model` on the calibrated worker."""
    from model.flops import epoch_work, image_cost

    work = epoch_work(image_cost(model), train_rows, val_rows, micro_batch)
    return EPOCH_OVERHEAD_S + work / calibration.work_per_second


@dataclass
class EpochTimeCorrection:
    """What the trials measured against their estimates: the factor on every later estimate.

    `observe` takes a trial's estimate before any correction and an epoch it measured (the
    trial's `epoch_seconds`: its training then validation rows, as the estimate counts them;
    not the first epoch of its process, which also traces the model's functions).
    Each trial counts once, by the median measured / estimated ratio of its latest
    CORRECTION_EPOCHS epochs; the factor is the median of the trials' ratios, within
    CORRECTION_RANGE, and 1.0 before any trial reports. Plain data: it is pickled with the
    searcher that holds it.
    """

    # trial -> measured / estimated of its latest epochs
    ratios: dict[str, list[float]] = field(default_factory=dict)
    logged: float = 1.0

    @property
    def factor(self) -> float:
        if not self.ratios:
            return 1.0
        low, high = CORRECTION_RANGE
        median = statistics.median(statistics.median(r) for r in self.ratios.values())
        return min(high, max(low, median))

    def observe(self, trial: str, estimated_s: float, measured_s: float) -> None:
        """Record an epoch of `trial`; ignored where either time is missing (<= 0)."""
        if not (estimated_s > 0 and measured_s > 0):
            return
        latest = self.ratios.setdefault(trial, [])
        latest.append(measured_s / estimated_s)
        del latest[:-CORRECTION_EPOCHS]
        factor = self.factor
        if abs(factor / self.logged - 1) >= CORRECTION_LOG_STEP:
            log.info(
                "epoch time estimates x%.2f from now (was x%.2f): the median measured/estimated "
                "of %d trial(s)",
                factor,
                self.logged,
                len(self.ratios),
            )
            self.logged = factor
