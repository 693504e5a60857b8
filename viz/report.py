"""report.md and a self-contained report.html answering the five coursework questions.

Both are rendered from one list of blocks so they always say the same thing; the HTML embeds
every figure as a base64 PNG so it can be mailed or opened from the MLflow UI on its own.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from viz.champion import EnsembleFacts
from viz.confusion import ConfusedPair
from viz.curves import FamilyRun

FIGURES_DIR = "figures"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
# The rows the full Kaggle file holds back: never used by the search for any choice.
HELD_OUT_USAGE = "PrivateTest"


@dataclass(frozen=True)
class HeldOut:
    usage: str
    size: int
    accuracy: float


@dataclass
class FilterSummary:
    layer: str
    activation_layer: str
    filters: list[int]
    start_mean: float
    final_mean: float
    raised: int  # filters whose activation went up


@dataclass
class ReportFacts:
    """Everything the report states, gathered by `run_viz`."""

    run_id: str
    family: str
    model_name: str
    params_total: int
    params_trainable: int
    layer_count: int
    conv_layers: list[str]
    training: dict[str, Any]
    split: str
    split_size: int
    accuracy: float
    best_val_accuracy: float | None
    val_usage: str | None
    data_source: str
    data_sha256: str
    data_fraction: float
    family_best: list[FamilyRun]
    confused: list[ConfusedPair]
    recall: dict[str, float]
    sanity_rho: dict[str, float]
    sanity_threshold: float
    sanity_warnings: list[str]
    gradcam_layer: str | None
    saliency_examples: int
    filters: list[FilterSummary]
    ascent_steps: int
    feature_map_caption: str
    figures: dict[str, str]  # key -> file name under figures/
    timings: dict[str, float] = field(default_factory=dict)
    # What the search said of coursework models its budget could not train (fer.coursework_note)
    coursework_notes: list[str] = field(default_factory=list)
    ensemble: EnsembleFacts | None = None  # when the run is the search's ensemble
    held_out: HeldOut | None = None  # accuracy on held-out test rows, where the data has them


# ---------------------------------------------------------------- blocks


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Warn:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    name: str  # file under figures/
    caption: str


Block = Heading | Para | Warn | Table | Figure


def _pct(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value * 100:.1f} %"


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def build_blocks(facts: ReportFacts) -> list[Block]:
    """The report's content, in order."""
    blocks: list[Block] = [
        Heading(f"FER2013 model report — run {facts.run_id}", 1),
        Para(
            f"{facts.family.upper()} model `{facts.model_name}` evaluated on the "
            f"{facts.split} split ({facts.split_size:,} images) of `{facts.data_source}` "
            f"(SHA-256 `{facts.data_sha256[:16]}…`, data fraction {facts.data_fraction:g}). "
            f"The model file's SHA-256 matched the run's record and it loaded with "
            f"safe_mode=True."
        ),
    ]
    blocks += _question_1(facts)
    blocks += _ensemble(facts)
    blocks += _question_2(facts)
    blocks += _question_3(facts)
    blocks += _question_4(facts)
    blocks += _question_5(facts)
    if facts.timings:
        blocks.append(Heading("Timings", 3))
        blocks.append(
            Table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in facts.timings.items()])
        )
    return blocks


def _question_1(facts: ReportFacts) -> list[Block]:
    t = facts.training
    settings = ", ".join(
        f"{key.replace('_', ' ')} {t[key]}"
        for key in (
            "optimizer",
            "learning_rate",
            "lr_schedule",
            "batch_size",
            "micro_batch_size",
            "max_epochs",
            "seed",
        )
        if key in t
    )
    metric = (
        f"The run's recorded best val_accuracy (on {facts.val_usage}) is "
        f"{_pct(facts.best_val_accuracy)}."
        if facts.best_val_accuracy is not None
        else "The run recorded no best_val_accuracy."
    )
    blocks: list[Block] = [
        Heading("1. Architecture, training and accuracy"),
        Para(
            f"{facts.layer_count} layers, {facts.params_total:,} parameters "
            f"({facts.params_trainable:,} trainable)"
            + (f", conv layers: {', '.join(facts.conv_layers)}." if facts.conv_layers else ".")
        ),
        Para(f"Training: {settings or 'not recorded'}."),
        Para(
            f"Accuracy on {facts.split}: **{_pct(facts.accuracy)}** "
            f"({round(facts.accuracy * facts.split_size):,} of {facts.split_size:,}). {metric}"
        ),
    ]
    if (
        facts.best_val_accuracy is not None
        and facts.val_usage == facts.split
        and abs(facts.best_val_accuracy - facts.accuracy) > 0.005
    ):
        blocks.append(
            Warn(
                f"Recomputed accuracy {_pct(facts.accuracy)} differs from the recorded "
                f"{_pct(facts.best_val_accuracy)} on the same split: the saved model may not "
                f"be the best epoch, or the data differs."
            )
        )
    if facts.held_out is not None:
        held = facts.held_out
        blocks.append(
            Para(
                f"Held-out test accuracy ({held.usage}, {held.size:,} images no search step "
                f"saw or chose by): **{_pct(held.accuracy)}**."
            )
        )
    blocks.append(Figure(facts.figures["architecture"], "Layers, output shapes, parameters."))
    return blocks


