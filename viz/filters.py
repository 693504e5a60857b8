"""What conv filters respond to: gradient-ascent images and feature maps of one input.

Gradient ascent uses tf-keras-vis ActivationMaximization on a sub-model that ends at each
filter's activation (the conv layer, or the batch norm / activation layers right after it).
All selected filters of all selected layers go in ONE batched call: image i maximises the mean
of its own filter's map, and since images do not interact the batch is independent ascents.
tf-keras-vis runs eagerly, so its per-step overhead, not the arithmetic, dominates on a CPU;
one call for everything pays it once.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from viz.plotting import grid_figure, save_figure, side_colourbar
from viz.runs import VizError
from viz.saliency import conv_layer_names, quiet_keras

log = logging.getLogger("viz")

# Starting images: mid-grey plus uniform noise, in the model's raw 0..255 pixel range.
NOISE_LOW, NOISE_HIGH = 96.0, 160.0


@dataclass
class FilterAscent:
    """Result of gradient ascent for k filters of one conv layer."""

    layer: str  # the conv layer
    activation_layer: str  # where its activation was measured (layer itself or what follows)
    filters: list[int]
    images: np.ndarray  # float32 (k, 48, 48, 1) in 0..255
    start_activation: np.ndarray  # (k,) mean activation on the starting noise
    final_activation: np.ndarray  # (k,) mean activation on the optimised image
    steps: int


def select_layers(model: Any, requested: list[str]) -> list[str]:
    """The conv layers to show: all of them when `requested` is empty, else those named."""
    available = conv_layer_names(model)
    if not requested:
        return available
    unknown = [name for name in requested if name not in available]
    if unknown:
        choices = available or "(none: the model has no conv layer)"
        raise VizError(f"layers: expected conv layer names from {choices}, found {unknown}")
    return list(dict.fromkeys(requested))


def filter_count(model: Any, layer: str) -> int:
    """Channels of a conv layer's output."""
    return int(model.get_layer(layer).output.shape[-1])


def activation_layer(model: Any, conv: str) -> str:
    """The layer whose output is `conv`'s activation: conv itself, or the last of the batch
    norm / activation layers that directly follow it (Conv2D -> BatchNorm -> ReLU).

    Maximising a conv's linear output is degenerate for the first layer (a linear objective is
    maximised by a flat saturated image), so filters are judged after their non-linearity.
    """
    import keras

    follow = (
        keras.layers.BatchNormalization,
        keras.layers.Activation,
        keras.layers.ReLU,
        keras.layers.LeakyReLU,
        keras.layers.ELU,
        keras.layers.PReLU,
    )
    current = model.get_layer(conv)
    while True:
        consumers = [
            layer
            for layer in model.layers
            if layer is not current and _single_input(layer) is current.output
        ]
        if len(consumers) != 1 or not isinstance(consumers[0], follow):
            return current.name
        current = consumers[0]


def _single_input(layer: Any) -> Any:
    try:
        value = layer.input
    except (AttributeError, ValueError):  # InputLayer, or a layer used more than once
        return None
    return value if not isinstance(value, list | tuple) else None


def activation_model(model: Any, layer: str) -> Any:
    """Sub-model from the raw-pixel input to `layer`'s output."""
    import keras

    return keras.Model(model.inputs, model.get_layer(layer).output)


def filter_means(sub_model: Any, images: np.ndarray, filters: list[int]) -> np.ndarray:
    """Mean activation of filter filters[i] on image i."""
    with quiet_keras():
        maps = np.asarray(sub_model(np.asarray(images, dtype=np.float32), training=False))
    return np.array([maps[i, ..., f].mean() for i, f in enumerate(filters)], dtype=np.float64)


class _ExtractOutputs:
    """tf-keras-vis model modifier: the model's input -> the given layers' outputs, run as one
    compiled graph.

    tf-keras-vis calls the model eagerly every step, and an eager Keras call pays Python
    overhead per layer, forward and backward; wrapping the sub-model in a `tf.function` makes
    each step one graph call (about 2x faster ascent on a 2-core CPU, same images).
    """

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def __call__(self, model: Any) -> Any:
        import keras

        sub_model = keras.Model(model.inputs, [model.get_layer(n).output for n in self.names])
        inputs = keras.Input(model.inputs[0].shape[1:], dtype=model.inputs[0].dtype)
        return keras.Model(inputs, _compiled_outputs_class()(sub_model)(inputs))


