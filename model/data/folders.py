"""The image-folder layout: train|test/<class>/*.png|jpg to parse results."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np

from .dataset import (
    _MAX_REPORTED,
    _NO_SPLIT,
    _PUBLIC,
    _TRAINING,
    CLASS_NAMES,
    IMAGE_SIDE,
    USAGES,
    DataError,
    _Parsed,
)
from .sources import _Origin

_USAGE_NAME = re.compile(r"(Training|PublicTest|PrivateTest)_(\d*)")


def _parse_image_folder(
    rels: Sequence[str],
    contents: dict[str, bytes],
    origin: _Origin,
    resize: bool,
    skip_bad_rows: bool,
) -> _Parsed:
    from PIL import Image  # lazily: CSV users never need Pillow

    class_index = {c.lower(): i for i, c in enumerate(CLASS_NAMES)}
    entries = []
    has_split = False
    for rel in rels:
        parts = rel.split("/")
        split = parts[0].lower() if len(parts) == 3 else "train"
        stem = parts[-1].rsplit(".", 1)[0]
        named = _USAGE_NAME.match(stem)
        if named:
            code = USAGES.index(named.group(1))
            ident = int(named.group(2)) if named.group(2) else -1
        else:
            code = _PUBLIC if split == "test" else _TRAINING
            ident = -1
        has_split = has_split or bool(named) or split == "test"
        entries.append((code, ident < 0, ident, rel, class_index[parts[-2].lower()]))
    entries.sort()

    images = np.empty((len(entries), IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    ok = np.zeros(len(entries), dtype=bool)
    bad: list[str] = []
    for i, (*_, rel, _label) in enumerate(entries):
        where = origin.name(rel)
        try:
            with Image.open(io.BytesIO(contents[rel])) as im:
                im.load()
                if im.size != (IMAGE_SIDE, IMAGE_SIDE) and not resize:
                    raise DataError(
                        f"{where}: image is {im.size[0]}x{im.size[1]} pixels, expected 48x48 "
                        f"(pass resize=True to resize)"
                    )
                grey = im.convert("L")
                if grey.size != (IMAGE_SIDE, IMAGE_SIDE):
                    grey = grey.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR)
                images[i] = np.asarray(grey, dtype=np.uint8)
                ok[i] = True
        except DataError:
            if not skip_bad_rows:
                raise
            bad.append(where)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            if not skip_bad_rows:
                raise DataError(
                    f"{where}: unreadable image: expected a PNG or JPEG, found {exc}"
                ) from exc
            bad.append(where)
    if not ok.any():
        raise DataError(f"{origin.display}: no readable images (first bad: {', '.join(bad[:3])})")
    codes = np.array([e[0] for e in entries], dtype=np.int8)
    if not has_split:
        codes[:] = _NO_SPLIT
    labels = np.array([e[4] for e in entries], dtype=np.int64)
    return _Parsed(
        images=images[ok][..., None],
        labels=labels[ok],
        usage=codes[ok],
        skipped_rows=len(bad),
        skipped_where=tuple(bad[:_MAX_REPORTED]),
    )
