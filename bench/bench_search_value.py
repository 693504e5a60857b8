"""Does the search earn its budget? Its champion against the known-good CNN trained by hand.

    python -m bench.bench_search_value --data $FER2013_PATH --json out.json
    python -m bench.bench_search_value --data $FER2013_PATH --regimes large --minutes 2 \
        --fraction 0.02   # a smoke run

Per regime, one after the other in this process, each arm in a fresh temporary tracking store:
- baseline (`bench/value_baseline.py`): the known-good CNN trained by hand with the same
  budget and machine, one copy per trial slot, each with its own seed, on a cosine sized to
  end with the budget; the mean of the copies' flip-averaged probabilities.
- search: `run_search` with its defaults on the same data and budget; its registered champion
  (the ensemble or the best single model) is scored. In the `large` regime a second search
  runs right after in the same store (a search with memory reuses the first one's trials).
Both are scored on the `report` half of PublicTest, as the search's ensemble states its
accuracies; `search_gain_points` = (search - baseline) x 100.

Regimes: `hour` (every row, 60 minutes) and `large` (10 % of the training rows, stratified,
all PublicTest rows: a budget large against the cost of one model, 20 minutes or, on a machine
where one model is dear, 1.25 times the models per slot from which the search explores there,
sized before the arms from a calibration as the search's own; `--minutes` skips the sizing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.value_baseline import baseline_record, report_accuracy, run_baseline

ROOT = Path(__file__).resolve().parent.parent
SEARCH_NAME = "search-value"


@dataclass(frozen=True)
class Regime:
    minutes: float  # the budget of each arm (at least, where `explore_margin` raises it)
    fraction: float  # share of the training rows (stratified); PublicTest stays whole
    second_search: bool  # a second search right after the first, in the same store
    # > 0: the minutes are raised, on a machine where one model is dear, to this many times the
    # models per slot from which the search explores (`sized_minutes`); 0: as given.
    explore_margin: float = 0.0


REGIMES = {
    "hour": Regime(minutes=60.0, fraction=1.0, second_search=False),
    # Large against one model's cost on any machine: 20 minutes where that already is (a GPU),
    # more on two CPU cores, where 20 minutes held 2.3 models per slot and nothing explored.
    "large": Regime(minutes=20.0, fraction=0.1, second_search=True, explore_margin=1.25),
}


def training_subset(data: str, fraction: float, seed: int, dst: Path) -> str:
    """A fer2013-format CSV with a stratified `fraction` of the Training rows and every
    PublicTest row (both arms are judged on the same rows); `data` itself at 1.0."""
    if fraction >= 1.0:
        return data
    from model.batches import stratified_indices
    from model.data import load_fer2013

    dataset = load_fer2013(data)
    training = np.flatnonzero(dataset.usage == "Training")
    keep = training[stratified_indices(dataset.labels[training], fraction, seed)]
    rows = np.sort(np.concatenate([keep, np.flatnonzero(dataset.usage == "PublicTest")]))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w") as out:
        out.write("emotion,pixels,Usage\n")
        for row in rows:
            pixels = " ".join(map(str, dataset.images[row].ravel().tolist()))
            out.write(f"{int(dataset.labels[row])},{pixels},{dataset.usage[row]}\n")
    return str(dst)


def combine_members(members: list[Any], weights: list[float], flip: bool) -> np.ndarray:
    """An ensemble champion's probabilities from its members' logged ones, as the search
    states them (model/ensemble.py)."""
    from model.ensemble import Selection, with_flip

    selection = Selection(tuple(range(len(members))), tuple(weights), flip)
    return selection.combine(
        [with_flip(m.probabilities, m.probabilities_flipped, flip) for m in members]
    )


def gain_points(better: float | None, than: float | None) -> float | None:
    """(better - than) x 100, in accuracy points; None where either is missing."""
    if better is None or than is None:
        return None
    return round(100.0 * (better - than), 3)


def champion_predictions(client: Any, parent_id: str, dst: Path) -> tuple[Any, Any, list[str]]:
    """The registered champion's probabilities on the validation rows, its labels and members
    (None, None, [] where the search has no champion)."""
    from schema import run as layout

    tags = client.get_run(parent_id).data.tags
    run_id = tags.get(layout.TAG_CHAMPION_RUN)
    if not run_id:
        return None, None, []
    run = client.get_run(run_id)
    if tags.get(layout.TAG_CHAMPION) == layout.ENSEMBLE:
        ids = run.data.tags[layout.TAG_MEMBERS].split(",")
        weights = [float(w) for w in run.data.params["weights"].split(",")]
        members = [layout.download_predictions(client, i, dst / i) for i in ids]
        probabilities = combine_members(members, weights, run.data.params["flip"] == "True")
        return probabilities, members[0].labels, run.data.params["members"].split(",")
    found = layout.download_predictions(client, run_id, dst / run_id)
    return found.probabilities, found.labels, [run.info.run_name]


def reused_trials(client: Any, parent_id: str) -> dict[str, str] | None:
    """What the parent run logs about trials reused from earlier searches, under any name
    schema/run.py spells with REUSED (metric, param or tag); None where there is none."""
    from schema import run as layout

    keys = [
        value
        for name in dir(layout)
        if "REUSED" in name.upper() and isinstance(value := getattr(layout, name), str)
    ]
    data = client.get_run(parent_id).data
    found = {
        key: str(source[key])
        for key in keys
        for source in (data.metrics, data.params, data.tags)
        if key in source
    }
    return found or None


def run_search_arm(settings: Any, uri: str, dst: Path) -> dict[str, Any]:
    """One search with these settings; its champion scored on the report half."""
    from mlflow.tracking import MlflowClient

    from bench.bench_budget import summarise
    from jobs.search import run_search
    from schema import run as layout

    result = run_search(settings)
    client = MlflowClient(uri)
    summary = summarise(uri, settings.name)
    probabilities, labels, members = champion_predictions(client, result.parent_run_id, dst)
    tags = client.get_run(result.parent_run_id).data.tags
    started = summary.get("budget_trials_started")  # a metric: a float

    return {
        "reference_images_per_second": summary.get("reference_images_per_second"),
        "trials": None if started is None else int(started),
        "minutes": round(result.wall_seconds / 60, 2),
        "members": members,
        "strategy": result.strategy,
        "champion": tags.get(layout.TAG_CHAMPION),
        "best_val_accuracy": result.best_val_accuracy,
        "ensemble_gain_points": summary.get("ensemble_gain_points"),
        "refused": len(result.refused),
        "trial_results": [
            {k: t.get(k) for k in ("name", "best_val_accuracy", "epochs_done", "status")}
            for t in summary.get("budget_trials", [])
        ],
        "reused_trials": reused_trials(client, result.parent_run_id),
        "report_accuracy": None
        if probabilities is None
        else round(report_accuracy(probabilities, labels, settings.seed), 4),
        "_labels": labels,
    }


class _Store:
    """This process's MLflow store and experiment for a while (restored on exit)."""

    NAMES = (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_RUN_ID",
        "MLFLOW_EXPERIMENT_ID",
    )

    def __init__(self, workdir: Path, experiment: str) -> None:
        self.uri = f"sqlite:///{workdir}/mlflow.db"
        self.experiment = experiment

    def __enter__(self) -> str:
        import mlflow

        self.saved = {k: os.environ.pop(k, None) for k in self.NAMES}
        os.environ.update(MLFLOW_TRACKING_URI=self.uri, MLFLOW_EXPERIMENT_NAME=self.experiment)
        mlflow.set_tracking_uri(self.uri)
        return self.uri

    def __exit__(self, *exc: object) -> None:
        import mlflow

        for key, value in self.saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
        mlflow.set_tracking_uri(self.saved["MLFLOW_TRACKING_URI"])


