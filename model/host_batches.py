"""Batches of NumPy arrays for Keras on any backend (the JAX path of model/batches.py).

No TensorFlow: the JAX trial runs where there is none. The order, one-hot labels and mixup
follow the tf.data path's rules (a permutation fixed by the shuffle seed; mixup weights from
Beta(alpha, alpha) and partners seeded by (seed, batch index)), drawn with NumPy's generator, so
the same seed gives the same batches on every run, though not the tf.data path's bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import keras
import numpy as np


@dataclasses.dataclass(frozen=True)
class BatchRecipe:
    """How to cut and transform the batches; immutable, so `one_hot`/`mixup` return copies."""

    batch_size: int
    order: np.ndarray | None = None  # row order; None: as stored
    classes: int = 0  # > 0: one-hot labels of this many classes
    mixup_alpha: float = 0.0
    mixup_seed: int = 0


class ArrayBatches(keras.utils.PyDataset):
    """`(x, y)` batches (or `x` batches when `y` is None) of in-memory arrays, read in this
    process (no worker threads: a batch is one gather)."""

    def __init__(self, x: Any, y: Any | None, recipe: BatchRecipe) -> None:
        super().__init__(workers=1, use_multiprocessing=False)
        self.x = np.asarray(x)
        self.y = None if y is None else np.asarray(y)
        self.recipe = recipe

    def with_recipe(self, **changes: Any) -> ArrayBatches:
        return ArrayBatches(self.x, self.y, dataclasses.replace(self.recipe, **changes))

    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.x) / self.recipe.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} of {self.num_batches}")
        size = self.recipe.batch_size
        rows: Any = slice(index * size, (index + 1) * size)
        if self.recipe.order is not None:
            rows = self.recipe.order[rows]
        x = self.x[rows]
        if self.y is None:
            return x
        y = self.y[rows]
        if self.recipe.classes:
            y = np.eye(self.recipe.classes, dtype=np.float32)[y.astype(np.int64)]
        if self.recipe.mixup_alpha > 0:
            x, y = _mix(x, y, self.recipe.mixup_alpha, self.recipe.mixup_seed, index)
        return x, y


def _mix(x: np.ndarray, y: np.ndarray, alpha: float, seed: int, index: int) -> tuple[Any, Any]:
    """Each row mixed with another row of its batch by a Beta(alpha, alpha) weight."""
    rng = np.random.default_rng([seed % (1 << 31), index])
    rows = len(x)
    weight = rng.beta(alpha, alpha, rows).astype(np.float32)
    partner = rng.permutation(rows)
    x = x.astype(np.float32)  # uint8 pixels: a mix is between two of them
    weight_x = weight.reshape(-1, *([1] * (x.ndim - 1)))
    weight_y = weight.reshape(-1, 1).astype(y.dtype)
    return (
        weight_x * x + (1 - weight_x) * x[partner],
        weight_y * y + (1 - weight_y) * y[partner],
    )


def array_batches(x: Any, y: Any | None, batch_size: int, shuffle_seed: int | None) -> ArrayBatches:
    order = None
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(int(x.shape[0]))
    return ArrayBatches(x, y, BatchRecipe(batch_size, order))
