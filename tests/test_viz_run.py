"""run_viz against a real (sqlite) MLflow store: selection, checks, logging, refusals."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import viz_helpers as h
from schema.run import (
    MODEL_DIR,
    MODEL_FILE,
    TAG_BEST_RUN,
    TAG_ROLE,
    log_model_files,
)
from viz.figure_names import FigureKind
from viz.main import main, run_viz
from viz.runs import VizError, select_run_id
from viz.settings import VizSettings


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> h.SearchFixture:
    return h.shared_search(tmp_path_factory)


@pytest.fixture
def client(search: h.SearchFixture, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("FER2013_CACHE_DIR", str(Path(search.csv_path).parent / "cache"))
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return MlflowClient(search.tracking_uri)


def fast(**kwargs) -> VizSettings:
    """Settings small enough for a 2-core CI box."""
    base = dict(ascent_steps=10, smooth_samples=2, filters_per_layer=3, predict_batch_size=64)
    base.update(kwargs)
    return VizSettings(**base)


def test_end_to_end_auto_run_logs_figures_and_report(
    search: h.SearchFixture, client: MlflowClient, tmp_path_factory: pytest.TempPathFactory
) -> None:
    summary, out = h.shared_viz(tmp_path_factory)
    # Auto selection: the search parent's best_run_id tag, not the better-looking metric.
    assert summary["run_id"] == search.cnn_run_id
    logged = h.artifact_paths(client, search.cnn_run_id)
    expected = {
        "figures/learning_curves.png",
        "figures/confusion_matrix.png",
        "figures/saliency.png",
        "figures/saliency_sanity.png",
        "figures/filters_conv_1.png",
        "figures/filters_conv_2.png",
        "figures/feature_maps_conv_1.png",
        "figures/feature_maps_conv_2.png",
        "report.html",
        "report.md",
    }
    assert expected <= logged
    assert set(summary["artifacts"]) == expected
    # The same files were written to `out`.
    for name in expected:
        assert (out / name).is_file(), name
    assert h.png_has_content(out / "figures" / "learning_curves.png")
    # Numbers: counts sum to the split, accuracy agrees with the matrix and the recorded metric.
    counts = np.array(summary["confusion_matrix"])
    assert counts.sum() == summary["split_size"] == 7 * h.USAGES["PublicTest"]
    assert summary["accuracy"] == pytest.approx(np.trace(counts) / counts.sum())
    assert summary["accuracy"] == pytest.approx(search.cnn_public_accuracy, abs=1e-9)
    # The rebuilt split is the one the run validated on: same accuracy as its best epoch.
    assert summary["accuracy"] == pytest.approx(search.cnn_val_accuracy, abs=1e-6)
    assert set(summary["sanity_spearman"]) == {"vanilla", "SmoothGrad", "Grad-CAM"}
    assert summary["gradcam_layer"] == "conv_2"
    report = (out / "report.md").read_text()
    assert f"run `{search.cnn_run_id}`" in report
    assert f"{search.dnn_param_count:,}" in report  # question 2 names the DNN's size
    assert "differs from the recorded" not in report
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 8
    # The report links exactly the figures the run wrote, each named by FigureKind.
    linked = set(re.findall(r"\]\((figures/[^)]+)\)", report))
    written = {f"figures/{p.name}" for p in (out / "figures").iterdir()}
    assert linked == written
    named = {f"figures/{k.file_name()}" for k in FigureKind if not k.per_layer} | {
        f"figures/{k.file_name(layer)}"
        for k in FigureKind
        if k.per_layer
        for layer in ("conv_1", "conv_2")
    }
    assert written == named


def test_cli_on_dnn_run_uses_recorded_source_and_skips_gradcam(
    search: h.SearchFixture,
    client: MlflowClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:

    # The default --data (data/fer2013.csv) does not exist in this folder: the source
    # recorded in config.json is used, and its hash is checked.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", search.tracking_uri)
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(search.tracking_uri)
    try:
        code = main(
            [
                "--run-id",
                search.dnn_run_id,
                "--out",
                "viz_out",
                "--ascent-steps",
                "5",
                "--smooth-samples",
                "2",
            ]
        )
        captured = capsys.readouterr()
        assert code == 0, captured.err
        summary = json.loads(captured.out)
        assert "saliency and sanity check done in" in captured.err  # progress per stage
        assert main(["--run-id", "nope" * 8]) == 2
        assert "not found" in capsys.readouterr().err
        assert main(["--filters-per-layer", "0"]) == 2
        assert "filters_per_layer" in capsys.readouterr().err
    finally:
        mlflow.set_tracking_uri(previous)
    assert summary["run_id"] == search.dnn_run_id and summary["family"] == "dnn"
    assert summary["gradcam_layer"] is None and summary["filter_layers"] == []
    assert set(summary["sanity_spearman"]) == {"vanilla", "SmoothGrad"}
    assert sum(map(sum, summary["confusion_matrix"])) == summary["split_size"]
    logged = h.artifact_paths(client, search.dnn_run_id)
    assert {"figures/saliency.png", "report.html", "report.md"} <= logged
    assert not any(p.startswith("figures/filters_") for p in logged)
    assert (tmp_path / "viz_out" / "report.html").is_file()
    report = (tmp_path / "viz_out" / "report.md").read_text()
    assert "no Grad-CAM: a DNN has no conv layer" in report and "no filters to visualise" in report


def test_select_run_prefers_best_run_id_tag(search: h.SearchFixture, client) -> None:
    assert select_run_id(client, search.experiment_id) == search.cnn_run_id
    # Without a search parent, the best best_val_accuracy wins.
    experiment = client.create_experiment("viz-no-search")
    low = client.create_run(experiment).info.run_id
    high = client.create_run(experiment).info.run_id
    client.log_metric(low, "best_val_accuracy", 0.3)
    client.log_metric(high, "best_val_accuracy", 0.6)
    assert select_run_id(client, experiment) == high
    # A search without best_run_id yet falls back to the metric, skipping the parent itself.
    parent = client.create_run(experiment, tags={TAG_ROLE: "search"}).info.run_id
    client.log_metric(parent, "best_val_accuracy", 0.9)
    assert select_run_id(client, experiment) == high
    client.set_tag(parent, TAG_BEST_RUN, low)
    assert select_run_id(client, experiment) == low
    empty = client.create_experiment("viz-empty")
    with pytest.raises(VizError, match="pass --run-id"):
        select_run_id(client, empty)


def _refusal_run(client: MlflowClient, search: h.SearchFixture, name: str) -> str:
    experiment = client.get_experiment_by_name("viz-refusals")
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment("viz-refusals")
    )
    return client.create_run(experiment_id, run_name=name).info.run_id


def _assert_refused(client, run_id: str, settings: VizSettings, fragment: str) -> None:
    before = h.artifact_paths(client, run_id)
    with pytest.raises(VizError) as caught:
        run_viz(settings, client)
    message = str(caught.value)
    assert run_id in message and fragment in message, message
    assert h.artifact_paths(client, run_id) == before, "something was logged to a refused run"


def test_hash_mismatch_is_refused(search, client, tmp_path: Path) -> None:
    run_id = _refusal_run(client, search, "tampered")
    model = h.tiny_cnn(seed=7)
    good, other = tmp_path / "good.keras", tmp_path / "other.keras"
    model.save(good)
    h.tiny_cnn(seed=8).save(other)
    config = h.run_config("cnn", search.csv_path, search.data_sha256, model.count_params())
    log_model_files(client, run_id, good, config)
    # Replace model.keras after the hash was recorded (what a corrupted upload looks like).
    swap = tmp_path / "swap"
    swap.mkdir()
    (swap / MODEL_FILE).write_bytes(other.read_bytes())
    client.log_artifact(run_id, str(swap / MODEL_FILE), MODEL_DIR)
    _assert_refused(client, run_id, fast(run_id=run_id, data=str(search.csv_path)), "SHA-256")


def test_lambda_model_is_refused(search, client, tmp_path: Path) -> None:
    import keras

    run_id = _refusal_run(client, search, "lambda")
    inputs = keras.Input((48, 48, 1), name="pixels")
    x = keras.layers.Lambda(lambda t: t / 255.0, name="unsafe_scale")(inputs)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(x))
    path = tmp_path / "lambda.keras"
    model.save(path)
    config = h.run_config("dnn", search.csv_path, search.data_sha256, model.count_params())
    log_model_files(client, run_id, path, config)
    _assert_refused(
        client, run_id, fast(run_id=run_id, data=str(search.csv_path)), "safe_mode=True"
    )


def test_missing_run_model_or_data_is_refused(search, client, tmp_path: Path) -> None:
    with pytest.raises(VizError, match="deadbeef.*not found"):
        run_viz(fast(run_id="deadbeef" * 4), client)

    bare = _refusal_run(client, search, "no-model")
    _assert_refused(client, bare, fast(run_id=bare), "model")

    run_id = _refusal_run(client, search, "other-data")
    model = h.tiny_dnn()
    path = tmp_path / "m.keras"
    model.save(path)
    config = h.run_config("dnn", search.csv_path, "0" * 64, model.count_params())
    log_model_files(client, run_id, path, config)
    _assert_refused(
        client,
        run_id,
        fast(run_id=run_id, data=str(search.csv_path)),
        f"SHA-256 {search.data_sha256}, but the run was trained on data with SHA-256 {'0' * 64}",
    )

    wrong_layer = fast(run_id=search.cnn_run_id, data=str(search.csv_path), layers="dense_9")
    _assert_refused(client, search.cnn_run_id, wrong_layer, "dense_9")


def test_the_report_says_what_the_search_did_with_its_budget_and_why() -> None:
    from viz.report import _search_sentence
    from viz.search import SearchFacts

    facts = SearchFacts(
        parent_id="p1",
        name="fer2013-search-1",
        minutes=61.0,
        budget_minutes=60.0,
        statuses={"finished": 3, "over_budget": 1},
        finals=3,
        families=["cnn", "dnn"],
        champion_run_id="e1",
        champion_reason="",
        seed2017=None,
        strategy="exploit",
        strategy_reason="one cnn-fast model takes 63.0 min of a slot; 0.95 per slot",
    )

    text = _search_sentence(facts)

    assert "took 61 minutes of a 60-minute budget and tried 4 trials" in text
    assert "it did not explore: it trained seeded copies of the best known config" in text
    assert "Strategy exploit: one cnn-fast model takes 63.0 min of a slot" in text
    explored = _search_sentence(replace(facts, strategy="explore"))
    assert "continuing the best explored ones" in explored and "did not explore" not in explored
