"""Core types and constants: FERDataset, DataError, the class and usage names, the parse result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
USAGES: tuple[str, ...] = ("Training", "PublicTest", "PrivateTest")
IMAGE_SIDE = 48
N_PIXELS = IMAGE_SIDE * IMAGE_SIDE

_TRAINING, _PUBLIC, _PRIVATE = 0, 1, 2
_NO_SPLIT = -1  # usage code of rows whose source has no split column (validation split later)
_MAX_REPORTED = 5  # bad locations named in a skip warning


class DataError(ValueError):
    """Bad or unreadable FER2013 input; the message names the file, the line and what was wrong."""


@dataclass(frozen=True, eq=False, repr=False)
class FERDataset:
    """FER2013 rows in memory; see the package docstring for the meaning of each field."""

    images: np.ndarray
    labels: np.ndarray
    usage: np.ndarray
    source: str
    sha256: str
    skipped_rows: int = 0

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            raise ValueError(
                f"FERDataset.images: expected a uint8 numpy array, found "
                f"{type(images).__name__} of dtype {getattr(images, 'dtype', None)}"
            )
        if images.ndim != 4 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE, 1):
            raise ValueError(
                f"FERDataset.images: expected shape (N, 48, 48, 1), found {images.shape}"
            )
        n = images.shape[0]
        labels = np.asarray(self.labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"FERDataset.labels: expected an integer array of shape ({n},), found "
                f"{labels.dtype} {labels.shape}"
            )
        if n and (labels.min() < -1 or labels.max() > len(CLASS_NAMES) - 1):
            raise ValueError(
                f"FERDataset.labels: expected values -1..6, found {labels.min()}..{labels.max()}"
            )
        usage = np.asarray(self.usage).astype(str)
        if usage.shape != (n,):
            raise ValueError(f"FERDataset.usage: expected shape ({n},), found {usage.shape}")
        unknown = sorted(set(np.unique(usage).tolist()) - set(USAGES))
        if unknown:
            raise ValueError(f"FERDataset.usage: expected values in {USAGES}, found {unknown}")
        # Frozen, so normalise through object.__setattr__ (callers may pass int32 labels, lists).
        object.__setattr__(self, "labels", labels.astype(np.int64, copy=False))
        object.__setattr__(self, "usage", usage)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"FERDataset(rows={len(self)}, counts={self.counts()}, source={self.source!r}, "
            f"sha256={self.sha256[:12]}..., skipped_rows={self.skipped_rows})"
        )

    def counts(self) -> dict[str, int]:
        """Rows per usage, every name in USAGES present (0 where the source has none)."""
        return {name: int(np.count_nonzero(self.usage == name)) for name in USAGES}

    def split(self, usage: str) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of the rows of one usage (copies)."""
        if usage not in USAGES:
            raise ValueError(
                f"unknown usage {usage!r}: expected one of {', '.join(USAGES)} "
                f"(rows per usage in {self.source}: {self._available()})"
            )
        mask = self.usage == usage
        if not mask.any():
            raise ValueError(
                f"no {usage!r} rows in {self.source}: available usages {self._available()}"
            )
        return self.images[mask], self.labels[mask]

    def subset(self, fraction: float, seed: int) -> FERDataset:
        """A stratified sample: ``round(fraction * n)`` rows (at least 1) of every non-empty
        (usage, label) group, chosen by ``seed``, in the original row order."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"subset fraction: expected a number in (0, 1], found {fraction!r}")
        if fraction == 1.0:
            return self
        n = len(self)
        codes = _usage_codes(self.usage)
        strata = codes * (len(CLASS_NAMES) + 1) + (self.labels + 1)
        rng = np.random.default_rng(seed)
        # A random permutation, then a stable sort by stratum: each stratum's rows end up
        # contiguous and randomly ordered, so keeping each stratum's first k rows samples it.
        order = rng.permutation(n)
        order = order[np.argsort(strata[order], kind="stable")]
        _, first, sizes = np.unique(strata[order], return_index=True, return_counts=True)
        keep_n = np.maximum(1, np.floor(fraction * sizes + 0.5).astype(np.int64))
        rank = np.arange(n) - np.repeat(first, sizes)
        chosen = np.sort(order[rank < np.repeat(keep_n, sizes)])
        return FERDataset(
            images=self.images[chosen],
            labels=self.labels[chosen],
            usage=self.usage[chosen],
            source=self.source,
            sha256=self.sha256,
            skipped_rows=self.skipped_rows,
        )

    def _available(self) -> str:
        found = {k: v for k, v in self.counts().items() if v}
        return ", ".join(f"{k}={v}" for k, v in found.items()) or "none (empty dataset)"


@dataclass
class _Parsed:
    images: np.ndarray  # uint8 (N, 48, 48, 1)
    labels: np.ndarray  # int64 (N,)
    usage: np.ndarray  # int8 codes into USAGES, _NO_SPLIT where a validation split is due
    skipped_rows: int = 0
    skipped_where: tuple[str, ...] = ()  # the first few bad locations, for the warning
    sha256: str = ""

    @staticmethod
    def concat(parts: Sequence[_Parsed]) -> _Parsed:
        return _Parsed(
            images=np.concatenate([p.images for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            usage=np.concatenate([p.usage for p in parts]),
            skipped_rows=sum(p.skipped_rows for p in parts),
            skipped_where=tuple(w for p in parts for w in p.skipped_where)[:_MAX_REPORTED],
        )


def _usage_codes(usage: np.ndarray) -> np.ndarray:
    codes = np.full(usage.shape, -1, dtype=np.int64)
    for code, name in enumerate(USAGES):
        codes[usage == name] = code
    return codes