def sized_minutes(settings: Any, regime: Regime) -> tuple[float, dict[str, Any]]:
    """The regime's minutes, raised to `explore_margin` times the models per slot from which a
    search of `settings` explores on this machine (it calibrates, as the search does), and what
    they were sized from."""
    import math

    import ray

    from jobs.search.driver import strategy_for

    try:
        probe = strategy_for(settings)
    finally:
        ray.shutdown()  # the baseline starts its own processes on a quiet machine
    if probe.model_seconds <= 0:
        return regime.minutes, {"model_minutes": None, "reason": probe.reason}
    wanted = regime.explore_margin * probe.explore_min_models * probe.model_seconds / 60
    minutes = float(max(regime.minutes, math.ceil(wanted)))
    return minutes, {
        "model_minutes": round(probe.model_seconds / 60, 2),
        "explore_min_models": round(probe.explore_min_models, 2),
        "explore_margin": regime.explore_margin,
        "models_per_slot": round(minutes * 60 / probe.model_seconds, 2),
    }


def run_regime(
    name: str,
    data: str,
    minutes: float,
    fraction: float,
    workdir: Path,
    sized: bool = False,
    second_search: bool = True,
) -> dict:
    """Baseline, then the search (twice in the `large` regime, unless not `second_search`),
    each in a fresh store; with `sized`, the minutes raised where one model is dear here
    (`sized_minutes`)."""
    import dataclasses

    import ray

    from jobs.settings import SearchSettings

    regime = REGIMES[name]
    if not second_search:
        regime = dataclasses.replace(regime, second_search=False)
    settings = SearchSettings(
        data=training_subset(data, fraction, SearchSettings.seed, workdir / "data.csv"),
        time_budget_min=minutes,
        storage=str(workdir / "search" / "tune"),
        name=SEARCH_NAME,
    )
    sizing: dict[str, Any] = {}
    if sized:
        minutes, sizing = sized_minutes(settings, regime)
        settings = dataclasses.replace(settings, time_budget_min=minutes)
        arms = 3 if regime.second_search else 2
        print(
            f"search value, {name}: {minutes:g} min per arm, about {arms * minutes:g} min in "
            f"all ({sizing})",
            flush=True,
        )
    print(f"search value, {name}: baseline, {minutes:g} min, rows {fraction:g}", flush=True)
    records, predictions, seconds = run_baseline(
        settings.data, minutes, workdir / "baseline", settings.cpus_per_trial, settings.seed
    )
    baseline = baseline_record(records, predictions, seconds, settings.seed)
    searches = []
    (workdir / "search").mkdir(parents=True, exist_ok=True)
    with _Store(workdir / "search", SEARCH_NAME) as uri:
        try:
            for repeat in range(2 if regime.second_search else 1):
                print(f"search value, {name}: search {repeat + 1}", flush=True)
                dst = workdir / "search" / f"champion-{repeat}"
                searches.append(run_search_arm(settings, uri, dst))
        finally:
            ray.shutdown()  # the next regime's baseline runs on a quiet machine
    for arm in searches:
        labels = arm.pop("_labels")
        if labels is not None and not np.array_equal(labels, baseline["_labels"]):
            raise ValueError(
                f"{name}: the search's champion predicted other rows than the baseline"
            )
    baseline.pop("_labels")
    first = searches[0]
    result = {
        f"search_gain_points_{name}": gain_points(
            first["report_accuracy"], baseline["report_accuracy"]
        ),
        f"search_value_{name}": {
            "minutes_budget": minutes,
            "train_fraction": fraction,
            **({"sizing": sizing} if sizing else {}),
            "baseline": baseline,
            "search": first,
        },
    }
    if regime.second_search:
        second = searches[1]
        result[f"search_value_{name}"]["second_search"] = second
        result["warm_start_gain_points"] = gain_points(
            second["report_accuracy"], first["report_accuracy"]
        )
        result["warm_start_reused_trials"] = second["reused_trials"]
    return result


