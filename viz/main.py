"""`run_viz`: every figure and the report for one run, logged back to it; and its CLI.

    python -m viz.main [--run-id ID] [--data PATH] [--split PublicTest] [--out DIR]
                       [--filters-per-layer 8] [--layers conv_1,conv_2] [tuning flags]

All checks (run exists, model present, hash, safe load, data hash, layer names) happen before
anything is computed or logged, so a refused run is left exactly as it was. The stages are in
viz/stages.py, the models they are drawn for in viz/subject.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schema.cli import import_tensorflow  # imports nothing of the project

import_tensorflow()  # before the viz modules import Keras: without its load-time noise

import numpy as np  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from schema.cli import add_arguments, from_namespace  # noqa: E402
from schema.run import TAG_MODEL_URI  # noqa: E402
from viz import curves, stages  # noqa: E402
from viz.blocks import FIGURES_DIR  # noqa: E402
from viz.facts import HELD_OUT_USAGE, FilterSummary, HeldOut, ReportFacts  # noqa: E402
from viz.report import REPORT_HTML, REPORT_MD, write_reports  # noqa: E402
from viz.runs import SplitData, rebuild_split  # noqa: E402
from viz.search import seed2017_sentence  # noqa: E402
from viz.settings import VizSettings  # noqa: E402
from viz.subject import Subject, family_of, model_facts, select_and_verify  # noqa: E402

log = logging.getLogger("viz")


@contextmanager
def _stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Log the start and duration of a slow stage (progress for CLI and MLflow users)."""
    log.info("%s ...", name)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    log.info("%s done in %.1f s", name, timings[name])


@dataclass
class _Findings:
    """What the figure stages found, for the report."""

    family_best: list[curves.FamilyRun]
    predictions: stages.Predictions
    cnn_accuracy: float | None  # question 1's CNN on the split
    held_out: HeldOut | None
    explained: stages.Explained
    feature: stages.FeatureImage
    filters: list[FilterSummary]


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
            subject = select_and_verify(client, settings, tmp)
        run_id = subject.run_id
        with _stage(f"rebuild {settings.split} split", timings):
            split = rebuild_split(run_id, subject.config, settings.data, settings.split)
        log.info("run %s: %s, %d images of %s", run_id, subject.model.name, split.size, split.usage)

        root = tmp / "report"
        figures = stages.Figures.under(root)
        with _stage("learning curves", timings):
            family_best = stages.learning_curves(client, subject, figures)
        found = _figures(subject, split, settings, figures, timings, family_best)
        facts = _report_facts(subject, settings, split, found, figures, timings)
        with _stage("report", timings):
            write_reports(facts, root)

        # ---- log back to the run, then copy out
        with _stage("log artifacts", timings):
            _log_artifacts(client, run_id, root)
        out_dir = _copy_out(root, settings.out)

    return _summary(facts, subject.loaded.sha256, found.predictions.counts, out_dir)


def _figures(
    subject: Subject,
    split: SplitData,
    settings: VizSettings,
    figures: stages.Figures,
    timings: dict[str, float],
    family_best: list[curves.FamilyRun],
) -> _Findings:
    """Predictions, held-out accuracy, saliency and filters (each model predicted once)."""
    with _stage("predict and confusion matrix", timings):
        predictions = stages.predict_and_confusion(subject, split, settings, figures)
    probs_of = {subject.run_id: (predictions.probs, predictions.accuracy)}
    for other in (subject.focus, subject.cnn):
        if other is not None and other.run_id not in probs_of:
            with _stage(f"predict {other.run.info.run_name or other.run_id[:8]}", timings):
                probs_of[other.run_id] = stages.predict(other.model, split, settings)
    held_out = None
    if settings.split != HELD_OUT_USAGE:
        with _stage(f"held-out accuracy ({HELD_OUT_USAGE} rows)", timings):
            held_out = stages.held_out(
                run_id=subject.run_id, config=subject.config, settings=settings, model=subject.model
            )
    with _stage("saliency and sanity check", timings):
        explained = stages.saliency_and_sanity(
            subject, split, probs_of[subject.focus.run_id][0], settings, figures
        )
    feature = stages.feature_image(explained.examples, split, subject.class_names)
    summaries: list[FilterSummary] = []
    if subject.layers:
        selection = stages.filter_selection(subject, settings)
        with _stage(stages.ascent_stage_name(selection, settings), timings):
            ascents = stages.gradient_ascent(subject, selection, settings)
        with _stage("filter and feature-map figures", timings):
            summaries = stages.filter_figures(subject, selection, ascents, feature, figures)
    cnn_accuracy = probs_of[subject.cnn.run_id][1] if subject.cnn is not None else None
    return _Findings(
        family_best, predictions, cnn_accuracy, held_out, explained, feature, summaries
    )


def _report_facts(
    subject: Subject,
    settings: VizSettings,
    split: SplitData,
    found: _Findings,
    figures: stages.Figures,
    timings: dict[str, float],
) -> ReportFacts:
    """Everything the report states; `timings` is shared, so later stages still show in it."""
    run, config, model = subject.loaded.run, subject.config, subject.model
    predictions, check = found.predictions, found.explained.check
    ensemble = subject.ensemble
    member = ensemble.filters_member if ensemble is not None else None
    cnn = None
    if subject.cnn is not None:
        cnn = model_facts(
            subject.cnn,
            subject.cnn_role,
            subject.children,
            accuracy=found.cnn_accuracy,
            report_accuracy=member.report_accuracy if member is not None else None,
        )
    train_rows = config["data"].get("train_rows")
    return ReportFacts(
        run_id=subject.run_id,
        run_name=run.info.run_name or "",
        family=family_of(subject.loaded),
        model_name=model.name,
        params_total=int(model.count_params()),
        split=split.usage,
        split_size=split.size,
        accuracy=predictions.accuracy,
        best_val_accuracy=run.data.metrics.get("best_val_accuracy"),
        val_usage=config["data"].get("val_usage"),
        data_source=split.source,
        data_sha256=split.sha256,
        data_fraction=split.data_fraction,
        model_uri=run.data.tags.get(TAG_MODEL_URI, ""),
        champion=None
        if ensemble is not None
        else model_facts(
            subject.loaded, "this report's model", subject.children, predictions.accuracy
        ),
        cnn=cnn,
        seed2017=seed2017_sentence(
            subject.search.seed2017 if subject.search is not None else None,
            int(train_rows) if train_rows else None,
        ),
        family_best=found.family_best,
        coursework_notes=curves.coursework_notes(subject.children),
        confused=predictions.pairs,
        recall={
            name: float(r) for name, r in zip(subject.class_names, predictions.recall, strict=True)
        },
        sanity_rho={m: check.mean(m) for m in check.rho},
        sanity_threshold=settings.sanity_threshold,
        sanity_warnings=check.warnings(),
        gradcam_layer=found.explained.maps.gradcam_layer,
        saliency_examples=len(found.explained.flat),
        filters=found.filters,
        ascent_steps=settings.ascent_steps,
        feature_map_caption=found.feature.caption,
        figures=figures.names,
        timings=timings,
        ensemble=ensemble,
        held_out=found.held_out,
        search=subject.search,
        explained_by=cnn if subject.explained_by_member else None,
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
