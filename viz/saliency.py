"""Vanilla gradient, SmoothGrad and Grad-CAM maps, and the model-randomisation sanity check.

Maps explain the class the model predicted (for a wrong prediction: why it chose the wrong
class). The softmax is replaced by a linear output (tf-keras-vis ReplaceToLinear) so gradients
follow the class score rather than a saturated probability.

Sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"): a saliency method that
explains the model must change when the model's weights are re-initialised. We compare maps of
the trained model with those of a clone with freshly initialised weights by Spearman rank
correlation; a high correlation means the map mostly reflects the input (edges), not the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from scipy.stats import spearmanr

from viz.plotting import grid_figure, save_figure, side_colourbar

OVERLAY_CMAP = "jet"
OVERLAY_ALPHA = 0.5


@dataclass(frozen=True)
class Example:
    """One image of the split, its truth and the model's prediction."""

    index: int
    true: int
    predicted: int
    confidence: float  # probability of the predicted class

    @property
    def correct(self) -> bool:
        return self.true == self.predicted


@dataclass
class SaliencyMaps:
    """Maps for a batch of images, each (k, 48, 48) normalised to [0, 1] per image."""

    vanilla: np.ndarray
    smoothgrad: np.ndarray
    gradcam: np.ndarray | None
    gradcam_layer: str | None


@dataclass
class SanityCheck:
    """Spearman rho between trained-model and randomised-model maps, per image and method."""

    rho: dict[str, np.ndarray]  # method -> (k,) correlations
    threshold: float
    randomised_maps: dict[str, np.ndarray] = field(default_factory=dict)

    def mean(self, method: str) -> float:
        values = self.rho[method]
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    def warnings(self) -> list[str]:
        """One line per method whose mean correlation exceeds the threshold."""
        return [
            f"{method}: mean Spearman rho {self.mean(method):.2f} > {self.threshold:.2f} "
            f"between trained and randomised weights: these maps depend little on what the "
            f"model learnt"
            for method in self.rho
            if self.mean(method) > self.threshold
        ]


# ---------------------------------------------------------------- choosing examples


def pick_examples(
    labels: np.ndarray, probabilities: np.ndarray, num_classes: int
) -> list[tuple[Example | None, Example | None]]:
    """Per class: the most confident correct and the most confident wrong prediction.

    Either is None where the split has no such image.
    """
    labels = np.asarray(labels)
    if probabilities.shape != (labels.shape[0], num_classes):
        raise ValueError(
            f"probabilities: expected shape ({labels.shape[0]}, {num_classes}), "
            f"found {probabilities.shape}"
        )
    predictions = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    chosen = []
    for cls in range(num_classes):
        pair: list[Example | None] = []
        for want_correct in (True, False):
            mask = (labels == cls) & ((predictions == cls) == want_correct)
            if not mask.any():
                pair.append(None)
                continue
            candidates = np.flatnonzero(mask)
            best = int(candidates[np.argmax(confidence[candidates])])
            pair.append(Example(best, cls, int(predictions[best]), float(confidence[best])))
        chosen.append((pair[0], pair[1]))
    return chosen


# ---------------------------------------------------------------- maps


def conv_layer_names(model: Any) -> list[str]:
    """Names of the 2-D convolution layers (spatial feature maps), in model order."""
    import keras

    kinds = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)
    return [layer.name for layer in model.layers if isinstance(layer, kinds)]


def last_conv_layer(model: Any) -> str | None:
    """The layer Grad-CAM reads; None for a model without convolutions (DNN)."""
    names = conv_layer_names(model)
    return names[-1] if names else None


@contextmanager
def quiet_keras() -> Iterator[None]:
    # tf-keras-vis passes inputs as a list; Keras 3 warns that the structure differs from the
    # model's single named input, once per call. Harmless, and it floods the progress log.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*structure of `inputs`.*")
        warnings.filterwarnings("ignore", message=".*Expected: .*Received: inputs.*")
        yield


