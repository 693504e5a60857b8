"""The ensemble champion: selection on one half, judged on the other, one safe Keras model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from jobs.ensemble import Candidate, build_and_log, choose
from jobs.search.ensemble import EnsembleResult
from jobs.search.register import choose_champion
from jobs.search.summary import write_summary
from jobs.settings import SearchSettings
from model.ensemble import build_ensemble, greedy_selection, split_halves
from schema import run as layout
from schema.ensemble import EnsembleConfig, EnsembleMember, ReportTable

CLASSES = 7


def confident(labels: np.ndarray, correct: np.ndarray, seed: int) -> np.ndarray:
    """Probabilities that put 0.7 on the true class where `correct`, else on a wrong one."""
    rng = np.random.default_rng(seed)
    picked = np.where(correct, labels, (labels + rng.integers(1, CLASSES, labels.size)) % CLASSES)
    probabilities = np.full((labels.size, CLASSES), 0.05, np.float32)
    probabilities[np.arange(labels.size), picked] = 0.7
    return probabilities


def candidate(name: str, probabilities: np.ndarray, labels: np.ndarray) -> Candidate:
    predictions = layout.Predictions(probabilities, probabilities, labels, epoch=1)
    return Candidate(f"id-{name}", name, "cnn", predictions)


def test_halves_are_disjoint_stratified_and_fixed_by_the_seed() -> None:
    labels = np.repeat(np.arange(CLASSES), [40, 6, 41, 70, 30, 33, 50])
    halves = split_halves(labels, seed=3)
    assert np.intersect1d(halves.select, halves.report).size == 0
    assert np.union1d(halves.select, halves.report).size == labels.size
    for label in range(CLASSES):
        in_select = np.sum(labels[halves.select] == label)
        assert abs(in_select - np.sum(labels == label) / 2) <= 1
    again = split_halves(labels, seed=3)
    assert np.array_equal(again.select, halves.select)
    assert not np.array_equal(split_halves(labels, seed=4).select, halves.select)


def test_selection_sees_only_the_select_half() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, 600)
    halves = split_halves(labels, seed=2017)
    good = [
        candidate(f"good-{i}", confident(labels, rng.random(600) < 0.6, i), labels) for i in (1, 2)
    ]
    # Perfect on every `report` row, always wrong on `select`: a leak would pick it.
    planted = np.zeros(600, bool)
    planted[halves.report] = True
    leak = candidate("leak", confident(labels, planted, 9), labels)
    choice = choose([*good, leak], labels, seed=2017)
    for selection in (choice.plain, choice.flipped, choice.chosen):
        assert 2 not in selection.members, selection
        assert sum(selection.weights) == pytest.approx(1.0)
    assert choice.best_single != 2
    # The report half is where the numbers come from: the leak is perfect there.
    assert choice.table.members.get("leak") is None


def test_greedy_selection_averages_complementary_models() -> None:
    labels = np.arange(400) % CLASSES
    first = np.zeros(400, bool)
    first[:200] = True
    # Each is right on a different half and unsure elsewhere: only the pair gets both.
    a = confident(labels, first, 1)
    b = confident(labels, ~first, 2)
    a[~first] = 1.0 / CLASSES
    b[first] = 1.0 / CLASSES
    selection = greedy_selection([a, b], labels, flip=False)
    assert set(selection.members) == {0, 1}
    assert selection.weights == pytest.approx((0.5, 0.5), abs=0.1)
    with pytest.raises(ValueError, match="candidate 1: expected probabilities of shape"):
        greedy_selection([a, b[:10]], labels, flip=False)


def tiny_member(seed: int) -> object:
    import keras

    keras.utils.set_random_seed(seed)
    pixels = keras.Input((48, 48, 1))
    x = keras.layers.Rescaling(1 / 255.0)(pixels)
    x = keras.layers.Conv2D(2, 3, strides=4)(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(CLASSES, activation="softmax")(x)
    return keras.Model(pixels, out, name="cnn")


@pytest.mark.parametrize("flip", [False, True])
def test_saved_ensemble_reloads_safely_and_is_the_weighted_mean(flip: bool, tmp_path: Path) -> None:
    import keras

    members = [tiny_member(1), tiny_member(2)]
    x = np.random.default_rng(0).integers(0, 256, (9, 48, 48, 1)).astype("float32")
    mirrored = x[:, :, ::-1]
    weights = (0.25, 0.75)
    expected = sum(
        w
        * (
            (m.predict(x, verbose=0) + m.predict(mirrored, verbose=0)) / 2
            if flip
            else m.predict(x, verbose=0)
        )
        for m, w in zip(members, weights, strict=True)
    )
    ensemble = build_ensemble(members, weights, flip)
    ensemble.save(tmp_path / "ensemble.keras")
    loaded = keras.saving.load_model(tmp_path / "ensemble.keras", safe_mode=True)
    assert np.allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    assert loaded.inputs[0].shape[1:] == (48, 48, 1)
    # The mirror is fixed: training the ensemble cannot change it.
    if flip:
        assert not loaded.get_layer("mirror").trainable


def log_trial(client, experiment: str, parent_id: str, name: str, model, x, y, tmp: Path) -> str:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from jobs.tracking import log_keras_model

    run_id = client.create_run(
        experiment,
        run_name=name,
        tags={
            MLFLOW_PARENT_RUN_ID: parent_id,
            layout.TAG_ROLE: "trial",
            layout.TAG_FAMILY: "cnn",
            layout.TAG_STATUS: "finished",
        },
    ).info.run_id
    model_file = tmp / f"{name}.keras"
    model.save(model_file)
    layout.log_model_files(client, run_id, model_file, {"family": "cnn", "name": name})
    client.set_tag(run_id, layout.TAG_MODEL_URI, log_keras_model(run_id, model_file))
    npz = tmp / f"{name}.npz"
    np.savez(
        npz,
        probabilities=model.predict(x, verbose=0),
        probabilities_flipped=model.predict(x[:, :, ::-1], verbose=0),
        labels=y,
        epoch=np.int64(3),
    )
    layout.log_predictions(client, run_id, npz)
    probabilities = model.predict(x, verbose=0)
    client.log_metric(run_id, "best_val_accuracy", float(np.mean(probabilities.argmax(1) == y)))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_ensemble_run_and_the_champion_rule_both_ways(tracking, tmp_path: Path) -> None:
    import keras

    experiment = tracking.create_experiment("ensemble-test")
    parent_id = tracking.create_run(experiment, tags={layout.TAG_ROLE: "search"}).info.run_id
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (120, 48, 48, 1)).astype("uint8")
    y = np.arange(120) % CLASSES
    ids = [
        log_trial(tracking, experiment, parent_id, f"cnn-{i}", tiny_member(i), x, y, tmp_path)
        for i in (1, 2, 3)
    ]
    runs = tracking.search_runs([experiment], f"tags.`{layout.TAG_ROLE}` = 'trial'")
    data_info = {"source": "fer.csv", "sha256": "0" * 64, "data_fraction": 1.0, "seed": 7}
    outcome = build_and_log(tracking, experiment, parent_id, runs, x, y, data_info, seed=7)
    assert outcome is not None
    run = tracking.get_run(outcome.run_id)
    assert run.data.tags[layout.TAG_ROLE] == "ensemble"
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    members = run.data.tags[layout.TAG_MEMBERS].split(",")
    assert set(members) <= set(ids) and members
    assert run.data.metrics["predict_ms_per_image"] > 0
    files = layout.download_model_files(tracking, outcome.run_id, tmp_path / "ensemble")
    model = keras.saving.load_model(files["model"], safe_mode=True)
    assert model.output.shape[1:] == (CLASSES,)
    # The logged config.json reads back through the one definition viz reads it with.
    logged = EnsembleConfig.from_dict(json.loads(files["config"].read_text()))
    assert [m.run_id for m in logged.members] == members
    assert logged.data == data_info and logged.param_count == model.count_params()
    assert logged.report_table.chosen(logged.flip) == pytest.approx(
        outcome.choice.table.ensemble_flip if logged.flip else outcome.choice.table.ensemble
    )
    assert run.data.params["weights"] == ",".join(f"{m.weight:.4f}" for m in logged.members)

    settings = SearchSettings(data="fer.csv", register=True)
    for beats in (True, False):
        table = outcome.choice.table
        best_single = table.ensemble_flip - 0.01 if beats else table.ensemble_flip + 0.01
        forced = dataclasses.replace(
            outcome,
            choice=dataclasses.replace(
                outcome.choice,
                table=dataclasses.replace(
                    table,
                    best_single=best_single,
                    ensemble=table.ensemble_flip,
                    ensemble_flip=table.ensemble_flip,
                ),
            ),
        )
        summary = write_summary(tracking, parent_id, settings)
        result = choose_champion(tracking, parent_id, settings, summary, EnsembleResult(forced))
        parent = tracking.get_run(parent_id)
        expected = outcome.run_id if beats else result.best_run_id
        assert parent.data.tags[layout.TAG_CHAMPION] == ("ensemble" if beats else "single")
        assert parent.data.tags[layout.TAG_CHAMPION_RUN] == expected == result.champion_run_id
        reason = parent.data.tags[layout.TAG_CHAMPION_REASON]
        assert ("does not beat" in reason) is not beats, reason
        version = tracking.get_model_version_by_alias(layout.REGISTERED_MODEL, "champion")
        assert version.run_id == expected
        # The ensemble is not a trial: trials.csv and the budget count the three.
        assert len(summary.trials) == 3


def an_ensemble_config() -> EnsembleConfig:
    return EnsembleConfig(
        members=(
            EnsembleMember("run-a", "cnn-fast-final", "cnn", 0.7),
            EnsembleMember("run-b", "dnn-matched", "dnn", 0.3),
        ),
        flip=True,
        report_table=ReportTable(0.61, 0.62, 0.64, 0.655),
        param_count=12345,
        data={"source": "fer.csv", "data_fraction": 1.0},
    )


def test_ensemble_config_round_trips_through_the_logged_json_keys() -> None:
    config = an_ensemble_config()
    logged = json.loads(json.dumps(config.to_dict()))
    # The keys existing stores hold (viz reads stores written before this class existed).
    assert set(logged) == {"family", "members", "flip", "data", "param_count", "report_table"}
    assert logged["family"] == "ensemble"
    assert set(logged["members"][0]) == {"run_id", "name", "family", "weight"}
    assert EnsembleConfig.from_dict(logged) == config
    assert config.params() == {
        "members": "cnn-fast-final,dnn-matched",
        "weights": "0.7000,0.3000",
        "flip": "True",
    }
    assert config.report_table.chosen(True) == 0.655 and config.report_table.chosen(False) == 0.64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(family="cnn"), r"family: expected 'ensemble'"),
        (lambda d: d.update(members=[]), r"members: expected a non-empty list"),
        (lambda d: d["members"][1].pop("run_id"), r"members\[1\]\.run_id: expected a non-empty"),
        (
            lambda d: d["members"][0].update(weight="0.7"),
            r"members\[0\]\.weight: expected a finite",
        ),
        (
            lambda d: d["members"][0].update(weight=-1),
            r"members\[0\]\.weight: expected a weight >= 0",
        ),
        (lambda d: d.update(flip="True"), r"flip: expected true or false"),
        (lambda d: d["report_table"].pop("ensemble_flip"), r"report_table\.ensemble_flip"),
        (lambda d: d.update(param_count=1.5), r"param_count: expected a positive integer"),
    ],
)
def test_ensemble_config_names_the_bad_field(change, message: str) -> None:
    logged = json.loads(json.dumps(an_ensemble_config().to_dict()))
    change(logged)
    with pytest.raises(ValueError, match=message):
        EnsembleConfig.from_dict(logged, "run x: config.json")


def test_viz_reads_the_ensemble_through_its_config() -> None:
    from types import SimpleNamespace

    from viz.champion import ensemble_facts

    run = SimpleNamespace(
        info=SimpleNamespace(run_id="run-e"),
        data=SimpleNamespace(
            metrics={layout.MEMBER_REPORT_METRIC + "cnn-fast-final": 0.6},
            params={"report_rows": "9"},
        ),
    )
    facts = ensemble_facts(run, an_ensemble_config().to_dict())
    assert facts.table == an_ensemble_config().report_table and facts.flip
    assert [(m.name, m.weight, m.report_accuracy) for m in facts.members] == [
        ("cnn-fast-final", 0.7, 0.6),
        ("dnn-matched", 0.3, None),
    ]
    broken = an_ensemble_config().to_dict()
    broken["members"][0]["weight"] = None
    with pytest.raises(ValueError, match=r"run run-e: config.json: members\[0\]\.weight"):
        ensemble_facts(run, broken)