def _ensemble(facts: ReportFacts) -> list[Block]:
    """The ensemble champion: members, weights, and the four accuracies on the report half."""
    found = facts.ensemble
    if found is None:
        return []
    t = found.table
    rows = [
        ["best single model", _pct(t.get("best_single"))],
        ["best single model + flip", _pct(t.get("best_single_flip"))],
        ["ensemble", _pct(t.get("ensemble"))],
        ["ensemble + flip", _pct(t.get("ensemble_flip"))],
    ]
    members = ", ".join(
        f"{m.name} (weight {m.weight:.2f}, {_pct(m.report_accuracy)})" for m in found.members
    )
    return [
        Heading("Champion: an ensemble of the search's trials", 3),
        Para(
            f"Members: {members}"
            + ("; each averaged with its prediction on the mirrored image." if found.flip else ".")
            + f" Members and weights were chosen on one half of the validation rows; the "
            f"accuracies below are on the other half ({found.report_rows:,} images), which "
            f"took no part in the choice."
        ),
        Table(["model", "accuracy on the report half"], rows),
    ]


def _question_2(facts: ReportFacts) -> list[Block]:
    rows = [
        [
            r.family.upper(),
            r.run_id[:8] + (" (this run)" if r.run_id == facts.run_id else ""),
            _pct(r.best_val_accuracy),
            _count(r.param_count),
        ]
        for r in facts.family_best
    ]
    by_family = {r.family: r for r in facts.family_best}
    cnn, dnn = by_family.get("cnn"), by_family.get("dnn")
    if cnn and dnn and cnn.best_val_accuracy is not None and dnn.best_val_accuracy is not None:
        gap = (cnn.best_val_accuracy - dnn.best_val_accuracy) * 100
        ratio = (
            f"; the DNN has {dnn.param_count / cnn.param_count:.2f}× the CNN's parameters"
            if cnn.param_count and dnn.param_count
            else ""
        )
        verdict = (
            f"The best CNN reaches {_pct(cnn.best_val_accuracy)} val accuracy against "
            f"{_pct(dnn.best_val_accuracy)} for the best DNN ({gap:+.1f} points){ratio}."
        )
    else:
        present = ", ".join(sorted(by_family)) or "none"
        verdict = (
            f"Only these families have finished runs in this search: {present}; "
            f"no CNN/DNN comparison is possible."
        )
    return [
        Heading("2. Best CNN vs best DNN"),
        Para(verdict),
        *[Warn(note) for note in facts.coursework_notes],
        Table(["family", "run", "best val accuracy", "parameters"], rows),
        Figure(facts.figures["learning_curves"], "Accuracy per epoch (training and validation)."),
    ]


def _question_3(facts: ReportFacts) -> list[Block]:
    if facts.confused:
        worst = facts.confused[0]
        text = (
            f"Most confused: {worst.true} is predicted as {worst.predicted} for "
            f"{worst.rate * 100:.0f} % of {worst.true} images ({worst.count})."
        )
    else:
        text = "No confusions: every image of the split is classified correctly."
    recall = ", ".join(f"{name} {_pct(value)}" for name, value in facts.recall.items())
    return [
        Heading("3. Which expressions are confused"),
        Para(text),
        Table(
            ["true → predicted", "share of true class", "images"],
            [
                [f"{p.true} → {p.predicted}", f"{p.rate * 100:.0f} %", str(p.count)]
                for p in facts.confused
            ],
        ),
        Para(f"Per-class recall: {recall}."),
        Figure(facts.figures["confusion_matrix"], "Confusion matrix: counts and row-normalised."),
    ]


def _question_4(facts: ReportFacts) -> list[Block]:
    if facts.gradcam_layer:
        gradcam = f"Grad-CAM at the last conv layer `{facts.gradcam_layer}`"
    elif facts.ensemble is not None:
        gradcam = "Grad-CAM is skipped: the ensemble's conv layers are inside its members"
    else:
        gradcam = "Grad-CAM is skipped: a DNN has no conv layer to read"
    blocks: list[Block] = [
        Heading("4. What the model looks at (saliency)"),
        Para(
            f"For each class, the most confident correct and the most confident wrong "
            f"prediction ({facts.saliency_examples} images): vanilla gradient, SmoothGrad and "
            f"{gradcam}. Maps explain the predicted class (softmax replaced by linear)."
        ),
        Figure(facts.figures["saliency"], "Saliency overlays per class."),
        Para(
            "Sanity check (Adebayo et al. 2018): the same maps after re-initialising every "
            "weight. Mean Spearman rank correlation, trained vs randomised: "
            + ", ".join(f"{m} {rho:.2f}" for m, rho in facts.sanity_rho.items())
            + f" (warning threshold {facts.sanity_threshold:.2f})."
        ),
    ]
    if facts.sanity_warnings:
        blocks += [Warn(text) for text in facts.sanity_warnings]
    else:
        blocks.append(
            Para("No method exceeds the threshold: the maps depend on the learnt weights.")
        )
    if "saliency_sanity" in facts.figures:
        blocks.append(Figure(facts.figures["saliency_sanity"], "Trained vs randomised weights."))
    return blocks


