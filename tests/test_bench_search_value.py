"""The search-value benchmark: how each arm is scored, and that it runs end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from bench import bench_search_value as value
from bench import run_all
from bench.value_baseline import baseline_record, baseline_settings, flip_mean, report_accuracy
from model.ensemble import split_halves
from schema.run import Predictions

CLASSES = 7


def _predictions(labels: np.ndarray, plain_right: np.ndarray, flip_right: np.ndarray) -> Any:
    """Fake predictions: confident in the label where `*_right`, else in the next class."""

    def probabilities(right: np.ndarray, confidence: float) -> np.ndarray:
        picked = np.where(right, labels, (labels + 1) % CLASSES)
        out = np.full((labels.size, CLASSES), (1 - confidence) / (CLASSES - 1), np.float32)
        out[np.arange(labels.size), picked] = confidence
        return out

    # The mirrored images are more confident: where only they are right, the flip mean is.
    return Predictions(
        probabilities(plain_right, 0.6), probabilities(flip_right, 0.9), labels.copy(), 3
    )


def test_the_baseline_is_the_mean_of_its_copies_flip_averaged_on_the_report_half() -> None:
    labels = np.repeat(np.arange(CLASSES), 10)
    everywhere = np.ones(labels.size, bool)
    copies = [
        _predictions(labels, labels % 2 == 0, everywhere),
        _predictions(labels, ~everywhere, labels < 5),
    ]
    mean = flip_mean(copies)
    by_hand = sum((c.probabilities + c.probabilities_flipped) / 2 for c in copies) / 2
    np.testing.assert_allclose(mean, by_hand, rtol=1e-6)
    report = split_halves(labels, 2017).report
    expected = np.mean(np.argmax(by_hand[report], axis=1) == labels[report])
    assert report_accuracy(mean, labels, 2017) == pytest.approx(expected)
    # Flip averaging is what lifts it: the plain mean is worse on these predictions.
    plain = sum(c.probabilities for c in copies) / 2
    assert report_accuracy(plain, labels, 2017) < report_accuracy(mean, labels, 2017) - 0.2
    records = [
        {"reference_images_per_second": ips, "seed": seed, "epochs": 5, "time_budget_s": 60.0}
        | {"best_val_accuracy": 0.5}
        for ips, seed in ((100.0, 2017), (120.0, 2018))
    ]
    arm = baseline_record(records, copies, 90.0, 2017)
    assert arm["report_accuracy"] == round(expected, 4)
    assert arm["trials"] == 2 and arm["minutes"] == 1.5
    assert arm["reference_images_per_second"] == 110.0
    assert arm["report_rows"] == report.size
    other = _predictions(np.roll(labels, 1), labels > 0, labels > 0)
    with pytest.raises(ValueError, match="other validation rows"):
        baseline_record(records, [copies[0], other], 90.0, 2017)
    with pytest.raises(ValueError, match="at least one"):
        flip_mean([])


def test_an_ensemble_champion_is_scored_as_the_search_states_it_and_gains_are_points() -> None:
    labels = np.repeat(np.arange(CLASSES), 4)
    members = [
        _predictions(labels, labels % 2 == 0, labels % 3 == 0),
        _predictions(labels, labels < 4, labels >= 2),
    ]
    plain = value.combine_members(members, [0.75, 0.25], flip=False)
    np.testing.assert_allclose(
        plain, 0.75 * members[0].probabilities + 0.25 * members[1].probabilities, rtol=1e-6
    )
    flipped = value.combine_members(members, [0.5, 0.5], flip=True)
    np.testing.assert_allclose(flipped, flip_mean(members), rtol=1e-6)
    assert value.gain_points(0.6512, 0.6400) == pytest.approx(1.12)
    assert value.gain_points(0.60, 0.64) == pytest.approx(-4.0)
    assert value.gain_points(None, 0.64) is None


def test_the_champion_scored_is_the_registered_one_ensemble_or_single(
    tmp_path: Path, monkeypatch: Any
) -> None:
    from schema import run as layout

    labels = np.repeat(np.arange(CLASSES), 4)
    logged = {
        "a": _predictions(labels, labels % 2 == 0, labels < 6),
        "b": _predictions(labels, labels < 3, labels > 0),
    }
    monkeypatch.setattr(layout, "download_predictions", lambda client, run_id, dst: logged[run_id])
    runs = {
        "parent": SimpleNamespace(tags={}, params={}),
        "ens": SimpleNamespace(
            tags={layout.TAG_MEMBERS: "a,b"},
            params={"weights": "0.7500,0.2500", "flip": "True", "members": "cnn-fast,cnn-002"},
        ),
        "a": SimpleNamespace(tags={}, params={}),
    }
    client = SimpleNamespace(
        get_run=lambda run_id: SimpleNamespace(
            data=runs[run_id], info=SimpleNamespace(run_name=f"run-{run_id}")
        )
    )
    assert value.champion_predictions(client, "parent", tmp_path) == (None, None, [])
    runs["parent"].tags = {layout.TAG_CHAMPION: layout.ENSEMBLE, layout.TAG_CHAMPION_RUN: "ens"}
    probabilities, found, members = value.champion_predictions(client, "parent", tmp_path)
    expected = value.combine_members([logged["a"], logged["b"]], [0.75, 0.25], flip=True)
    np.testing.assert_allclose(probabilities, expected)
    assert members == ["cnn-fast", "cnn-002"] and np.array_equal(found, labels)
    # A single champion is served as registered: no flip averaging.
    runs["parent"].tags = {layout.TAG_CHAMPION: "single", layout.TAG_CHAMPION_RUN: "a"}
    probabilities, _, members = value.champion_predictions(client, "parent", tmp_path)
    np.testing.assert_array_equal(probabilities, logged["a"].probabilities)
    assert members == ["run-a"]


def test_the_baseline_trains_the_known_good_cnn_by_its_recipe_on_a_cosine() -> None:
    from jobs.space import FAST_CNN, KNOWN_GOOD_CNN
    from jobs.train import resolve_model_config

    settings = baseline_settings("data.csv", 2018)
    assert resolve_model_config(settings.family, settings.preset, settings.config) == FAST_CNN
    assert settings.lr_schedule == "cosine" and settings.seed == 2018
    assert settings.learning_rate == KNOWN_GOOD_CNN["training.learning_rate"]
    assert settings.batch_size == KNOWN_GOOD_CNN["training.batch_size"]
    assert settings.optimizer == KNOWN_GOOD_CNN["training.optimizer"]
    assert settings.data_fraction == 1.0


def test_the_large_regime_keeps_a_stratified_tenth_of_training_and_all_of_publictest(
    tmp_path: Path,
) -> None:
    from model.data import load_fer2013
    from viz_helpers import USAGES, write_fer_csv

    source = write_fer_csv(tmp_path / "fer.csv")
    subset = value.training_subset(str(source), 0.5, 2017, tmp_path / "sub" / "data.csv")
    loaded = load_fer2013(subset)
    counts = loaded.counts()
    assert counts["PublicTest"] == USAGES["PublicTest"] * CLASSES
    assert counts["Training"] == USAGES["Training"] // 2 * CLASSES
    assert counts["PrivateTest"] == 0
    training = loaded.labels[loaded.usage == "Training"]
    assert np.bincount(training).tolist() == [USAGES["Training"] // 2] * CLASSES
    assert value.training_subset(str(source), 1.0, 2017, tmp_path / "x.csv") == str(source)


def test_reused_trials_are_read_by_any_name_the_schema_spells(monkeypatch: Any) -> None:
    from schema import run as layout

    data = SimpleNamespace(metrics={"reused_trials": 7.0}, params={}, tags={})
    client = SimpleNamespace(get_run=lambda run_id: SimpleNamespace(data=data))
    monkeypatch.setattr(layout, "METRIC_REUSED_TRIALS", "reused_trials", raising=False)
    assert value.reused_trials(client, "parent")["reused_trials"] == "7.0"
    # A parent run that logged none of them (memory off, or before the feature): None.
    data.metrics = {"best_val_accuracy": 0.6}
    assert value.reused_trials(client, "parent") is None


def test_run_all_runs_the_search_value_arm_only_with_the_budget_flag(
    tmp_path: Path, monkeypatch: Any
) -> None:
    from bench import bench_budget

    ran: list[str] = []
    figures = {
        "search_value_run_date": "d",
        "search_gain_points_hour": -0.5,
        "search_gain_points_large": 2.5,
        "warm_start_gain_points": 0.3,
        "search_value_hour": {
            "minutes_budget": 60.0,
            "train_fraction": 1.0,
            "baseline": {"report_accuracy": 0.645, "trials": 2, "members": ["a", "b"]}
            | {"minutes": 58.5, "reference_images_per_second": 310.0, "report_rows": 1795},
            "search": {"report_accuracy": 0.64, "trials": 9, "members": ["ensemble-of-3"]}
            | {"minutes": 57.0, "reference_images_per_second": 305.0}
            | {"ensemble_gain_points": 1.7},
        },
    }
    asked: list[tuple[str, ...]] = []
    seconds: list[bool] = []

    def fake_run(data: str, regimes: tuple[str, ...], second_search: bool) -> dict:
        ran.append("value")
        asked.append(regimes)
        seconds.append(second_search)
        return figures

    monkeypatch.setattr(value, "run", fake_run)
    monkeypatch.setattr(bench_budget, "run", lambda data: ran.append("budget") or {})
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    results = run_all.run_all("data.csv", True, ["search-value"])
    assert ran == ["value"] and results["_meta"]["ran"] == ["search-value"]
    assert asked == [("hour", "large")]  # both regimes unless `--regimes` names some
    run_all.run_all("data.csv", True, ["search-value"], ("large",), second_search=False)
    assert asked[-1] == ("large",)
    assert seconds == [True, False]  # `--first-search-only` leaves the second search out
    assert json.loads((tmp_path / "search_value.json").read_text()) == figures
    table = run_all.table(results)
    assert "| `search_gain_points_hour` |" in table and "**no**" in table
    assert "| `search_gain_points_large` |" in table and "| `warm_start_gain_points` |" in table
    # The hour search's own ensemble gain, read inside its stored result.
    hour_gain = "| `search_value_hour.search.ensemble_gain_points` |"
    assert (
        f"{hour_gain} that hour search's" in table
        and "| 1.700 | 1.700 | 1.700 | >= 1.5 | yes |" in table
    )
    assert run_all._lookup({"search_value_hour": {"search": {}}}, hour_gain.strip("|` ")) is None
    described = run_all.details(results)
    assert "by hand: 0.645 with 2 trials in 58.5 min" in described
    assert "search: 0.64 with 9 trials in 57 min (members ensemble-of-3" in described
    # Warm-start figures kept from an earlier run than the large regime's say which run.
    kept = {
        **results,
        "search_value_large": {"baseline": {}, "search": {}, "run_date": "later"},
        "warm_start_run": {"run_date": "2026-12-05 17:47 UTC", "commit": "0c45377"},
    }
    assert "- warm start (run 2026-12-05 17:47 UTC, commit `0c45377`;" in run_all.details(kept)
    kept["search_value_large"]["second_search"] = {}
    assert "- warm start" not in run_all.details(kept)
    # Not re-run: the stored figures come back.
    assert run_all.run_all("data.csv", False, ["load-not-run"])["search_gain_points_large"] == 2.5
    with pytest.raises(SystemExit):
        run_all.main(["--data", "data.csv", "--only", "search-value"])


@pytest.mark.parametrize(
    ("model_s", "bar", "expected"),
    [(600.0, 4.0, 50.0), (30.0, 4.0, 20.0), (0.0, 0.0, 20.0)],
    ids=["slow machine: raised", "fast machine: as given", "no calibration: as given"],
)
def test_the_large_regime_is_sized_to_explore_on_the_machine_it_runs_on(
    monkeypatch: Any, model_s: float, bar: float, expected: float
) -> None:
    from jobs.search import driver
    from jobs.search.strategy import EXPLOIT, Strategy

    probe = Strategy(EXPLOIT, 1.0, "numbers", model_s, 0.0, 2, explore_min_models=bar)
    monkeypatch.setattr(driver, "strategy_for", lambda settings: probe)
    regime = value.REGIMES["large"]

    minutes, sizing = value.sized_minutes(SimpleNamespace(), regime)

    assert minutes == expected
    if model_s:
        # 1.25 x 4 models per slot of 10 minutes each: 50 minutes where 20 hold only 2.
        assert sizing["explore_min_models"] == bar and sizing["model_minutes"] == model_s / 60
        assert sizing["models_per_slot"] == round(expected * 60 / model_s, 2)
        assert sizing["models_per_slot"] >= regime.explore_margin * bar
    else:
        assert sizing["model_minutes"] is None and sizing["reason"] == "numbers"


def test_a_run_of_one_regime_keeps_the_stored_figures_of_the_other(
    tmp_path: Path, monkeypatch: Any
) -> None:
    large = {"search_value_run_date": "d1", "search_gain_points_large": 2.5}
    hour = {"search_value_run_date": "d2", "search_gain_points_hour": 0.4}
    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    for figures in (large, hour):
        monkeypatch.setattr(
            value, "run", lambda data, regimes, second_search, figures=figures: dict(figures)
        )
        results = run_all.run_all("data.csv", True, ["search-value"])

    stored = json.loads((tmp_path / "search_value.json").read_text())
    assert stored == {**large, **hour}
    assert results["search_gain_points_large"] == 2.5 and results["search_gain_points_hour"] == 0.4


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_on_a_tiny_budget(tmp_path: Path) -> None:
    from viz_helpers import write_fer_csv

    source = write_fer_csv(tmp_path / "fer.csv")
    results = value.run(str(source), ("large",), minutes=1.0, fraction=0.5)
    assert "search_value_errors" not in results, results
    for key in ("search_gain_points_large", "warm_start_gain_points", "warm_start_reused_trials"):
        assert key in results
    found = results["search_value_large"]
    baseline, search = found["baseline"], found["search"]
    assert baseline["trials"] >= 1 and len(baseline["members"]) == baseline["trials"]
    assert 0 <= baseline["report_accuracy"] <= 1
    assert baseline["reference_images_per_second"] > 0 and min(baseline["epochs"]) >= 1
    assert search["reference_images_per_second"] > 0 and search["minutes"] > 0
    assert "report_accuracy" in found["second_search"]
    assert found["train_fraction"] == 0.5 and found["minutes_budget"] == 1.0