def _compiled_outputs_class() -> type:
    """Defined lazily: importing keras at module import would slow every viz CLI start."""
    import keras
    import tensorflow as tf

    class CompiledOutputs(keras.layers.Layer):
        """Calls a (multi-output) Keras model through `tf.function`, in inference mode."""

        def __init__(self, sub_model: Any, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.sub_model = sub_model
            self.compiled = tf.function(
                lambda images: sub_model(images, training=False), reduce_retracing=True
            )

        def call(self, images: Any) -> Any:
            return self.compiled(images)

        def compute_output_spec(self, images: Any) -> Any:
            return [keras.KerasTensor(o.shape, o.dtype) for o in self.sub_model.outputs]

    return CompiledOutputs


class _BlockScore:
    """tf-keras-vis score for one output: images offset..offset+k-1 each score one filter's
    mean activation / `scale`; every other image scores 0 on this output.

    Dividing by the layer's typical activation makes the score dimensionless, so one set of
    regulariser weights suits layers and models whose activations differ by orders of magnitude.
    Vectorised (channel means times a one-hot mask): tf-keras-vis runs eagerly, and a Python
    loop of per-image slices cost ~60 eager ops per output per step, most of the ascent's time.
    """

    def __init__(self, offset: int, filters: list[int], scale: float, batch: int) -> None:
        self.offset, self.filters, self.scale, self.batch = offset, filters, scale, batch
        self._mask: Any = None

    def __call__(self, output: Any) -> Any:
        import tensorflow as tf

        if self._mask is None:
            mask = np.zeros((self.batch, int(output.shape[-1])), dtype=np.float32)
            for i, f in enumerate(self.filters):
                mask[self.offset + i, f] = 1.0 / self.scale
            self._mask = tf.constant(mask, dtype=output.dtype)
        channel_means = tf.reduce_mean(output, axis=(1, 2))  # (batch, channels)
        return tf.reduce_sum(channel_means * self._mask, axis=1)


class _StepLogger:
    """tf-keras-vis callback: a progress line every quarter of the ascent (it is the slow part)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.every = max(1, steps // 4)
        self.start = time.perf_counter()

    def on_begin(self, **kwargs: Any) -> None:
        self.start = time.perf_counter()

    def __call__(self, i: int, *args: Any, **kwargs: Any) -> None:
        done = i + 1
        if done % self.every == 0 and done < self.steps:
            elapsed = time.perf_counter() - self.start
            log.info("gradient ascent: step %d/%d, %.1f s", done, self.steps, elapsed)

    def on_end(self) -> None:
        pass


def maximize_layers(
    model: Any,
    selection: dict[str, list[int]],
    steps: int = 100,
    learning_rate: float = 4.0,
    jitter: int = 2,
    tv_weight: float = 0.5,
    l2_weight: float = 0.05,
    seed: int = 2017,
) -> dict[str, FilterAscent]:
    """Images maximising each selected filter's mean activation: ONE batched ascent.

    selection: conv layer -> filter indices. Every (layer, filter) gets its own image in one
    batch through a multi-output sub-model; image i's score reads only its own filter, so the
    batch is independent ascents, and the per-step overhead is paid once for all layers.
    """
    _check_selection(model, selection)
    layers = list(selection)
    targets = [activation_layer(model, layer) for layer in layers]
    offsets = np.cumsum([0] + [len(selection[layer]) for layer in layers]).tolist()
    batch = offsets[-1]
    rng = np.random.default_rng(seed)
    seed_images = rng.uniform(NOISE_LOW, NOISE_HIGH, (batch, 48, 48, 1)).astype(np.float32)

    probe = _ExtractOutputs(targets)(model)

    def block_means(images: np.ndarray) -> list[np.ndarray]:
        with quiet_keras():
            outputs = probe(np.asarray(images, dtype=np.float32), training=False)
        outputs = [np.asarray(o) for o in (outputs if isinstance(outputs, list) else [outputs])]
        return [
            np.array(
                [out[offsets[b] + i, ..., f].mean() for i, f in enumerate(selection[layer])],
                dtype=np.float64,
            )
            for b, (layer, out) in enumerate(zip(layers, outputs, strict=True))
        ], outputs

    start, start_outputs = block_means(seed_images)
    scores = []
    for b, layer in enumerate(layers):
        typical = float(np.mean(np.abs(start_outputs[b])))
        scale = typical if typical > 1e-6 else 1.0  # a dead layer: any positive scale will do
        scores.append(_BlockScore(offsets[b], selection[layer], scale, batch))

    np.random.seed(seed)  # Jitter draws its shifts from numpy's global generator
    result = _ascend(
        model, targets, scores, seed_images, steps, learning_rate, jitter, tv_weight, l2_weight
    )
    images = np.asarray(result, dtype=np.float32).reshape(batch, 48, 48, 1)
    final, _ = block_means(images)
    return {
        layer: FilterAscent(
            layer=layer,
            activation_layer=targets[b],
            filters=list(selection[layer]),
            images=images[offsets[b] : offsets[b + 1]],
            start_activation=start[b],
            final_activation=final[b],
            steps=steps,
        )
        for b, layer in enumerate(layers)
    }


def _check_selection(model: Any, selection: dict[str, list[int]]) -> None:
    if not selection:
        raise ValueError("selection: expected at least one conv layer, found none")
    for layer, filters in selection.items():
        channels = filter_count(model, layer)
        if not filters or any(not 0 <= f < channels for f in filters):
            raise ValueError(
                f"filters: expected indices in 0..{channels - 1} of layer {layer!r}, "
                f"found {filters}"
            )


def _ascend(
    model: Any,
    targets: list[str],
    scores: list[Any],
    seed_images: np.ndarray,
    steps: int,
    learning_rate: float,
    jitter: int,
    tv_weight: float,
    l2_weight: float,
) -> Any:
    """tf-keras-vis's activation maximisation of `scores` from `seed_images`."""
    import keras
    from tf_keras_vis.activation_maximization import ActivationMaximization
    from tf_keras_vis.activation_maximization.input_modifiers import Jitter
    from tf_keras_vis.activation_maximization.regularizers import Norm, TotalVariation2D

    ascent = ActivationMaximization(model, model_modifier=_ExtractOutputs(targets))
    with quiet_keras():
        return ascent(
            scores,
            seed_input=seed_images,
            input_range=(0.0, 255.0),
            input_modifiers=[Jitter(jitter=jitter)] if jitter > 0 else [],
            # Weights are per unit of normalised pixel (0..1); both regularisers are linear in
            # the pixel values, so dividing by 255 converts them to the raw 0..255 input.
            regularizers=[
                TotalVariation2D(weight=tv_weight / 255.0),
                Norm(weight=l2_weight / 255.0, p=2),
            ],
            steps=steps,
            optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
            callbacks=[_StepLogger(steps)],
        )


def maximize_filters(model: Any, layer: str, filters: list[int], **kwargs: Any) -> FilterAscent:
    """`maximize_layers` for one layer (same keyword arguments)."""
    return maximize_layers(model, {layer: filters}, **kwargs)[layer]


def feature_maps(model: Any, layer: str, image: np.ndarray, filters: list[int]) -> np.ndarray:
    """Activation maps of a conv layer's chosen filters for one image: (h, w, k)."""
    image = np.asarray(image, dtype=np.float32).reshape(1, 48, 48, 1)
    sub_model = activation_model(model, activation_layer(model, layer))
    with quiet_keras():
        maps = np.asarray(sub_model(image, training=False))[0]
    return maps[..., filters]


def _grid(count: int, max_cols: int = 8) -> tuple[int, int]:
    cols = min(max_cols, count)
    return math.ceil(count / cols), cols


def plot_filter_ascent(result: FilterAscent, path: str | Path, title: str) -> Path:
    """One tile per filter, titled with its final (and starting) mean activation."""
    count = len(result.filters)
    rows, cols = _grid(count)
    fig, axes = grid_figure(rows, cols, (1.7, 1.7), (0.2, 1.1, 1.0, 0.15), (0.25, 0.5))
    for ax in axes.ravel():
        _bare(ax, visible=False)
    for i, f in enumerate(result.filters):
        ax = axes.ravel()[i]
        _bare(ax, visible=True)
        ax.imshow(result.images[i].squeeze(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(
            f"filter {f}\nact {result.final_activation[i]:.3g} "
            f"(start {result.start_activation[i]:.2g})",
            fontsize=8,
        )
    fig.suptitle(f"{title}\n{result.steps} steps of gradient ascent from grey noise", fontsize=11)
    side_colourbar(fig, ScalarMappable(Normalize(0, 255), "gray"), "pixel value", 1.1)
    return save_figure(fig, path)


def plot_feature_maps(
    image: np.ndarray,
    maps: np.ndarray,
    filters: list[int],
    path: str | Path,
    title: str,
    caption: str = "",
) -> Path:
    """The input image, then each filter's map on one shared colour scale."""
    count = len(filters)
    rows, cols = _grid(count + 1, max_cols=9)  # the input plus 8 filters on one row
    fig, axes = grid_figure(rows, cols, (1.7, 1.7), (0.2, 1.1, 1.0, 0.15), (0.25, 0.5))
    flat = axes.ravel()
    for i, ax in enumerate(flat):
        _bare(ax, visible=i <= count)
    flat[0].imshow(np.asarray(image).squeeze(), cmap="gray", vmin=0, vmax=255)
    flat[0].set_title(f"input\n{caption}" if caption else "input", fontsize=8)
    low, high = float(maps.min()), float(maps.max())
    if high <= low:
        high = low + 1e-6
    for i, f in enumerate(filters):
        ax = flat[i + 1]
        ax.imshow(maps[..., i], cmap="viridis", vmin=low, vmax=high)
        ax.set_title(f"filter {f}\nmean {maps[..., i].mean():.3g}", fontsize=8)
    fig.suptitle(f"{title} — maps {maps.shape[0]}×{maps.shape[1]}", fontsize=11)
    side_colourbar(fig, ScalarMappable(Normalize(low, high), "viridis"), "activation", 1.1)
    return save_figure(fig, path)


def _bare(ax: Any, visible: bool) -> None:
    """No ticks; a thin frame on used tiles (an all-white ascent image stays visible)."""
    ax.set_xticks([])
    ax.set_yticks([])
    if not visible:
        ax.set_axis_off()
