"""The report's sections after its summary: the champion, then the five coursework questions."""

from __future__ import annotations

from viz.blocks import Block, Figure, Heading, Para, Table, Warn
from viz.facts import ModelFacts, ReportFacts, count, pct
from viz.figure_names import FigureKind


def champion(facts: ReportFacts) -> list[Block]:
    """An ensemble's members, weights and comparison table; a single model's layers and recipe
    unless question 1 presents it anyway."""
    found = facts.ensemble
    if found is None:
        model = facts.champion
        if model is None or (facts.cnn is not None and facts.cnn.run_id == model.run_id):
            return []
        return [Heading("The model"), *model_blocks(model)]
    t = found.table
    rows = [
        ["best single model", pct(t.best_single)],
        ["best single model + flip", pct(t.best_single_flip)],
        ["ensemble", pct(t.ensemble)],
        ["ensemble + flip", pct(t.ensemble_flip)],
    ]
    members = [
        [m.name, m.family.upper(), f"{m.weight:.2f}", pct(m.report_accuracy), m.run_id[:8]]
        for m in found.members
    ]
    return [
        Heading("The champion: an ensemble of the search's trials"),
        Para(
            "Its prediction is the weighted mean of its members' class probabilities"
            + (", each averaged with its prediction on the mirrored image." if found.flip else ".")
            + f" Members and weights were chosen on one half of the validation rows; the "
            f"accuracies below are on the other half ({found.report_rows:,} images), which "
            f"took no part in the choice."
        ),
        Table(["member", "family", "weight", "accuracy on the report half", "run"], members),
        Table(["model", "accuracy on the report half"], rows),
    ]


def model_blocks(model: ModelFacts) -> list[Block]:
    """A model's layer table, its training recipe and its phases."""
    blocks: list[Block] = [
        Para(
            f"{model.role[:1].upper()}{model.role[1:]}: `{model.name}` (run `{model.run_id[:8]}`), "
            f"{len(model.layers)} layers, {model.params_total:,} parameters "
            f"({model.params_trainable:,} trainable)."
        ),
        Table(
            ["layer", "type", "output shape", "parameters"],
            [[r.name, r.kind, r.output_shape, f"{r.params:,}"] for r in model.layers],
        ),
    ]
    recipe = model.recipe
    if recipe is None:
        return blocks
    blocks.append(Para("**Training recipe**:"))
    blocks.append(Table(["setting", "value"], [[k, v] for k, v in recipe.settings]))
    blocks.append(
        Table(
            ["phase", "run", "epochs", "training rows per epoch", "schedule", "best val accuracy"],
            [
                [
                    p.name,
                    p.run_name,
                    str(p.epochs),
                    _rows(p.rows, p.train_fraction),
                    p.schedule,
                    pct(p.best_val_accuracy),
                ]
                for p in recipe.phases
            ],
        )
    )
    if len(recipe.phases) > 1:
        explored, final = recipe.phases[0], recipe.phases[-1]
        blocks.append(
            Para(
                f"{recipe.epochs} epochs in all: {explored.epochs} explored on "
                f"{_rows(explored.rows, explored.train_fraction)} per epoch, then "
                f"{final.epochs} final epochs on {_rows(final.rows, final.train_fraction)}, "
                f"starting from the explored trial's best-epoch weights with a fresh optimizer."
            )
        )
    return blocks


def _rows(rows: int | None, fraction: float) -> str:
    share = "every row" if fraction >= 1 else f"{fraction:g} of the rows"
    return share if rows is None else f"{rows:,} ({share})"


def question_1(facts: ReportFacts) -> list[Block]:
    blocks: list[Block] = [Heading("1. A CNN: architecture, training and accuracy")]
    cnn = facts.cnn
    if cnn is None:
        blocks.append(Para("The search has no trained CNN with a saved model to present."))
        blocks.append(Para(facts.seed2017))
        return blocks
    blocks += model_blocks(cnn)
    parts = []
    if cnn.accuracy is not None:
        parts.append(f"**{pct(cnn.accuracy)}** on {facts.split} ({facts.split_size:,} images)")
    if cnn.best_val_accuracy is not None:
        parts.append(f"{pct(cnn.best_val_accuracy)} best val accuracy as recorded by its run")
    if cnn.report_accuracy is not None:
        parts.append(f"{pct(cnn.report_accuracy)} on the ensemble's report half")
    blocks.append(Para("Accuracy: " + ("; ".join(parts) or "not measured") + "."))
    if (
        cnn.accuracy is not None
        and cnn.best_val_accuracy is not None
        and facts.val_usage == facts.split
        and abs(cnn.best_val_accuracy - cnn.accuracy) > 0.005
    ):
        blocks.append(
            Warn(
                f"Recomputed accuracy {pct(cnn.accuracy)} differs from the recorded "
                f"{pct(cnn.best_val_accuracy)} on the same split: the saved model may not "
                f"be the best epoch, or the data differs."
            )
        )
    blocks.append(Para(facts.seed2017))
    return blocks


