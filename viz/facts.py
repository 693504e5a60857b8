"""What the report states, gathered by `run_viz` (viz/main.py) and told by viz/report.py and
viz/sections.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from viz.champion import EnsembleFacts
from viz.confusion import ConfusedPair
from viz.curves import FamilyRun, LayerRow
from viz.recipe import Recipe
from viz.search import SearchFacts

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
class ModelFacts:
    """One trained model as the report presents it: layers, recipe, accuracy."""

    run_id: str
    name: str  # the run's name (the trial's plan name)
    family: str
    role: str  # how the report came to it: "the champion", "its strongest CNN member", ...
    layers: list[LayerRow]
    params_total: int
    params_trainable: int
    recipe: Recipe | None  # None for an ensemble (its members carry theirs)
    accuracy: float | None = None  # recomputed on the report's split
    best_val_accuracy: float | None = None  # recorded by the run
    report_accuracy: float | None = None  # an ensemble member's, on the report half


@dataclass
class ReportFacts:
    """Everything the report states, gathered by `run_viz`."""

    run_id: str
    run_name: str
    family: str
    model_name: str
    params_total: int
    split: str
    split_size: int
    accuracy: float
    best_val_accuracy: float | None
    val_usage: str | None
    data_source: str
    data_sha256: str
    data_fraction: float
    model_uri: str  # the run's MLflow Keras flavour ("" when not logged)
    champion: ModelFacts | None  # the visualised run when it is a single model
    cnn: ModelFacts | None  # question 1's CNN (None: the search trained no CNN with a model)
    seed2017: str  # what happened to SEED2017, in words
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
    figures: dict[str, str]  # FigureKind.key() -> its file name under figures/
    timings: dict[str, float] = field(default_factory=dict)
    # What the search said of coursework models its budget could not train (fer.coursework_note)
    coursework_notes: list[str] = field(default_factory=list)
    ensemble: EnsembleFacts | None = None  # when the run is the search's ensemble
    held_out: HeldOut | None = None  # accuracy on held-out test rows, where the data has them
    search: SearchFacts | None = None  # None for a run outside a search
    # Questions 4 and 5 on a member (an ensemble has no conv layer of its own): which one.
    explained_by: ModelFacts | None = None


def pct(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value * 100:.1f} %"


def count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def describe_champion(facts: ReportFacts) -> str:
    """The visualised model in a few words (the title and the summary)."""
    if facts.ensemble is not None:
        return f"an ensemble of {len(facts.ensemble.members)} trials"
    return f"{facts.family.upper()} {facts.run_name or facts.model_name}"
