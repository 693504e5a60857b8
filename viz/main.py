"""`run_viz`: every figure and the report for one run, logged back to it; and its CLI.

    python -m viz.main [--run-id ID] [--data PATH] [--split PublicTest] [--out DIR]
                       [--filters-per-layer 8] [--layers conv_1,conv_2] [tuning flags]

All checks (run exists, model present, hash, safe load, data hash, layer names) happen before
anything is computed or logged, so a refused run is left exactly as it was.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from schema.cli import add_arguments, from_namespace  # noqa: E402
from schema.run import TAG_FAMILY  # noqa: E402
from viz import confusion, curves, filters, saliency  # noqa: E402
from viz.champion import EnsembleFacts, ensemble_facts, is_ensemble  # noqa: E402
from viz.plotting import safe_name  # noqa: E402
from viz.report import (  # noqa: E402
    FIGURES_DIR,
    HELD_OUT_USAGE,
    REPORT_HTML,
    REPORT_MD,
    FilterSummary,
    HeldOut,
    ReportFacts,
    write_reports,
)
from viz.runs import (  # noqa: E402
    BEST_METRIC,
    NUM_CLASSES,
    LoadedRun,
    SplitData,
    VizError,
    experiment_id_from_env,
    load_verified_model,
    rebuild_split,
    select_run_id,
)
from viz.settings import VizSettings  # noqa: E402

log = logging.getLogger("viz")


@contextmanager
def _stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Log the start and duration of a slow stage (progress for CLI and MLflow users)."""
    log.info("%s ...", name)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    log.info("%s done in %.1f s", name, timings[name])


def _class_names() -> list[str]:
    from model.data import CLASS_NAMES

    return list(CLASS_NAMES)


def run_viz(settings: VizSettings, client: MlflowClient | None = None) -> dict[str, Any]:
    """Visualise one run and log figures/, report.md, report.html to it; return a summary.

    Raises VizError (nothing logged) when the run, its model or its data fail a check.
    """
    client = client or MlflowClient()
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="viz-") as tmp_name:
        tmp = Path(tmp_name)

        # ---- checks: nothing is written to the run until all of these pass
        with _stage("select and verify run", timings):
            subject = _select_and_verify(client, settings, tmp)
        run_id = subject.run_id
        with _stage(f"rebuild {settings.split} split", timings):
            split = rebuild_split(run_id, subject.config, settings.data, settings.split)
        log.info("run %s: %s, %d images of %s", run_id, subject.model.name, split.size, split.usage)

        # ---- figures
        root = tmp / "report"
        figures = _Figures.under(root)
        with _stage("architecture and learning curves", timings):
            overview = _architecture_and_curves(client, subject, figures)
        with _stage("predict and confusion matrix", timings):
            predictions = _predict_and_confusion(subject, split, settings, figures)
        held_out = None
        if settings.split != HELD_OUT_USAGE:
            with _stage(f"{HELD_OUT_USAGE} rows, if the data has them", timings):
                held_out = _held_out(run_id, subject.config, settings, subject.model)
        with _stage("saliency and sanity check", timings):
            explained = _saliency_and_sanity(subject, split, predictions, settings, figures)
        feature = _feature_image(explained.examples, split, subject.class_names)
        summaries: list[FilterSummary] = []
        if subject.layers:
            selection = _filter_selection(subject, settings)
            with _stage(_ascent_stage_name(selection, settings), timings):
                ascents = _gradient_ascent(subject, selection, settings)
            with _stage("filter and feature-map figures", timings):
                summaries = _filter_figures(subject, selection, ascents, feature, figures)

        found = _Findings(overview, predictions, held_out, explained, feature, summaries)
        facts = _report_facts(subject, settings, split, found, figures, timings)
        with _stage("report", timings):
            write_reports(facts, root)

        # ---- log back to the run, then copy out
        with _stage("log artifacts", timings):
            _log_artifacts(client, run_id, root)
        out_dir = _copy_out(root, settings.out)

    return _summary(facts, subject.loaded.sha256, predictions.counts, out_dir)


# ---------------------------------------------------------------- what the stages hand on


