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
from dataclasses import fields
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from schema.run import TAG_FAMILY  # noqa: E402
from viz import confusion, curves, filters, saliency  # noqa: E402
from viz.champion import ensemble_facts, is_ensemble  # noqa: E402
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

    names = list(CLASS_NAMES)
    if len(names) != NUM_CLASSES:
        raise VizError(f"model.data.CLASS_NAMES: expected {NUM_CLASSES} names, found {names}")
    return names


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
            run_id = settings.run_id or select_run_id(client, experiment_id_from_env(client))
            loaded = load_verified_model(client, run_id, tmp / "download")
            model, config = loaded.model, loaded.config
            # An ensemble's conv layers sit inside its members: gradient ascent is drawn for
            # its strongest CNN member (saliency and the confusion matrix use the ensemble).
            ensemble = ensemble_facts(loaded.run, config) if is_ensemble(config) else None
            ascent_model = model
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
            class_names = _class_names()
        with _stage(f"rebuild {settings.split} split", timings):
            split = rebuild_split(run_id, config, settings.data, settings.split)
        log.info("run %s: %s, %d images of %s", run_id, model.name, split.size, split.usage)

        root = tmp / "report"
        figures_dir = root / FIGURES_DIR
        figures_dir.mkdir(parents=True)
        figures: dict[str, str] = {}

        def figure(key: str, name: str) -> Path:
            figures[key] = name
            return figures_dir / name

        # ---- figures
        with _stage("architecture and learning curves", timings):
            total, trainable = curves.param_counts(model)
            curves.plot_architecture(
                model,
                figure("architecture", "architecture.png"),
                f"{model.name}: {total:,} parameters ({trainable:,} trainable)",
            )
            best_by_family = curves.best_runs_by_family(client, loaded.run)
            family_best = sorted(best_by_family.values(), key=lambda r: r.family)
            notes = curves.coursework_notes(client, loaded.run)
            curves.plot_learning_curves(
                curves.collect_curves(client, loaded.run, best_by_family),
                figure("learning_curves", "learning_curves.png"),
                "Best CNN and DNN of the search: accuracy per epoch",
            )

        with _stage("predict and confusion matrix", timings):
            probs = confusion.predict_probabilities(
                model, split.images, settings.predict_batch_size
            )
            predictions = probs.argmax(axis=1)
            counts = confusion.confusion_counts(split.labels, predictions, NUM_CLASSES)
            assert int(counts.sum()) == split.size
            accuracy = float(np.trace(counts)) / split.size
            pairs = confusion.top_confused_pairs(counts, class_names, settings.top_confused)
            confusion.plot_confusion(
                counts,
                class_names,
                figure("confusion_matrix", "confusion_matrix.png"),
                f"Run {run_id[:8]} on {split.usage}",
            )
            recall = confusion.row_normalise(counts).diagonal()

        held_out = None
        if settings.split != HELD_OUT_USAGE:
            with _stage(f"{HELD_OUT_USAGE} rows, if the data has them", timings):
                held_out = _held_out(run_id, config, settings, model)

        with _stage("saliency and sanity check", timings):
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
                class_names,
                figure("saliency", "saliency.png"),
                f"Run {run_id[:8]}: saliency of the predicted class",
            )
            saliency.plot_sanity(
                images,
                maps,
                check,
                figure("saliency_sanity", "saliency_sanity.png"),
                "Sanity check: trained vs randomised weights",
            )
            for warning in check.warnings():
                log.warning("sanity check: %s", warning)

        summaries: list[FilterSummary] = []
        chosen = _feature_map_image(examples)
        chosen_image = split.images[chosen.index] if chosen else split.images[0]
        caption = (
            f"a {class_names[chosen.true]} image (classified correctly, p={chosen.confidence:.2f})"
            if chosen
            else f"the first {split.usage} image"
        )
        short = f"{class_names[chosen.true]}, p={chosen.confidence:.2f}" if chosen else ""
        if layers:
            selection = {
                layer: list(
                    range(
                        min(settings.filters_per_layer, filters.filter_count(ascent_model, layer))
                    )
                )
                for layer in layers
            }
            total_filters = sum(map(len, selection.values()))
            with _stage(
                f"gradient ascent ({len(layers)} layers, {total_filters} filters, "
                f"{settings.ascent_steps} steps)",
                timings,
            ):
                ascents = filters.maximize_layers(
                    ascent_model,
                    selection,
                    steps=settings.ascent_steps,
                    learning_rate=settings.ascent_learning_rate,
                    jitter=settings.ascent_jitter,
                    tv_weight=settings.ascent_tv_weight,
                    l2_weight=settings.ascent_l2_weight,
                    seed=settings.seed,
                )
            with _stage("filter and feature-map figures", timings):
                for layer in layers:
                    ascent, indices, name = ascents[layer], selection[layer], safe_name(layer)
                    measured = (
                        ""
                        if ascent.activation_layer == layer
                        else f" (measured after {ascent.activation_layer})"
                    )
                    filters.plot_filter_ascent(
                        ascent,
                        figure(f"filters:{layer}", f"filters_{name}.png"),
                        f"{layer}: images maximising each filter's mean activation{measured}",
                    )
                    maps_k = filters.feature_maps(ascent_model, layer, chosen_image, indices)
                    filters.plot_feature_maps(
                        chosen_image,
                        maps_k,
                        indices,
                        figure(f"feature_maps:{layer}", f"feature_maps_{name}.png"),
                        f"{layer}: feature maps",
                        short,
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

        run = loaded.run
        family = run.data.tags.get(TAG_FAMILY) or str(config.get("family", "unknown"))
        facts = ReportFacts(
            run_id=run_id,
            family=family,
            model_name=model.name,
            params_total=total,
            params_trainable=trainable,
            layer_count=len(model.layers),
            conv_layers=saliency.conv_layer_names(model),
            training=dict(config.get("training") or {}),
            split=split.usage,
            split_size=split.size,
            accuracy=accuracy,
            best_val_accuracy=run.data.metrics.get(BEST_METRIC),
            val_usage=config["data"].get("val_usage"),
            data_source=split.source,
            data_sha256=split.sha256,
            data_fraction=split.data_fraction,
            family_best=family_best,
            coursework_notes=notes,
            confused=pairs,
            recall={name: float(r) for name, r in zip(class_names, recall, strict=True)},
            sanity_rho={m: check.mean(m) for m in check.rho},
            sanity_threshold=settings.sanity_threshold,
            sanity_warnings=check.warnings(),
            gradcam_layer=maps.gradcam_layer,
            saliency_examples=len(flat),
            filters=summaries,
            ascent_steps=settings.ascent_steps,
            feature_map_caption=caption,
            figures=figures,
            timings=timings,
            ensemble=ensemble,
            held_out=held_out,
        )
        with _stage("report", timings):
            write_reports(facts, root)

        # ---- log back to the run, then copy out
        with _stage("log artifacts", timings):
            client.log_artifacts(run_id, str(figures_dir), FIGURES_DIR)
            client.log_artifact(run_id, str(root / REPORT_MD))
            client.log_artifact(run_id, str(root / REPORT_HTML))
        out_dir = ""
        if settings.out:
            out_dir = str(Path(settings.out).resolve())
            shutil.copytree(root, out_dir, dirs_exist_ok=True)
            log.info("wrote %s", out_dir)

    figure_names = sorted(figures.values())
    return {
        "run_id": run_id,
        "model_sha256": loaded.sha256,
        "family": family,
        "params": total,
        "split": split.usage,
        "split_size": split.size,
        "accuracy": accuracy,
        "best_val_accuracy": facts.best_val_accuracy,
        "confusion_matrix": counts.tolist(),
        "confused_pairs": [str(p) for p in pairs],
        "sanity_spearman": facts.sanity_rho,
        "sanity_warnings": facts.sanity_warnings,
        "gradcam_layer": maps.gradcam_layer,
        "filter_layers": [s.layer for s in summaries],
        "artifacts": [f"{FIGURES_DIR}/{n}" for n in figure_names] + [REPORT_MD, REPORT_HTML],
        "out": out_dir,
        "timings": timings,
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
    for spec in fields(VizSettings):
        default = spec.default
        kind = type(default)
        parser.add_argument(
            "--" + spec.name.replace("_", "-"),
            dest=spec.name,
            type=kind,
            default=default,
            help=f"(default: {default!r})",
        )
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
        settings = VizSettings(**vars(args))
        summary = run_viz(settings)
    except ValueError as error:  # VizError, or a bad setting
        print(f"viz: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
