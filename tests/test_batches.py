"""The input pipeline of training and prediction (model/batches.py)."""

from __future__ import annotations

import numpy as np
import pytest

from model.batches import array_batches, epoch_seed


def _rows(dataset) -> list[int]:
    return [int(v) for x, _ in dataset for v in x.numpy()[:, 0]]


def test_every_row_once_per_epoch_in_a_seeded_order() -> None:
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    y = np.arange(10) % 7
    plain = array_batches(x, y, 4)
    assert [len(xb) for xb, _ in plain] == [4, 4, 2]  # the last batch is smaller
    assert _rows(plain) == list(range(10))
    first = _rows(array_batches(x, y, 4, shuffle_seed=epoch_seed(2017, 1)))
    assert sorted(first) == list(range(10)) and first != list(range(10))
    # The order is a function of (seed, epoch): a resumed run reshuffles like an unbroken one.
    assert _rows(array_batches(x, y, 4, shuffle_seed=epoch_seed(2017, 1))) == first
    assert _rows(array_batches(x, y, 4, shuffle_seed=epoch_seed(2017, 2))) != first
    # Labels stay with their rows.
    for xb, yb in array_batches(x, y, 3, shuffle_seed=5):
        np.testing.assert_array_equal(yb.numpy(), xb.numpy()[:, 0].astype(int) % 7)


def test_autotuning_is_off_and_x_alone_works() -> None:
    x = np.zeros((5, 48, 48, 1), np.float32)
    dataset = array_batches(x, None, 2)
    assert dataset.options().autotune.enabled is False
    assert [tuple(batch.shape) for batch in dataset] == [(2, 48, 48, 1)] * 2 + [(1, 48, 48, 1)]


def test_bad_input_is_refused() -> None:
    x = np.zeros((4, 1), np.float32)
    with pytest.raises(ValueError, match="same number of rows, got 4 and 3"):
        array_batches(x, np.zeros(3), 2)
    with pytest.raises(ValueError, match="batch_size"):
        array_batches(x, None, 0)
    with pytest.raises(ValueError, match="at least one row"):
        array_batches(x[:0], None, 2)