@dataclass
class _Subject:
    """The run that passed every check, and what its figures are drawn from."""

    run_id: str
    loaded: LoadedRun
    # An ensemble's conv layers sit inside its members: gradient ascent is drawn for its
    # strongest CNN member (saliency and the confusion matrix use the ensemble).
    ensemble: EnsembleFacts | None
    ascent_model: Any | None  # the model gradient ascent runs on; None: no CNN member
    layers: list[str]  # conv layers of ascent_model to draw filters of
    class_names: list[str]

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def config(self) -> dict[str, Any]:
        return self.loaded.config


@dataclass
class _Figures:
    """The figure files written so far: key the report finds them by -> name under figures/."""

    directory: Path
    names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def under(cls, root: Path) -> _Figures:
        directory = root / FIGURES_DIR
        directory.mkdir(parents=True)
        return cls(directory)

    def path(self, key: str, name: str) -> Path:
        self.names[key] = name
        return self.directory / name


@dataclass
class _Overview:
    """Parameter counts and the search's best run of each family (learning curves)."""

    total: int
    trainable: int
    family_best: list[curves.FamilyRun]
    notes: list[str]  # the search's coursework notes


@dataclass
class _Predictions:
    """The model on the split: probabilities, confusion counts and what they say."""

    probs: np.ndarray  # (N, 7)
    counts: np.ndarray  # (7, 7) true x predicted
    accuracy: float
    pairs: list[confusion.ConfusedPair]
    recall: np.ndarray  # (7,) per class


@dataclass
class _Explained:
    """Saliency of the chosen examples and its sanity check."""

    examples: list[tuple[saliency.Example | None, saliency.Example | None]]
    flat: list[saliency.Example]
    maps: saliency.SaliencyMaps
    check: saliency.SanityCheck


@dataclass
class _FeatureImage:
    """The image feature maps are drawn for, and how the report names it."""

    image: np.ndarray
    caption: str
    short: str  # "" when no prediction was correct


@dataclass
class _Findings:
    """What the figure stages found, for the report."""

    overview: _Overview
    predictions: _Predictions
    held_out: HeldOut | None
    explained: _Explained
    feature: _FeatureImage
    filters: list[FilterSummary]


# ---------------------------------------------------------------- stages


def _select_and_verify(client: MlflowClient, settings: VizSettings, tmp: Path) -> _Subject:
    """Pick the run, load and verify its model (and an ensemble's CNN member), check layers."""
    run_id = settings.run_id or select_run_id(client, experiment_id_from_env(client))
    loaded = load_verified_model(client, run_id, tmp / "download")
    ensemble = ensemble_facts(loaded.run, loaded.config) if is_ensemble(loaded.config) else None
    ascent_model = loaded.model
    if ensemble is not None:
        ensemble.filters_member = ensemble.strongest_cnn()
        member = ensemble.filters_member
        ascent_model = (
            load_verified_model(client, member.run_id, tmp / "member").model
            if member is not None
            else None
        )
    try:
        layers = (
            filters.select_layers(ascent_model, settings.layer_names())
            if ascent_model is not None
            else []
        )
    except VizError as error:
        raise VizError(f"run {run_id}: {error}") from error
    return _Subject(run_id, loaded, ensemble, ascent_model, layers, _class_names())


def _architecture_and_curves(
    client: MlflowClient, subject: _Subject, figures: _Figures
) -> _Overview:
    model, run = subject.model, subject.loaded.run
    total, trainable = curves.param_counts(model)
    curves.plot_architecture(
        model,
        figures.path("architecture", "architecture.png"),
        f"{model.name}: {total:,} parameters ({trainable:,} trainable)",
    )
    best_by_family = curves.best_runs_by_family(client, run)
    family_best = sorted(best_by_family.values(), key=lambda r: r.family)
    notes = curves.coursework_notes(client, run)
    curves.plot_learning_curves(
        curves.collect_curves(client, run, best_by_family),
        figures.path("learning_curves", "learning_curves.png"),
        "Best CNN and DNN of the search: accuracy per epoch",
    )
    return _Overview(total, trainable, family_best, notes)