def run(
    data: str,
    regimes: tuple[str, ...] = tuple(REGIMES),
    minutes: float | None = None,
    fraction: float | None = None,
    second_search: bool = True,
) -> dict[str, Any]:
    """Every regime asked for (`minutes` and `fraction` override theirs: smoke runs; without
    `second_search`, the large regime's second search is left out: an arm less)."""
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown:
        raise ValueError(f"regimes: expected names from {sorted(REGIMES)}, got {unknown}")
    if minutes is not None and minutes <= 0:
        raise ValueError(f"minutes: expected > 0, got {minutes}")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction: expected a number in (0, 1], got {fraction}")
    from jobs.cli import setup_logging
    from schema.cli import import_tensorflow

    setup_logging()  # the search's decisions (its strategy, the final's plans) in the log
    import_tensorflow()  # without its load-time noise, as in `make run`
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    results: dict[str, Any] = {
        "search_value_run_date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "search_value_commit": commit,
    }
    from jobs.data import resolve_data

    data = resolve_data(data)  # the baseline's processes run from the project root
    errors: dict[str, str] = {}
    for name in regimes:
        regime = REGIMES[name]
        try:
            with tempfile.TemporaryDirectory(prefix=f"fer-value-{name}-") as tmp:
                found = run_regime(
                    name,
                    data,
                    regime.minutes if minutes is None else minutes,
                    regime.fraction if fraction is None else fraction,
                    Path(tmp),
                    sized=minutes is None and regime.explore_margin > 0,
                    second_search=second_search,
                )
            # Each regime says when and at which commit it ran: a later run of the other
            # regime keeps it (bench/results/search_value.json).
            when = {"run_date": results["search_value_run_date"], "commit": commit}
            found[f"search_value_{name}"] |= when
            if "warm_start_gain_points" in found:
                # Kept by a later run without the second search (`--first-search-only`).
                found["warm_start_run"] = when
            results.update(found)
        except Exception as error:  # one regime failing must not lose the other's hours
            errors[name] = f"{type(error).__name__}: {error}"
            print(f"search value, {name}: failed: {errors[name]}", flush=True)
    if errors and len(errors) == len(regimes):
        raise RuntimeError(f"every regime failed: {errors}")
    if errors:
        results["search_value_errors"] = errors
    return results


