"""The cache of parsed arrays: .npz files keyed by content hash and parse options."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from .dataset import IMAGE_SIDE, _Parsed

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where parsed arrays are cached when no cache_dir is given."""
    env = os.environ.get("FER2013_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fer2013"


class _Cache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def get(self, key: str) -> _Parsed | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                parsed = _Parsed(
                    images=z["images"],
                    labels=z["labels"],
                    usage=z["usage"],
                    skipped_rows=int(z["skipped_rows"]),
                    skipped_where=tuple(z["skipped_where"].tolist()),
                    sha256=str(z["sha256"]),
                )
            n = len(parsed.images)
            if (
                parsed.images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE, 1)
                or parsed.images.dtype != np.uint8
                or parsed.labels.shape != (n,)
                or parsed.usage.shape != (n,)
            ):
                raise ValueError("inconsistent array shapes")
            return parsed
        except Exception as exc:  # noqa: BLE001 - a bad cache entry must only cost a re-parse
            logger.warning("ignoring unreadable cache file %s (%s); re-parsing", path, exc)
            return None

    def put(self, key: str, parsed: _Parsed) -> None:
        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".npz")
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    images=parsed.images,
                    labels=parsed.labels,
                    usage=parsed.usage,
                    skipped_rows=np.int64(parsed.skipped_rows),
                    skipped_where=np.array(parsed.skipped_where, dtype=str),
                    sha256=np.array(parsed.sha256),
                )
            os.replace(tmp, self._path(key))  # atomic: readers see the old entry or the new
            tmp = None
        except OSError as exc:
            logger.warning("could not write FER2013 cache in %s: %s", self.root, exc)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