def _predict_and_confusion(
    subject: _Subject, split: SplitData, settings: VizSettings, figures: _Figures
) -> _Predictions:
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
        figures.path("confusion_matrix", "confusion_matrix.png"),
        f"Run {subject.run_id[:8]} on {split.usage}",
    )
    recall = confusion.row_normalise(counts).diagonal()
    return _Predictions(probs, counts, accuracy, pairs, recall)


def _saliency_and_sanity(
    subject: _Subject,
    split: SplitData,
    predictions: _Predictions,
    settings: VizSettings,
    figures: _Figures,
) -> _Explained:
    model = subject.model
    examples = saliency.pick_examples(split.labels, predictions.probs, NUM_CLASSES)
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
        figures.path("saliency", "saliency.png"),
        f"Run {subject.run_id[:8]}: saliency of the predicted class",
    )
    saliency.plot_sanity(
        images,
        maps,
        check,
        figures.path("saliency_sanity", "saliency_sanity.png"),
        "Sanity check: trained vs randomised weights",
    )
    for warning in check.warnings():
        log.warning("sanity check: %s", warning)
    return _Explained(examples, flat, maps, check)


def _feature_image(
    examples: list[tuple[saliency.Example | None, saliency.Example | None]],
    split: SplitData,
    class_names: list[str],
) -> _FeatureImage:
    chosen = _feature_map_image(examples)
    if chosen is None:
        return _FeatureImage(split.images[0], f"the first {split.usage} image", "")
    name = class_names[chosen.true]
    return _FeatureImage(
        split.images[chosen.index],
        f"a {name} image (classified correctly, p={chosen.confidence:.2f})",
        f"{name}, p={chosen.confidence:.2f}",
    )


def _filter_selection(subject: _Subject, settings: VizSettings) -> dict[str, list[int]]:
    """The first `filters_per_layer` filters of each chosen layer."""
    return {
        layer: list(
            range(
                min(settings.filters_per_layer, filters.filter_count(subject.ascent_model, layer))
            )
        )
        for layer in subject.layers
    }


def _ascent_stage_name(selection: dict[str, list[int]], settings: VizSettings) -> str:
    total_filters = sum(map(len, selection.values()))
    return (
        f"gradient ascent ({len(selection)} layers, {total_filters} filters, "
        f"{settings.ascent_steps} steps)"
    )


def _gradient_ascent(
    subject: _Subject, selection: dict[str, list[int]], settings: VizSettings
) -> dict[str, filters.FilterAscent]:
    return filters.maximize_layers(
        subject.ascent_model,
        selection,
        steps=settings.ascent_steps,
        learning_rate=settings.ascent_learning_rate,
        jitter=settings.ascent_jitter,
        tv_weight=settings.ascent_tv_weight,
        l2_weight=settings.ascent_l2_weight,
        seed=settings.seed,
    )