def details(results: dict[str, Any], fmt: Callable[[Any], str]) -> list[str]:
    """BENCHMARKS.md's lines on each regime: both arms' accuracy, cost and machine speed."""
    lines = []
    for regime in ("hour", "large"):
        found = results.get(f"search_value_{regime}")
        if not found:
            continue
        arms = [("by hand", found["baseline"]), ("search", found["search"])]
        if "second_search" in found:
            arms.append(("second search, same store", found["second_search"]))
        described = "; ".join(
            f"{label}: {fmt(arm.get('report_accuracy'))} with {arm.get('trials')} trials in "
            f"{fmt(arm.get('minutes'))} min (members {', '.join(arm.get('members') or []) or '—'}"
            f"; reference CNN {fmt(arm.get('reference_images_per_second'))} images/s)"
            for label, arm in arms
        )
        sizing = found.get("sizing") or {}
        sized = (
            f", sized from one model of {fmt(sizing.get('model_minutes'))} min and exploring "
            f"from {fmt(sizing.get('explore_min_models'))} models per slot: "
            f"{fmt(sizing.get('models_per_slot'))} per slot"
            if sizing.get("model_minutes")
            else ""
        )
        when = (
            f" (run {found['run_date']}, commit `{found.get('commit')}`)"
            if found.get("run_date")
            else ""
        )
        lines.append(
            f"- search value, {regime}{when} ({fmt(found.get('minutes_budget'))} min{sized}, "
            f"{fmt(found.get('train_fraction'))} of the training rows), report half of "
            f"PublicTest ({found['baseline'].get('report_rows')} rows): {described}."
            + (
                f" The second search's parent run on reused trials: "
                f"{found['second_search'].get('reused_trials') or 'nothing logged'}."
                if "second_search" in found
                else ""
            )
        )
    lines += _warm_start_kept(results, fmt)
    if results.get("search_value_errors"):
        lines.append(f"- search value failed in: {results['search_value_errors']}.")
    return lines


def _warm_start_kept(results: dict[str, Any], fmt: Callable[[Any], str]) -> list[str]:
    """The warm-start figures where they come from an earlier run than the large regime's
    (its last run left the second search out): that run's date, commit and reuse."""
    run = results.get("warm_start_run") or {}
    large = results.get("search_value_large") or {}
    if "warm_start_gain_points" not in results or "second_search" in large:
        return []
    when = f"run {run['run_date']}, commit `{run.get('commit')}`" if run else "an earlier run"
    return [
        f"- warm start ({when}; the large regime's last run left the second search out): the "
        f"second search in the same store {fmt(results['warm_start_gain_points'])} points on "
        f"the first; its parent run on reused trials: "
        f"{results.get('warm_start_reused_trials') or 'nothing logged'}."
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FER2013_PATH", ""))
    parser.add_argument("--regimes", default=",".join(REGIMES), help="comma list: hour,large")
    parser.add_argument("--minutes", type=float, help="every regime's budget (smoke runs)")
    parser.add_argument("--fraction", type=float, help="every regime's share of training rows")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--first-search-only",
        action="store_true",
        help="leave out the large regime's second search",
    )
    args = parser.parse_args(argv)
    if not args.data:
        parser.error("--data or FER2013_PATH is required")
    regimes = tuple(r.strip() for r in args.regimes.split(",") if r.strip())
    results = run(
        args.data, regimes, args.minutes, args.fraction, second_search=not args.first_search_only
    )
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