def _as_batch(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (48, 48, 1):
        raise ValueError(f"images: expected shape (k, 48, 48, 1), found {images.shape}")
    return images.astype(np.float32)


def gradient_maps(
    model: Any,
    images: np.ndarray,
    targets: list[int],
    smooth_samples: int,
    smooth_noise: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(vanilla, SmoothGrad) |d score / d pixel| maps, (k, 48, 48) each."""
    from tf_keras_vis.saliency import Saliency
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import CategoricalScore

    batch = _as_batch(images)
    if len(targets) != batch.shape[0]:
        raise ValueError(f"targets: expected {batch.shape[0]} classes, found {len(targets)}")
    saliency = Saliency(model, model_modifier=ReplaceToLinear(), clone=True)
    score = CategoricalScore(list(targets))
    with quiet_keras():
        vanilla = np.asarray(saliency(score, batch))
        # SmoothGrad draws its noise from numpy's global generator.
        np.random.seed(seed)
        smooth = np.asarray(
            saliency(score, batch, smooth_samples=smooth_samples, smooth_noise=smooth_noise)
        )
    return vanilla.reshape(batch.shape[:3]), smooth.reshape(batch.shape[:3])


def gradcam_maps(model: Any, images: np.ndarray, targets: list[int], layer: str) -> np.ndarray:
    """Grad-CAM at `layer`, upsampled to the input: (k, 48, 48)."""
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import CategoricalScore

    batch = _as_batch(images)
    gradcam = Gradcam(model, model_modifier=ReplaceToLinear(), clone=True)
    with quiet_keras():
        cam = gradcam(CategoricalScore(list(targets)), batch, penultimate_layer=layer)
    return np.asarray(cam).reshape(batch.shape[:3])


def compute_saliency(
    model: Any,
    images: np.ndarray,
    targets: list[int],
    smooth_samples: int = 20,
    smooth_noise: float = 0.2,
    seed: int = 2017,
) -> SaliencyMaps:
    """All three maps; Grad-CAM is None for a model without conv layers."""
    vanilla, smooth = gradient_maps(model, images, targets, smooth_samples, smooth_noise, seed)
    layer = last_conv_layer(model)
    cam = gradcam_maps(model, images, targets, layer) if layer is not None else None
    return SaliencyMaps(vanilla=vanilla, smoothgrad=smooth, gradcam=cam, gradcam_layer=layer)


def randomised_copy(model: Any, seed: int) -> Any:
    """Same architecture, freshly initialised weights (Adebayo et al.'s full randomisation)."""
    import keras

    keras.utils.set_random_seed(seed)
    clone = keras.models.clone_model(model)
    # clone_model builds new layers, so every weight comes from its initialiser, not a copy.
    assert not all(
        np.array_equal(a, b) for a, b in zip(model.get_weights(), clone.get_weights(), strict=True)
    ), "clone_model copied the trained weights"
    return clone


def spearman_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each pair of maps; NaN where a map is constant."""
    if a.shape != b.shape:
        raise ValueError(f"maps: expected equal shapes, found {a.shape} and {b.shape}")
    out = np.full(a.shape[0], np.nan)
    for i in range(a.shape[0]):
        x, y = a[i].ravel(), b[i].ravel()
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            out[i] = float(spearmanr(x, y).statistic)
    return out


def sanity_check(
    model: Any,
    images: np.ndarray,
    targets: list[int],
    trained: SaliencyMaps,
    smooth_samples: int,
    smooth_noise: float,
    seed: int,
    threshold: float,
) -> SanityCheck:
    """Correlate trained-model maps with maps of a re-initialised clone, same images/targets."""
    random_model = randomised_copy(model, seed)
    vanilla, smooth = gradient_maps(
        random_model, images, targets, smooth_samples, smooth_noise, seed
    )
    rho = {
        "vanilla": spearman_per_image(trained.vanilla, vanilla),
        "SmoothGrad": spearman_per_image(trained.smoothgrad, smooth),
    }
    maps = {"vanilla": vanilla, "SmoothGrad": smooth}
    if trained.gradcam is not None and trained.gradcam_layer is not None:
        cam = gradcam_maps(random_model, images, targets, trained.gradcam_layer)
        rho["Grad-CAM"] = spearman_per_image(trained.gradcam, cam)
        maps["Grad-CAM"] = cam
    return SanityCheck(rho=rho, threshold=threshold, randomised_maps=maps)


# ---------------------------------------------------------------- figures


def _overlay(ax: Any, image: np.ndarray, heat: np.ndarray | None) -> None:
    ax.imshow(image.squeeze(), cmap="gray", vmin=0, vmax=255)
    if heat is not None:
        ax.imshow(heat, cmap=OVERLAY_CMAP, alpha=OVERLAY_ALPHA, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def _blank(ax: Any, text: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.text(
        0.5,
        0.5,
        text,
        ha="center",
        va="center",
        fontsize=8,
        color="0.4",
        transform=ax.transAxes,
        wrap=True,
    )


def plot_saliency(
    images: np.ndarray,
    examples: list[tuple[Example | None, Example | None]],
    maps: SaliencyMaps,
    class_names: list[str],
    path: str | Path,
    title: str,
) -> Path:
    """Rows: classes; columns: correct example (input + maps), then wrong example.

    `images` and the maps are indexed in the order examples appear (correct before wrong,
    class by class, missing ones skipped): see `example_batch`.
    """
    methods: list[tuple[str, np.ndarray | None]] = [
        ("vanilla gradient", maps.vanilla),
        ("SmoothGrad", maps.smoothgrad),
    ]
    if maps.gradcam is not None:
        methods.append((f"Grad-CAM ({maps.gradcam_layer})", maps.gradcam))
    per_side = 1 + len(methods)
    rows = len(examples)
    fig, axes = grid_figure(rows, 2 * per_side, (1.6, 1.6), (0.45, 1.1, 1.0, 0.15))
    position = 0
    for row, pair in enumerate(examples):
        for side, example in enumerate(pair):
            cols = axes[row, side * per_side : (side + 1) * per_side]
            if example is None:
                kind = "correctly" if side == 0 else "wrongly"
                _blank(cols[0], f"no {kind}\nclassified\n{class_names[row]}")
                for ax in cols[1:]:
                    _blank(ax, "")
                continue
            image = images[position]
            if example.correct:
                caption = f"✓ {class_names[example.true]} p={example.confidence:.2f}"
            else:
                caption = f"✗ as {class_names[example.predicted]} p={example.confidence:.2f}"
            _overlay(cols[0], image, None)
            cols[0].set_title(caption, fontsize=8, color="green" if example.correct else "red")
            for ax, (_, values) in zip(cols[1:], methods, strict=True):
                _overlay(ax, image, None if values is None else values[position])
            position += 1
        axes[row, 0].set_ylabel(class_names[row], fontsize=10, rotation=90)
        axes[row, 0].yaxis.label.set_visible(True)
    for side, heading in enumerate(("correct", "wrong")):
        for offset, name in enumerate(["input"] + [name for name, _ in methods]):
            ax = axes[0, side * per_side + offset]
            current = ax.get_title()
            label = f"{heading}: {name}" if offset == 0 else name
            ax.set_title(f"{label}\n{current}" if current else label, fontsize=8)
    note = "" if maps.gradcam is not None else " — Grad-CAM skipped: the model has no conv layer"
    fig.suptitle(f"{title}{note}", fontsize=12)
    side_colourbar(
        fig, ScalarMappable(Normalize(0, 1), OVERLAY_CMAP), "saliency (normalised per image)", 1.1
    )
    return save_figure(fig, path)


def plot_sanity(
    images: np.ndarray,
    trained: SaliencyMaps,
    check: SanityCheck,
    path: str | Path,
    title: str,
    max_images: int = 4,
) -> Path:
    """Trained vs randomised maps side by side for a few images, rho in each title."""
    methods = list(check.rho)
    trained_maps = {"vanilla": trained.vanilla, "SmoothGrad": trained.smoothgrad}
    if trained.gradcam is not None:
        trained_maps["Grad-CAM"] = trained.gradcam
    count = min(max_images, images.shape[0])
    cols = 1 + 2 * len(methods)
    fig, axes = grid_figure(count, cols, (1.6, 1.6), (0.15, 1.1, 1.0, 0.15))
    for row in range(count):
        _overlay(axes[row, 0], images[row], None)
        for m, method in enumerate(methods):
            rho = check.rho[method][row]
            _overlay(axes[row, 1 + 2 * m], images[row], trained_maps[method][row])
            _overlay(axes[row, 2 + 2 * m], images[row], check.randomised_maps[method][row])
            axes[row, 1 + 2 * m].set_title(f"{method}\ntrained", fontsize=8)
            axes[row, 2 + 2 * m].set_title(f"{method}\nrandomised, ρ={rho:.2f}", fontsize=8)
        axes[row, 0].set_title("input", fontsize=8)
    means = ", ".join(f"{m} ρ̄={check.mean(m):.2f}" for m in methods)
    fig.suptitle(f"{title}\nmean Spearman ρ trained vs randomised: {means}", fontsize=11)
    side_colourbar(fig, ScalarMappable(Normalize(0, 1), OVERLAY_CMAP), "saliency (normalised)", 1.1)
    return save_figure(fig, path)


def example_batch(
    images: np.ndarray, examples: list[tuple[Example | None, Example | None]]
) -> tuple[np.ndarray, list[Example]]:
    """The chosen examples' images in plotting order, and the examples themselves."""
    flat = [e for pair in examples for e in pair if e is not None]
    if not flat:
        raise ValueError("examples: expected at least one example, found none")
    return images[[e.index for e in flat]], flat
