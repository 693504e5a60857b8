"""The report's figures, named once: the key the report finds each by and its file under
figures/. viz/stages.py writes them through these names and viz/sections.py reads them."""

from __future__ import annotations

import re
from enum import Enum

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def safe_name(name: str) -> str:
    """A layer name usable in a file name (Keras allows '/' in names)."""
    return _UNSAFE.sub("_", name)


class FigureKind(Enum):
    """A kind of figure; the per-layer ones (filters, feature maps) exist once per layer."""

    LEARNING_CURVES = "learning_curves"
    CONFUSION_MATRIX = "confusion_matrix"
    SALIENCY = "saliency"
    SALIENCY_SANITY = "saliency_sanity"
    FILTERS = "filters"
    FEATURE_MAPS = "feature_maps"

    @property
    def per_layer(self) -> bool:
        return self in (FigureKind.FILTERS, FigureKind.FEATURE_MAPS)

    def key(self, layer: str = "") -> str:
        """The key in `ReportFacts.figures` (a per-layer figure's names its layer)."""
        self._check(layer)
        return f"{self.value}:{layer}" if layer else self.value

    def file_name(self, layer: str = "") -> str:
        """The PNG's name under figures/."""
        self._check(layer)
        return f"{self.value}_{safe_name(layer)}.png" if layer else f"{self.value}.png"

    def _check(self, layer: str) -> None:
        if self.per_layer != bool(layer):
            expected = "a layer name" if self.per_layer else "no layer"
            raise ValueError(f"figure {self.value}: expected {expected}, got layer {layer!r}")