def _question_5(facts: ReportFacts) -> list[Block]:
    blocks: list[Block] = [Heading("5. What the filters respond to")]
    member = facts.ensemble.filters_member if facts.ensemble is not None else None
    if not facts.filters:
        blocks.append(
            Para(
                "No member of the ensemble has a conv layer: no filters to visualise."
                if facts.ensemble is not None
                else "The model has no conv layer (DNN): no filters to visualise."
            )
        )
        return blocks
    if member is not None:
        blocks.append(
            Para(
                f"The ensemble's filters are those of its members: drawn here for its "
                f"strongest CNN member, {member.name} (run {member.run_id[:8]}, "
                f"{_pct(member.report_accuracy)} on the report half)."
            )
        )
    blocks.append(
        Para(
            f"Gradient ascent ({facts.ascent_steps} steps, jitter, total-variation and L2 "
            f"regularisers) from grey noise, maximising each filter's mean activation; feature "
            f"maps of the same filters for {facts.feature_map_caption}."
        )
    )
    blocks.append(
        Table(
            ["layer", "measured at", "filters", "mean activation: noise → optimised", "raised"],
            [
                [
                    s.layer,
                    s.activation_layer,
                    ", ".join(map(str, s.filters)),
                    f"{s.start_mean:.3g} → {s.final_mean:.3g}",
                    f"{s.raised}/{len(s.filters)}",
                ]
                for s in facts.filters
            ],
        )
    )
    for summary in facts.filters:
        blocks.append(
            Figure(facts.figures[f"filters:{summary.layer}"], f"{summary.layer}: ascent images.")
        )
        blocks.append(
            Figure(
                facts.figures[f"feature_maps:{summary.layer}"], f"{summary.layer}: feature maps."
            )
        )
    return blocks


# ---------------------------------------------------------------- rendering


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    """Markdown with images linked relative to the artifact root (figures/…)."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Para):
            out.append(block.text)
        elif isinstance(block, Warn):
            out.append(f"> **Warning:** {block.text}")
        elif isinstance(block, Table):
            if not block.rows:
                continue
            out.append("| " + " | ".join(map(_md_cell, block.headers)) + " |")
            out.append("|" + "---|" * len(block.headers))
            out += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
        elif isinstance(block, Figure):
            out.append(f"![{block.caption}]({FIGURES_DIR}/{block.name})")
        out.append("")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then the two markdown spans the report uses: `code` and **bold**."""
    escaped = html.escape(text)
    parts = escaped.split("`")
    escaped = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = escaped.split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       background: #f4f5f7; color: #1d2330; line-height: 1.5; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.6em; border-bottom: 2px solid #3b6bb5; padding-bottom: 6px; }
h2 { font-size: 1.25em; margin-top: 2em; color: #24457a; }
h3 { font-size: 1.05em; margin-top: 1.5em; }
code { background: #eef1f5; padding: 1px 4px; border-radius: 3px; font-size: 0.92em; }
table { border-collapse: collapse; margin: 12px 0; font-size: 0.93em; }
th, td { border: 1px solid #d3d8e0; padding: 4px 10px; text-align: left; }
th { background: #e3eaf5; }
tr:nth-child(even) td { background: #f8f9fb; }
figure { margin: 16px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e0e3e8; }
figcaption { font-size: 0.88em; color: #5a6372; }
.warn { background: #fff4e0; border-left: 4px solid #e69500; padding: 8px 12px; margin: 10px 0; }
"""


def render_html(blocks: list[Block], figures_dir: Path) -> str:
    """One HTML file; every figure embedded as a base64 data URI."""
    body: list[str] = []
    title = "FER2013 model report"
    for block in blocks:
        if isinstance(block, Heading):
            if block.level == 1:
                title = block.text
            body.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            body.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Warn):
            body.append(f'<div class="warn"><strong>Warning:</strong> {_inline(block.text)}</div>')
        elif isinstance(block, Table):
            if not block.rows:
                continue
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
            rows = "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                for row in block.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(block, Figure):
            path = figures_dir / block.name
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            alt = html.escape(block.caption, quote=True)
            body.append(
                f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(block.caption)}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        "<body><main>\n" + "\n".join(body) + "\n</main></body>\n</html>\n"
    )


def write_reports(facts: ReportFacts, root: Path) -> tuple[Path, Path]:
    """Write report.md and report.html into `root` (figures already under root/figures)."""
    blocks = build_blocks(facts)
    figures_dir = root / FIGURES_DIR
    missing = [
        b.name for b in blocks if isinstance(b, Figure) and not (figures_dir / b.name).exists()
    ]
    if missing:
        raise FileNotFoundError(f"report: expected figures under {figures_dir}, missing {missing}")
    md_path, html_path = root / REPORT_MD, root / REPORT_HTML
    md_path.write_text(render_markdown(blocks), encoding="utf-8")
    html_path.write_text(render_html(blocks, figures_dir), encoding="utf-8")
    return md_path, html_path
