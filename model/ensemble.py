"""An ensemble of trained models: which members, with what weights, as one Keras model.

Members are chosen by greedy forward selection with replacement (Caruana et al. 2004) on one
half of the validation rows (`select`); every accuracy stated about the result is measured on
the other half (`report`), which took no part in the choice. The chosen ensemble is one
Functional model built from built-in layers only (the members inside, a fixed left-right flip
as a non-trainable Dense, the weighted mean as Rescaling + Add), so its `.keras` file is
self-contained and loads with `safe_mode=True`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.batches import stratified_indices

# Selection stops after this many additions (members may repeat: a weight is a count / total).
MAX_SELECTION_STEPS = 25
_EPSILON = 1e-7


@dataclass(frozen=True)
class Halves:
    """Row indices of the validation rows' two fixed, stratified halves."""

    select: np.ndarray
    report: np.ndarray


def split_halves(labels: np.ndarray, seed: int) -> Halves:
    """Two disjoint stratified halves of `labels`' rows, fixed by `seed`."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size < 2:
        raise ValueError(f"labels: expected a 1-D array of at least 2 rows, got {labels.shape}")
    select = stratified_indices(labels, 0.5, seed)
    report = np.setdiff1d(np.arange(labels.size), select)
    return Halves(select=select, report=report)


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probabilities, axis=1) == labels))


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(labels.size), labels]
    return float(-np.mean(np.log(np.clip(picked, _EPSILON, 1.0))))


def with_flip(plain: np.ndarray, flipped: np.ndarray, flip: bool) -> np.ndarray:
    """A member's probabilities, averaged with those of the mirrored images when `flip`."""
    return (plain + flipped) / 2.0 if flip else plain


@dataclass(frozen=True)
class Selection:
    """Members (indices into the candidates, in order of first pick) and their weights."""

    members: tuple[int, ...]
    weights: tuple[float, ...]
    flip: bool

    def combine(self, candidates: Sequence[np.ndarray]) -> np.ndarray:
        """The weighted mean of the members' probabilities."""
        return sum(w * candidates[m] for m, w in zip(self.members, self.weights, strict=True))


def greedy_selection(
    candidates: Sequence[np.ndarray],
    labels: np.ndarray,
    flip: bool,
    max_steps: int = MAX_SELECTION_STEPS,
) -> Selection:
    """Greedy forward selection with replacement on these rows (pass only the `select` half).

    Each step adds the candidate that most lowers the log loss of the running mean: on a
    couple of thousand rows accuracy moves in steps of 0.05 points and ties or noise decide a
    pure-accuracy greedy choice, while log loss ranks every candidate. The best prefix wins.
    """
    if not candidates:
        raise ValueError("candidates: expected at least one model's probabilities, got none")
    labels = np.asarray(labels)
    for index, found in enumerate(candidates):
        if found.shape != (labels.size, found.shape[1]):
            raise ValueError(
                f"candidate {index}: expected probabilities of shape ({labels.size}, classes), "
                f"got {found.shape}"
            )
    total = np.zeros_like(candidates[0], dtype=np.float64)
    counts: dict[int, int] = {}
    order: list[int] = []
    best_loss, best_counts, best_order = np.inf, {}, []
    for step in range(1, max_steps + 1):
        losses = [log_loss((total + c) / step, labels) for c in candidates]
        pick = int(np.argmin(losses))
        total += candidates[pick]
        counts[pick] = counts.get(pick, 0) + 1
        if pick not in order:
            order.append(pick)
        if losses[pick] < best_loss - 1e-9:
            best_loss, best_counts, best_order = losses[pick], dict(counts), list(order)
    steps = sum(best_counts.values())
    return Selection(
        members=tuple(best_order),
        weights=tuple(best_counts[m] / steps for m in best_order),
        flip=flip,
    )


def build_ensemble(members: Sequence[Any], weights: Sequence[float], flip: bool) -> Any:
    """One Keras model: the weighted mean of `members`' softmax outputs, each averaged with
    its output on the left-right mirrored image when `flip`. Takes raw 0..255 pixels."""
    import keras

    if len(members) != len(weights) or not members:
        raise ValueError(
            f"members and weights: expected the same non-zero length, got {len(members)} "
            f"and {len(weights)}"
        )
    shape = tuple(members[0].inputs[0].shape[1:])
    for index, member in enumerate(members):
        found = tuple(member.inputs[0].shape[1:])
        if found != shape:
            raise ValueError(f"member {index}: expected input shape {shape}, got {found}")
        # Nested models need distinct names; a trial's model is named by its family.
        member.name = f"member_{index}"
    width = shape[1]
    pixels = keras.Input(shape, name="pixels")
    mirrored = None
    if flip:
        # A left-right mirror from built-in layers (no Lambda: the file must load with
        # safe_mode): width last, multiplied by the reversed identity, which is exact.
        flat = keras.layers.Permute((1, 3, 2), name="width_last")(pixels)
        mirror = keras.layers.Dense(width, use_bias=False, trainable=False, name="mirror")
        swapped = mirror(flat)
        mirror.set_weights([np.eye(width, dtype="float32")[::-1]])
        mirrored = keras.layers.Permute((1, 3, 2), name="mirrored")(swapped)
    weighted = []
    for index, (member, weight) in enumerate(zip(members, weights, strict=True)):
        output = member(pixels)
        if mirrored is not None:
            output = keras.layers.Average(name=f"flip_mean_{index}")([output, member(mirrored)])
        weighted.append(keras.layers.Rescaling(float(weight), name=f"weight_{index}")(output))
    mean = weighted[0] if len(weighted) == 1 else keras.layers.Add(name="mean")(weighted)
    return keras.Model(pixels, mean, name="ensemble")
