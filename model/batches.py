"""Batches of in-memory arrays for Keras `fit` and `predict`, without tf.data autotuning.

Why not `model.fit(x, y)`: Keras turns arrays into an autotuned tf.data pipeline, and on
TensorFlow 2.21 deleting an autotuned iterator (at the end of every epoch, validation pass and
predict) waits for the autotuner's thread to finish its current timed wait, which grows the
longer the pipeline runs. The process sits idle meanwhile: on the benchmark CNN with one thread,
18-21 s of a 25-40 s epoch (BENCHMARKS.md, "the tf.data stall"). A fixed one-batch prefetch
needs no autotuner and keeps the input work (a gather per batch) as cheap as Keras's own.

On TensorFlow the batches are a tf.data pipeline; on another Keras backend (JAX) they are NumPy
batches of the same order rules (model/host_batches.py), so that path needs no TensorFlow.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: a function of (seed, epoch) only, so a resumed run
    sees the same order as an uninterrupted one."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def array_batches(
    x: Any, y: Any | None, batch_size: int, *, shuffle_seed: int | None = None
) -> Any:
    """A `tf.data.Dataset` of `(x, y)` batches (or `x` batches when `y` is None); on another
    Keras backend, a `host_batches.ArrayBatches` of NumPy batches.

    Every row appears once, in a permutation fixed by `shuffle_seed` (original order when it is
    None); the last batch may be smaller. `x` and `y` may be NumPy arrays or tensors: convert
    big arrays once with `model.backend.to_tensor` when the same data is batched every epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    rows = int(x.shape[0])
    if y is not None and int(y.shape[0]) != rows:
        raise ValueError(f"x and y: expected the same number of rows, got {rows} and {y.shape[0]}")
    if rows == 0:
        raise ValueError("x: expected at least one row, got 0")
    from model.backend import is_tensorflow

    if not is_tensorflow():
        from model import host_batches

        return host_batches.array_batches(x, y, batch_size, shuffle_seed)
    import tensorflow as tf

    indices = tf.data.Dataset.range(rows)
    if shuffle_seed is not None:
        indices = indices.shuffle(rows, seed=shuffle_seed, reshuffle_each_iteration=False)
    indices = indices.batch(batch_size)
    # The arrays ride along as one repeated element (as in Keras's own adapter), so the map
    # function captures no large constant.
    arrays = tuple(tf.convert_to_tensor(array) for array in ((x,) if y is None else (x, y)))
    dataset = tf.data.Dataset.zip((indices, tf.data.Dataset.from_tensors(arrays).repeat()))

    def gather(batch: Any, data: Any) -> Any:
        taken = tuple(tf.gather(array, batch) for array in data)
        return taken[0] if y is None else taken

    dataset = dataset.map(gather).prefetch(1)
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def one_hot(dataset: Any, classes: int = 7) -> Any:
    """`(x, class index)` batches as `(x, one-hot float32)` batches."""
    from model.host_batches import ArrayBatches

    if isinstance(dataset, ArrayBatches):
        return dataset.with_recipe(classes=classes)
    import tensorflow as tf

    return dataset.map(lambda x, y: (x, tf.one_hot(tf.cast(y, tf.int32), classes)))


def mixup(dataset: Any, alpha: float, seed: int) -> Any:
    """Mixup (Zhang et al. 2018) of one-hot batches: each row mixed with another row of its
    batch, by a weight drawn from Beta(alpha, alpha). Seeded by (seed, batch index)."""
    if not alpha > 0:
        raise ValueError(f"mixup alpha: expected > 0, got {alpha}")
    from model.host_batches import ArrayBatches

    if isinstance(dataset, ArrayBatches):
        return dataset.with_recipe(mixup_alpha=float(alpha), mixup_seed=int(seed))
    import tensorflow as tf

    def mix(index: Any, batch: Any) -> Any:
        x, y = batch
        x = tf.cast(x, tf.float32)  # uint8 pixels: a mix is between two of them
        rows = tf.shape(x)[0]
        base = tf.stack([tf.constant(seed % (1 << 31), tf.int64), index])
        first = tf.random.stateless_gamma([rows], base, alpha=alpha)
        second = tf.random.stateless_gamma([rows], base + [0, 1 << 32], alpha=alpha)
        weight = first / (first + second)
        partner = tf.random.experimental.stateless_shuffle(tf.range(rows), base + [1, 0])
        weight_x = tf.reshape(tf.cast(weight, x.dtype), [-1, 1, 1, 1])
        weight_y = tf.reshape(tf.cast(weight, y.dtype), [-1, 1])
        mixed_x = weight_x * x + (1 - weight_x) * tf.gather(x, partner)
        mixed_y = weight_y * y + (1 - weight_y) * tf.gather(y, partner)
        return mixed_x, mixed_y

    return dataset.enumerate().map(mix)


def stratified_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices of a stratified sample: round(fraction * n) rows (at least 1) of each
    label, chosen by `seed`."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: expected a number in (0, 1], got {fraction!r}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        keep = max(1, int(np.floor(fraction * len(rows) + 0.5)))
        chosen.append(rng.permutation(rows)[:keep])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
