"""load_fer2013: plan, cache look-up, parse (_parse_plan) and the validation split."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from .cache import _Cache, default_cache_dir
from .csv_parser import _parse_csv
from .dataset import _NO_SPLIT, _PUBLIC, _TRAINING, CLASS_NAMES, USAGES, FERDataset, _Parsed
from .folders import _parse_image_folder
from .sources import _content_sha256, _LocalOrigin, _Origin, _Plan, _S3Origin

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1  # bump when the parse result for the same bytes changes


def load_fer2013(
    source: str | os.PathLike[str],
    *,
    resize: bool = False,
    skip_bad_rows: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    val_fraction: float = 0.1,
    seed: int = 2017,
) -> FERDataset:
    """Load FER2013 from a file, a directory or an ``s3://`` URI (formats: package docstring).

    Args:
        source: path to a CSV (``.gz`` allowed) or a directory, or ``s3://bucket/key`` /
            ``s3://bucket/prefix/``.
        resize: resize images that are not 48x48 (image folders) instead of raising.
        skip_bad_rows: skip bad rows / images, count them in ``skipped_rows`` and log a warning
            naming the first few, instead of raising ``DataError``.
        cache_dir: cache folder (default ``$FER2013_CACHE_DIR`` or ``~/.cache/fer2013``).
        use_cache: read and write the parsed-array cache.
        val_fraction: where the source has no split (``train.csv``; image folders with neither
            ``Training_``/``PublicTest_``/``PrivateTest_`` names nor a test/ folder), this share
            of each class's labelled rows becomes ``PublicTest`` and the rest ``Training``:
            ``round(val_fraction * n)`` rows per class, at least 1 and at most n-1 for a class
            of n >= 2 rows (none for a single-row class or val_fraction 0), chosen with ``seed``.
            Sources with a Usage column or named files keep their own split.
        seed: seed of that validation split.

    Raises:
        DataError: bad input, naming the file, the 1-based line (header = line 1) or image, and
            what was expected and found. Nothing is returned or cached in that case.
        ValueError: ``val_fraction`` outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a number in [0, 1), found {val_fraction!r}")
    text = os.fspath(source)
    origin: _Origin = _S3Origin(text) if text.startswith("s3://") else _LocalOrigin(text)
    plan = origin.plan()
    cache = _Cache(Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    options = f"v{_CACHE_VERSION}|{plan.signature}|resize={resize}|skip={skip_bad_rows}"

    def content_key(sha: str) -> str:
        return f"{sha}-{_digest(options)[:16]}"

    quick = origin.quick_key(plan) if use_cache else None
    quick_key = f"s3-{_digest(quick + options)}" if quick is not None else None
    if quick_key is not None:
        hit = cache.get(quick_key)
        if hit is not None:
            return _finish(hit, origin.display, val_fraction, seed)
    elif use_cache:
        hit = cache.get(content_key(origin.sha256(plan)))
        if hit is not None:
            return _finish(hit, origin.display, val_fraction, seed)

    contents = origin.read(plan)
    sha = _content_sha256(plan, contents)  # of the bytes parsed, should the file just change
    if quick_key is not None:
        hit = cache.get(content_key(sha))  # the same bytes, cached from another source
        if hit is not None:
            cache.put(quick_key, hit)
            return _finish(hit, origin.display, val_fraction, seed)

    parsed = _parse_plan(plan, contents, origin, resize=resize, skip_bad_rows=skip_bad_rows)
    parsed.sha256 = sha
    if use_cache:
        cache.put(quick_key or content_key(sha), parsed)
    return _finish(parsed, origin.display, val_fraction, seed)


def _finish(parsed: _Parsed, display: str, val_fraction: float, seed: int) -> FERDataset:
    if parsed.skipped_rows:
        logger.warning(
            "%s: skipped %d bad row(s)/image(s); first at: %s",
            display,
            parsed.skipped_rows,
            ", ".join(parsed.skipped_where),
        )
    codes = _assign_validation(parsed.usage, parsed.labels, val_fraction, seed)
    return FERDataset(
        images=parsed.images,
        labels=parsed.labels,
        usage=np.asarray(USAGES)[codes],
        source=display,
        sha256=parsed.sha256,
        skipped_rows=parsed.skipped_rows,
    )


def _assign_validation(
    codes: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int
) -> np.ndarray:
    """Replace _NO_SPLIT codes by a stratified, seeded Training/PublicTest split."""
    pending = codes == _NO_SPLIT
    if not pending.any():
        return codes
    assert (labels[pending] >= 0).all(), "rows without a split must be labelled"
    out = codes.copy()
    out[pending] = _TRAINING
    if val_fraction == 0.0:
        return out
    rng = np.random.default_rng(seed)
    for label in range(len(CLASS_NAMES)):
        rows = np.flatnonzero(pending & (labels == label))
        if len(rows) < 2:
            continue
        n_val = min(len(rows) - 1, max(1, int(np.floor(val_fraction * len(rows) + 0.5))))
        out[rng.choice(rows, size=n_val, replace=False)] = _PUBLIC
    return out


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _parse_plan(
    plan: _Plan, contents: dict[str, bytes], origin: _Origin, *, resize: bool, skip_bad_rows: bool
) -> _Parsed:
    if plan.kind == "images":
        return _parse_image_folder(plan.files, contents, origin, resize, skip_bad_rows)
    parts = [
        _parse_csv(contents[rel], origin.name(rel), role, skip_bad_rows)
        for rel, role in zip(plan.files, plan.roles, strict=True)
    ]
    return parts[0] if len(parts) == 1 else _Parsed.concat(parts)