def question_2(facts: ReportFacts) -> list[Block]:
    marked = {facts.run_id: "this report's model"}
    if facts.cnn is not None:
        marked.setdefault(facts.cnn.run_id, "question 1")
    rows = [
        [
            r.family.upper(),
            (r.name or r.run_id[:8]) + (f" ({marked[r.run_id]})" if r.run_id in marked else ""),
            pct(r.best_val_accuracy),
            count(r.param_count),
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
            f"The best CNN reaches {pct(cnn.best_val_accuracy)} val accuracy against "
            f"{pct(dnn.best_val_accuracy)} for the best DNN ({gap:+.1f} points){ratio}."
        )
    else:
        present = ", ".join(sorted(by_family)) or "none"
        verdict = (
            f"Only these families have finished runs in this search: {present}; "
            f"no CNN/DNN comparison is possible."
        )
    blocks: list[Block] = [
        Heading("2. Best CNN vs best DNN"),
        Para(verdict),
        *[Warn(note) for note in facts.coursework_notes],
        Table(["family", "run", "best val accuracy", "parameters"], rows),
    ]
    if FigureKind.LEARNING_CURVES.key() in facts.figures:
        blocks.append(
            Figure(
                facts.figures[FigureKind.LEARNING_CURVES.key()],
                "Accuracy per epoch (training and validation). A final trial's curve starts "
                "with the epochs of the explored trial it continued; the dotted line marks "
                "where its epochs on every row begin.",
            )
        )
    return blocks


def question_3(facts: ReportFacts) -> list[Block]:
    if facts.confused:
        worst = facts.confused[0]
        text = (
            f"Most confused: {worst.true} is predicted as {worst.predicted} for "
            f"{worst.rate * 100:.0f} % of {worst.true} images ({worst.count})."
        )
    else:
        text = "No confusions: every image of the split is classified correctly."
    recall = ", ".join(f"{name} {pct(value)}" for name, value in facts.recall.items())
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
        Figure(
            facts.figures[FigureKind.CONFUSION_MATRIX.key()],
            "Confusion matrix: counts and row-normalised.",
        ),
    ]


def _explained_by(facts: ReportFacts, what: str) -> list[Block]:
    member = facts.explained_by
    if member is None:
        return []
    return [
        Para(
            f"The ensemble has no conv layer of its own: {what} of its strongest CNN member, "
            f"`{member.name}` (run `{member.run_id[:8]}`, {pct(member.report_accuracy)} on "
            f"the report half), the CNN of question 1."
        )
    ]


def question_4(facts: ReportFacts) -> list[Block]:
    if facts.gradcam_layer:
        gradcam = f"Grad-CAM at the last conv layer `{facts.gradcam_layer}`"
    elif facts.ensemble is not None:
        gradcam = "no Grad-CAM: no member of the ensemble has a conv layer"
    else:
        gradcam = "no Grad-CAM: a DNN has no conv layer to read"
    blocks: list[Block] = [
        Heading("4. What the model looks at (saliency)"),
        *_explained_by(facts, "the maps below explain the predictions"),
        Para(
            f"For each class, the most confident correct and the most confident wrong "
            f"prediction ({facts.saliency_examples} images): vanilla gradient, SmoothGrad and "
            f"{gradcam}. Maps explain the predicted class (softmax replaced by linear)."
        ),
        Figure(facts.figures[FigureKind.SALIENCY.key()], "Saliency overlays per class."),
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
    if FigureKind.SALIENCY_SANITY.key() in facts.figures:
        blocks.append(
            Figure(
                facts.figures[FigureKind.SALIENCY_SANITY.key()], "Trained vs randomised weights."
            )
        )
    return blocks


def question_5(facts: ReportFacts) -> list[Block]:
    blocks: list[Block] = [Heading("5. What the filters respond to")]
    if not facts.filters:
        blocks.append(
            Para(
                "No member of the ensemble has a conv layer: no filters to visualise."
                if facts.ensemble is not None
                else "The model has no conv layer (DNN): no filters to visualise."
            )
        )
        return blocks
    blocks += _explained_by(facts, "the filters below are those")
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
            Figure(
                facts.figures[FigureKind.FILTERS.key(summary.layer)],
                f"{summary.layer}: ascent images.",
            )
        )
        blocks.append(
            Figure(
                facts.figures[FigureKind.FEATURE_MAPS.key(summary.layer)],
                f"{summary.layer}: feature maps.",
            )
        )
    return blocks
