"""report.md and a self-contained report.html answering the five coursework questions.

Order: a summary a reader can act on (champion, accuracies, the search, how to serve it), the
champion (an ensemble's members and comparison table), then questions 1-5 (viz/sections.py).
Question 1 is always answered for a CNN: the champion, its strongest CNN member, or the
search's best CNN, next to what happened to the coursework CNN SEED2017.
"""

from __future__ import annotations

from pathlib import Path

from schema.run import CHAMPION_ALIAS, MLFLOW_MODEL_NAME, REGISTERED_MODEL, STRATEGY_EXPLOIT
from viz import sections
from viz.blocks import Block, Heading, Para, Table, write_blocks
from viz.facts import HELD_OUT_USAGE, ReportFacts, describe_champion, pct
from viz.search import SearchFacts

REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def build_blocks(facts: ReportFacts) -> list[Block]:
    """The report's content, in order."""
    is_champion = facts.search is not None and facts.search.champion_run_id == facts.run_id
    title = "FER2013 expression model" + (" (search champion)" if is_champion else "")
    blocks: list[Block] = [
        Heading(f"{title}: {describe_champion(facts)}, {pct(facts.accuracy)} on {facts.split}", 1)
    ]
    blocks += _summary(facts, is_champion)
    blocks += sections.champion(facts)
    blocks += sections.question_1(facts)
    blocks += sections.question_2(facts)
    blocks += sections.question_3(facts)
    blocks += sections.question_4(facts)
    blocks += sections.question_5(facts)
    if facts.timings:
        blocks.append(Heading("Timings", 3))
        blocks.append(
            Table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in facts.timings.items()])
        )
    return blocks


def _summary(facts: ReportFacts, is_champion: bool) -> list[Block]:
    run = f"run `{facts.run_id}`"
    what = f"**Model**: {describe_champion(facts)} ({run})"
    if facts.ensemble is not None:
        what += (
            ": "
            + ", ".join(f"{m.name} ×{m.weight:.2f}" for m in facts.ensemble.members)
            + (", each averaged with its mirrored image" if facts.ensemble.flip else "")
        )
    if facts.search is not None:
        what += (
            ". It is the search's champion" if is_champion else ". It is not the search's champion"
        )
        if is_champion and facts.search.champion_reason:
            what += f": {facts.search.champion_reason}"
    blocks: list[Block] = [Heading("Summary"), Para(what + ".")]
    accuracy = (
        f"**Accuracy**: {pct(facts.accuracy)} on {facts.split} "
        f"({facts.split_size:,} images"
        + (
            "; the search chose its trials by these rows)"
            if facts.val_usage == facts.split
            else ")"
        )
    )
    if facts.ensemble is not None:
        chosen = facts.ensemble.table.chosen(facts.ensemble.flip)
        accuracy += (
            f"; {pct(chosen)} on the report half ({facts.ensemble.report_rows:,} of them, "
            f"which took no part in choosing the ensemble)"
        )
    blocks.append(Para(accuracy + "."))
    held = facts.held_out
    if held is not None:
        blocks.append(
            Para(
                f"**Held-out accuracy**: **{pct(held.accuracy)}** on {held.usage} "
                f"({held.size:,} images no step of the search saw or chose by; stated here, "
                f"used for nothing)."
            )
        )
    else:
        blocks.append(
            Para(
                f"**Held-out accuracy**: none: `{facts.data_source}` has no {HELD_OUT_USAGE} "
                f"rows (the full Kaggle file has them), so every accuracy here is on rows the "
                f"search chose by."
            )
        )
    if facts.search is not None:
        blocks.append(Para(_search_sentence(facts.search)))
    blocks.append(Para(_use_sentence(facts, is_champion)))
    blocks.append(
        Para(
            f"Data: `{facts.data_source}` (SHA-256 `{facts.data_sha256[:16]}…`, data fraction "
            f"{facts.data_fraction:g}). The model file's SHA-256 matched the run's record and "
            f"it loaded with safe_mode=True."
        )
    )
    return blocks


def _search_sentence(search: SearchFacts) -> str:
    if search.minutes is None:
        took = "an unknown time"
    else:
        took = f"{search.minutes:.0f} minutes" if search.minutes >= 1 else "under a minute"
    budget = f" of a {search.budget_minutes:g}-minute budget" if search.budget_minutes else ""
    statuses = ", ".join(
        f"{n} {status.replace('_', ' ')}" for status, n in sorted(search.statuses.items())
    )
    finals = (
        f"; {search.finals} of them final trials, continuing the best explored ones on every row"
        if search.finals
        else ""
    )
    if search.strategy == STRATEGY_EXPLOIT:
        finals = (
            "; it did not explore: it trained seeded copies of the best known config on every row "
            "for the whole budget"
        )
    families = ", ".join(f.upper() for f in search.families) or "none"
    why = f" Strategy {search.strategy}: {search.strategy_reason}." if search.strategy else ""
    return (
        f"**Search**: `{search.name}` took {took}{budget} and tried {search.trials} trials "
        f"({families}): {statuses or 'none'}{finals}. Refused trials were never started "
        f"(too slow for the time left, or too big for a worker).{why}"
    )


def _use_sentence(facts: ReportFacts, is_champion: bool) -> str:
    registered = f"models:/{REGISTERED_MODEL}@{CHAMPION_ALIAS}"
    own = facts.model_uri or f"runs:/{facts.run_id}/{MLFLOW_MODEL_NAME}"
    uri = registered if is_champion else own
    text = f'**Use it**: `mlflow.keras.load_model("{uri}")` in Python'
    if is_champion:
        text += f"; `make serve` serves the registered champion `{registered}` over HTTP"
    return (
        text + f"; the Keras file alone is `model/model.keras` of run `{facts.run_id[:8]}` "
        f"(`keras.saving.load_model(path, safe_mode=True)`; it takes raw 48×48 grey pixels)."
    )


def write_reports(facts: ReportFacts, root: Path) -> tuple[Path, Path]:
    """Write report.md and report.html into `root` (figures already under root/figures)."""
    return write_blocks(build_blocks(facts), root, REPORT_MD, REPORT_HTML)
