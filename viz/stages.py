"""The stages of `run_viz` that compute: predictions, confusion matrix, learning curves,
saliency with its sanity check, gradient ascent and feature maps, held-out accuracy.

Each writes its figures through `Figures` and returns what the report states.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.tracking import MlflowClient

from viz import confusion, curves, filters, saliency
from viz.blocks import FIGURES_DIR
from viz.facts import HELD_OUT_USAGE, FilterSummary, HeldOut
from viz.figure_names import FigureKind
from viz.runs import NUM_CLASSES, SplitData, VizError, rebuild_split
from viz.settings import VizSettings
from viz.subject import Subject

log = logging.getLogger("viz")


@dataclass
class Figures:
    """The figure files written so far: key the report finds them by -> name under figures/."""

    directory: Path
    names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def under(cls, root: Path) -> Figures:
        directory = root / FIGURES_DIR
        directory.mkdir(parents=True)
        return cls(directory)

    def path(self, kind: FigureKind, layer: str = "") -> Path:
        """Where to write a figure of `kind` (of `layer`, for a per-layer kind); recorded."""
        name = kind.file_name(layer)
        self.names[kind.key(layer)] = name
        return self.directory / name


@dataclass
class Predictions:
    """The model on the split: probabilities, confusion counts and what they say."""

    probs: np.ndarray  # (N, 7)
    counts: np.ndarray  # (7, 7) true x predicted
    accuracy: float
    pairs: list[confusion.ConfusedPair]
    recall: np.ndarray  # (7,) per class


@dataclass
class Explained:
    """Saliency of the chosen examples and its sanity check."""

    examples: list[tuple[saliency.Example | None, saliency.Example | None]]
    flat: list[saliency.Example]
    maps: saliency.SaliencyMaps
    check: saliency.SanityCheck


@dataclass
class FeatureImage:
    """The image feature maps are drawn for, and how the report names it."""

    image: np.ndarray
    caption: str
    short: str  # "" when no prediction was correct


def predict(model: Any, split: SplitData, settings: VizSettings) -> tuple[np.ndarray, float]:
    """Class probabilities of a model on the split, and its accuracy."""
    probs = confusion.predict_probabilities(model, split.images, settings.predict_batch_size)
    return probs, float(np.mean(probs.argmax(axis=1) == split.labels))


def learning_curves(
    client: MlflowClient, subject: Subject, figures: Figures
) -> list[curves.FamilyRun]:
    """The best run of each family of the search, their whole histories drawn (with question
    1's CNN and the report's own model where they are not among them); the best runs."""
    children = subject.children
    family_best = sorted(curves.best_runs_by_family(children).values(), key=lambda r: r.family)
    marks = {subject.run_id: "this report's model"}
    if subject.cnn is not None:
        marks[subject.cnn.run_id] = "question 1"
    entries = list(family_best)
    for run_id in marks:
        if all(e.run_id != run_id for e in entries):
            found = next((c for c in children if c.info.run_id == run_id), None)
            if found is not None:
                entries.append(curves.family_run(found))
    for entry in entries:
        entry.mark = marks.get(entry.run_id, "")
    drawn = curves.collect_curves(client, entries, children)
    if drawn:
        curves.plot_learning_curves(
            drawn,
            figures.path(FigureKind.LEARNING_CURVES),
            "Best CNN and DNN of the search: accuracy per epoch",
        )
    return family_best


def predict_and_confusion(
    subject: Subject, split: SplitData, settings: VizSettings, figures: Figures
) -> Predictions:
    probs = confusion.predict_probabilities(
        subject.model, split.images, settings.predict_batch_size
    )
    predictions = probs.argmax(axis=1)
    counts = confusion.confusion_counts(split.labels, predictions, NUM_CLASSES)
    assert int(counts.sum()) == split.size
    accuracy = float(np.trace(counts)) / split.size
    pairs = confusion.top_confused_pairs(counts, subject.class_names, settings.top_confused)
    confusion.plot_confusion(
        counts,
        subject.class_names,
        figures.path(FigureKind.CONFUSION_MATRIX),
        f"Run {subject.run_id[:8]} on {split.usage}",
    )
    recall = confusion.row_normalise(counts).diagonal()
    return Predictions(probs, counts, accuracy, pairs, recall)


def saliency_and_sanity(
    subject: Subject,
    split: SplitData,
    probs: np.ndarray,
    settings: VizSettings,
    figures: Figures,
) -> Explained:
    """Saliency of `subject.focus` (probabilities `probs` on the split) and its sanity check."""
    model = subject.focus.model
    shown = subject.focus.run.info.run_name or subject.focus.run_id[:8]
    examples = saliency.pick_examples(split.labels, probs, NUM_CLASSES)
    images, flat = saliency.example_batch(split.images, examples)
    targets = [e.predicted for e in flat]
    maps = saliency.compute_saliency(
        model,
        images,
        targets,
        settings.smooth_samples,
        settings.smooth_noise,
        settings.seed,
    )
    check = saliency.sanity_check(
        model,
        images,
        targets,
        maps,
        settings.smooth_samples,
        settings.smooth_noise,
        settings.seed,
        settings.sanity_threshold,
    )
    saliency.plot_saliency(
        images,
        examples,
        maps,
        subject.class_names,
        figures.path(FigureKind.SALIENCY),
        f"{shown}: saliency of the predicted class",
    )
    saliency.plot_sanity(
        images,
        maps,
        check,
        figures.path(FigureKind.SALIENCY_SANITY),
        "Sanity check: trained vs randomised weights",
    )
    for warning in check.warnings():
        log.warning("sanity check: %s", warning)
    return Explained(examples, flat, maps, check)


def feature_image(
    examples: list[tuple[saliency.Example | None, saliency.Example | None]],
    split: SplitData,
    class_names: list[str],
) -> FeatureImage:
    chosen = _feature_map_image(examples)
    if chosen is None:
        return FeatureImage(split.images[0], f"the first {split.usage} image", "")
    name = class_names[chosen.true]
    return FeatureImage(
        split.images[chosen.index],
        f"a {name} image (classified correctly, p={chosen.confidence:.2f})",
        f"{name}, p={chosen.confidence:.2f}",
    )


def filter_selection(subject: Subject, settings: VizSettings) -> dict[str, list[int]]:
    """The first `filters_per_layer` filters of each chosen layer."""
    return {
        layer: list(
            range(min(settings.filters_per_layer, filters.filter_count(subject.focus.model, layer)))
        )
        for layer in subject.layers
    }


def ascent_stage_name(selection: dict[str, list[int]], settings: VizSettings) -> str:
    total_filters = sum(map(len, selection.values()))
    return (
        f"gradient ascent ({len(selection)} layers, {total_filters} filters, "
        f"{settings.ascent_steps} steps)"
    )


def gradient_ascent(
    subject: Subject, selection: dict[str, list[int]], settings: VizSettings
) -> dict[str, filters.FilterAscent]:
    return filters.maximize_layers(
        subject.focus.model,
        selection,
        steps=settings.ascent_steps,
        learning_rate=settings.ascent_learning_rate,
        jitter=settings.ascent_jitter,
        tv_weight=settings.ascent_tv_weight,
        l2_weight=settings.ascent_l2_weight,
        seed=settings.seed,
    )


def filter_figures(
    subject: Subject,
    selection: dict[str, list[int]],
    ascents: dict[str, filters.FilterAscent],
    feature: FeatureImage,
    figures: Figures,
) -> list[FilterSummary]:
    summaries = []
    for layer in subject.layers:
        ascent, indices = ascents[layer], selection[layer]
        measured = (
            ""
            if ascent.activation_layer == layer
            else f" (measured after {ascent.activation_layer})"
        )
        filters.plot_filter_ascent(
            ascent,
            figures.path(FigureKind.FILTERS, layer),
            f"{layer}: images maximising each filter's mean activation{measured}",
        )
        maps_k = filters.feature_maps(subject.focus.model, layer, feature.image, indices)
        filters.plot_feature_maps(
            feature.image,
            maps_k,
            indices,
            figures.path(FigureKind.FEATURE_MAPS, layer),
            f"{layer}: feature maps",
            feature.short,
        )
        summaries.append(
            FilterSummary(
                layer=layer,
                activation_layer=ascent.activation_layer,
                filters=indices,
                start_mean=float(ascent.start_activation.mean()),
                final_mean=float(ascent.final_activation.mean()),
                raised=int(np.sum(ascent.final_activation > ascent.start_activation)),
            )
        )
    return summaries


def held_out(
    run_id: str, config: dict[str, Any], settings: VizSettings, model: Any
) -> HeldOut | None:
    """Accuracy on the rows no search saw or chose by (the full Kaggle file's PrivateTest);
    None when the data has none."""
    try:
        split = rebuild_split(run_id, config, settings.data, HELD_OUT_USAGE)
    except VizError as error:
        log.info("no held-out test accuracy: %s", error)
        return None
    probs = confusion.predict_probabilities(model, split.images, settings.predict_batch_size)
    correct = int(np.sum(probs.argmax(axis=1) == split.labels))
    return HeldOut(split.usage, split.size, correct / split.size)


def _feature_map_image(
    examples: list[tuple[saliency.Example | None, saliency.Example | None]],
) -> saliency.Example | None:
    """The most confident correct prediction of any class (a clear face for feature maps)."""
    correct = [pair[0] for pair in examples if pair[0] is not None]
    return max(correct, key=lambda e: e.confidence) if correct else None