def _filter_figures(
    subject: _Subject,
    selection: dict[str, list[int]],
    ascents: dict[str, filters.FilterAscent],
    feature: _FeatureImage,
    figures: _Figures,
) -> list[FilterSummary]:
    summaries = []
    for layer in subject.layers:
        ascent, indices, name = ascents[layer], selection[layer], safe_name(layer)
        measured = (
            ""
            if ascent.activation_layer == layer
            else f" (measured after {ascent.activation_layer})"
        )
        filters.plot_filter_ascent(
            ascent,
            figures.path(f"filters:{layer}", f"filters_{name}.png"),
            f"{layer}: images maximising each filter's mean activation{measured}",
        )
        maps_k = filters.feature_maps(subject.ascent_model, layer, feature.image, indices)
        filters.plot_feature_maps(
            feature.image,
            maps_k,
            indices,
            figures.path(f"feature_maps:{layer}", f"feature_maps_{name}.png"),
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


def _report_facts(
    subject: _Subject,
    settings: VizSettings,
    split: SplitData,
    found: _Findings,
    figures: _Figures,
    timings: dict[str, float],
) -> ReportFacts:
    """Everything the report states; `timings` is shared, so later stages still show in it."""
    run, config, model = subject.loaded.run, subject.config, subject.model
    overview, predictions, explained = found.overview, found.predictions, found.explained
    check = explained.check
    return ReportFacts(
        run_id=subject.run_id,
        family=run.data.tags.get(TAG_FAMILY) or str(config.get("family", "unknown")),
        model_name=model.name,
        params_total=overview.total,
        params_trainable=overview.trainable,
        layer_count=len(model.layers),
        conv_layers=saliency.conv_layer_names(model),
        training=dict(config.get("training") or {}),
        split=split.usage,
        split_size=split.size,
        accuracy=predictions.accuracy,
        best_val_accuracy=run.data.metrics.get(BEST_METRIC),
        val_usage=config["data"].get("val_usage"),
        data_source=split.source,
        data_sha256=split.sha256,
        data_fraction=split.data_fraction,
        family_best=overview.family_best,
        coursework_notes=overview.notes,
        confused=predictions.pairs,
        recall={
            name: float(r) for name, r in zip(subject.class_names, predictions.recall, strict=True)
        },
        sanity_rho={m: check.mean(m) for m in check.rho},
        sanity_threshold=settings.sanity_threshold,
        sanity_warnings=check.warnings(),
        gradcam_layer=explained.maps.gradcam_layer,
        saliency_examples=len(explained.flat),
        filters=found.filters,
        ascent_steps=settings.ascent_steps,
        feature_map_caption=found.feature.caption,
        figures=figures.names,
        timings=timings,
        ensemble=subject.ensemble,
        held_out=found.held_out,
    )


def _log_artifacts(client: MlflowClient, run_id: str, root: Path) -> None:
    client.log_artifacts(run_id, str(root / FIGURES_DIR), FIGURES_DIR)
    client.log_artifact(run_id, str(root / REPORT_MD))
    client.log_artifact(run_id, str(root / REPORT_HTML))


def _copy_out(root: Path, out: str) -> str:
    """Copy the report folder to `out` (when set); its absolute path, or ""."""
    if not out:
        return ""
    out_dir = str(Path(out).resolve())
    shutil.copytree(root, out_dir, dirs_exist_ok=True)
    log.info("wrote %s", out_dir)
    return out_dir


def _summary(
    facts: ReportFacts, model_sha256: str, counts: np.ndarray, out_dir: str
) -> dict[str, Any]:
    """What `run_viz` returns (and the CLI prints as JSON)."""
    figure_names = sorted(facts.figures.values())
    return {
        "run_id": facts.run_id,
        "model_sha256": model_sha256,
        "family": facts.family,
        "params": facts.params_total,
        "split": facts.split,
        "split_size": facts.split_size,
        "accuracy": facts.accuracy,
        "best_val_accuracy": facts.best_val_accuracy,
        "confusion_matrix": counts.tolist(),
        "confused_pairs": [str(p) for p in facts.confused],
        "sanity_spearman": facts.sanity_rho,
        "sanity_warnings": facts.sanity_warnings,
        "gradcam_layer": facts.gradcam_layer,
        "filter_layers": [s.layer for s in facts.filters],
        "artifacts": [f"{FIGURES_DIR}/{n}" for n in figure_names] + [REPORT_MD, REPORT_HTML],
        "out": out_dir,
        "timings": facts.timings,
    }


def _held_out(
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


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """Flags mirror VizSettings fields (`run_id` -> --run-id) with its defaults."""
    parser = argparse.ArgumentParser(
        prog="python -m viz.main",
        description="Figures and report for a FER2013 run, logged back to the run.",
    )
    add_arguments(parser, VizSettings, help_defaults=True)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (pytest and notebooks swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(asctime)s viz: %(message)s", "%H:%M:%S"))

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it; ignore
        pass


def main(argv: list[str] | None = None) -> int:
    # Progress lines on stderr whatever the root logger (MLflow, pytest) is set up to do;
    # restored on return so an in-process caller's logging is left as it was.
    handler, level, propagate = _StderrHandler(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        return _main(argv)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = from_namespace(VizSettings, args)
        summary = run_viz(settings)
    except ValueError as error:  # VizError, or a bad setting
        print(f"viz: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
