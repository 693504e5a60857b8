"""The report of a search whose champion is an ensemble, as a new user's full search ends:
its strongest CNN member is a final trial that continued an explored one, and SEED2017 was
refused over budget. Question 1 must still present a CNN, with its recipe and SEED2017's fate."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import viz_helpers as h
from schema import run as layout
from viz import curves
from viz.main import run_viz
from viz.settings import VizSettings

REFUSAL = (
    "needs about 1234 s to reach epoch 2 (setup 20 s + 2 x 607 s estimated), 312 s of the "
    "budget left"
)
EXPLORED_EPOCHS, FINAL_EPOCHS = 3, 4  # build_search fits its CNN for 4 epochs


def _explored_run(client: MlflowClient, search: h.SearchFixture) -> str:
    """The explored trial the CNN trial continued: 3 epochs on half of the rows."""
    run = client.create_run(
        search.experiment_id,
        run_name="cnn-explore",
        tags={
            "mlflow.parentRunId": search.parent_id,
            layout.TAG_ROLE: layout.ROLE_TRIAL,
            layout.TAG_FAMILY: "cnn",
            layout.TAG_STATUS: layout.STATUS_EARLY_STOPPED,
            layout.TAG_PHASE: "explore",
            layout.TAG_EPOCHS_DONE: str(EXPLORED_EPOCHS),
        },
    )
    run_id = run.info.run_id
    client.log_param(run_id, "family", "cnn")
    client.log_param(run_id, layout.PARAM_TRAIN_FRACTION, "0.5")
    for epoch in range(1, EXPLORED_EPOCHS + 1):
        client.log_metric(run_id, "accuracy", 0.1 * epoch, step=epoch)
        client.log_metric(run_id, "val_accuracy", 0.1 * epoch, step=epoch)
    client.log_metric(run_id, "best_val_accuracy", 0.1 * EXPLORED_EPOCHS)
    client.set_terminated(run_id)
    return run_id


def _make_cnn_a_final_trial(client: MlflowClient, search: h.SearchFixture) -> str:
    explored = _explored_run(client, search)
    client.log_param(search.cnn_run_id, layout.PARAM_WARM_START_FROM, "cnn-explore")
    client.set_tag(search.cnn_run_id, layout.TAG_PHASE, layout.PHASE_FINAL)
    client.set_tag(search.cnn_run_id, layout.TAG_EPOCHS_DONE, str(FINAL_EPOCHS))
    return explored


def _refuse_seed2017(client: MlflowClient, search: h.SearchFixture) -> None:
    """As jobs/proposals.RefusalRecorder logs a proposal too slow for the time left."""
    run = client.create_run(
        search.experiment_id,
        run_name=layout.PLAN_SEED2017,
        tags={
            "mlflow.parentRunId": search.parent_id,
            layout.TAG_ROLE: layout.ROLE_TRIAL,
            layout.TAG_FAMILY: "cnn",
            layout.TAG_STATUS: layout.STATUS_OVER_BUDGET,
            layout.TAG_PLAN_NAME: layout.PLAN_SEED2017,
            layout.TAG_REFUSAL: REFUSAL,
        },
    )
    client.log_param(run.info.run_id, layout.PARAM_TRAIN_FRACTION, "0.25")
    client.set_terminated(run.info.run_id)


def _ensemble_champion(
    client: MlflowClient, search: h.SearchFixture, tmp_path: Path, monkeypatch
) -> str:
    """Both trials' predictions logged, then jobs.ensemble builds and logs the ensemble of
    both (the selection pinned: on 14 rows greedy selection may keep one model)."""
    import keras

    import jobs.ensemble
    from model.ensemble import Selection

    images, labels, usage = h.load_csv_arrays(search.csv_path)
    public = usage == "PublicTest"
    x_val, y_val = images[public], labels[public]
    for run_id in (search.cnn_run_id, search.dnn_run_id):
        files = layout.download_model_files(client, run_id, tmp_path / run_id)
        model = keras.saving.load_model(files["model"], safe_mode=True)
        npz = tmp_path / f"{run_id}.npz"
        np.savez(
            npz,
            probabilities=model.predict(x_val, verbose=0),
            probabilities_flipped=model.predict(x_val[:, :, ::-1], verbose=0),
            labels=y_val,
            epoch=np.int64(1),
        )
        layout.log_predictions(client, run_id, npz)
        client.set_tag(run_id, layout.TAG_MODEL_URI, f"runs:/{run_id}/model")
    monkeypatch.setattr(
        jobs.ensemble,
        "greedy_selection",
        lambda candidates, labels, flip: Selection((0, 1), (0.7, 0.3), flip),
    )
    trials = [client.get_run(r) for r in (search.cnn_run_id, search.dnn_run_id)]
    config = json.loads((tmp_path / search.cnn_run_id / "model" / "config.json").read_text())
    mlflow.set_tracking_uri(search.tracking_uri)  # the MLflow Keras flavour logs through it
    try:
        outcome = jobs.ensemble.build_and_log(
            client, search.experiment_id, search.parent_id, trials, x_val, y_val, config["data"], 5
        )
    finally:
        mlflow.set_tracking_uri(None)
    assert outcome is not None
    client.set_tag(search.parent_id, layout.TAG_CHAMPION_RUN, outcome.run_id)
    return outcome.run_id


def _section(report: str, start: str, end: str) -> str:
    return report[report.index(start) : report.index(end)]


def test_an_ensemble_champion_report_answers_question_1_for_a_cnn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with h.environ(FER2013_CACHE_DIR=str(tmp_path / "cache")):
        search = h.build_search(tmp_path / "store", "viz-ensemble")
    client = MlflowClient(search.tracking_uri)
    explored = _make_cnn_a_final_trial(client, search)
    _refuse_seed2017(client, search)
    champion = _ensemble_champion(client, search, tmp_path, monkeypatch)

    out = tmp_path / "out"
    settings = VizSettings(
        data="", out=str(out), ascent_steps=10, smooth_samples=2, filters_per_layer=3
    )
    with h.environ(
        FER2013_CACHE_DIR=str(tmp_path / "cache"),
        MLFLOW_EXPERIMENT_NAME="viz-ensemble",
        MLFLOW_EXPERIMENT_ID=None,
    ):
        summary = run_viz(settings, client)
    assert summary["run_id"] == champion and summary["family"] == "ensemble"
    report = (out / "report.md").read_text()

    # Summary: the champion, its accuracies (the tiny file has PrivateTest rows), serving.
    top = _section(report, "## Summary", "## The champion")
    assert "It is the search's champion" in top
    assert "on the report half" in top
    assert "**Held-out accuracy**: **" in top and "on PrivateTest (14 images" in top
    assert "`make serve`" in top and "models:/fer2013-expression@champion" in top
    assert "tried 4 trials" in top and "1 over budget" in top

    # The ensemble's own section: members and weights, the comparison table.
    ensemble = _section(report, "## The champion", "## 1.")
    assert "| cnn-trial | CNN | 0.70 |" in ensemble and "| dnn-trial | DNN | 0.30 |" in ensemble
    assert "| ensemble + flip |" in ensemble

    # Question 1: the strongest CNN member's layer table, recipe and both phases...
    q1 = _section(report, "## 1.", "## 2.")
    assert "The ensemble's strongest CNN member: `cnn-trial`" in q1
    assert "| conv_1 | Conv2D | (None, 48, 48, 6) | 60 |" in q1
    assert "| optimizer | adam, learning rate 0.001 |" in q1
    assert "| batch size | 16 |" in q1 and "| augmentation | none |" in q1
    assert f"| explored | cnn-explore | {EXPLORED_EPOCHS} | 0.5 of the rows |" in q1
    assert f"| final | cnn-trial | {FINAL_EPOCHS} | every row |" in q1
    assert f"{EXPLORED_EPOCHS + FINAL_EPOCHS} epochs in all" in q1
    # ...and SEED2017's refusal with its numbers.
    assert "SEED2017, the coursework CNN of question 1, was not started" in q1
    assert REFUSAL in q1
    assert "not recorded" not in report and "(visualised)" not in report

    # Question 4 on the CNN member: Grad-CAM, and the sanity check covers it.
    assert summary["gradcam_layer"] == "conv_2"
    assert set(summary["sanity_spearman"]) == {"vanilla", "SmoothGrad", "Grad-CAM"}
    q4 = _section(report, "## 4.", "## 5.")
    assert "strongest CNN member" in q4 and "Grad-CAM at the last conv layer `conv_2`" in q4
    assert (out / "figures" / "saliency.png").is_file()
    assert summary["filter_layers"] == ["conv_1", "conv_2"]

    # Learning curves: the final trial's whole path, explored epochs first.
    assert h.png_has_content(out / "figures" / "learning_curves.png")
    children = [client.get_run(r) for r in (explored, search.cnn_run_id)]
    entry = curves.family_run(children[1])
    whole = curves.whole_history(client, entry, children)
    assert whole.explored_epochs == EXPLORED_EPOCHS
    steps = whole.val_accuracy[0].tolist()
    assert steps == list(range(1, EXPLORED_EPOCHS + FINAL_EPOCHS + 1))
    assert whole.val_accuracy[1][:EXPLORED_EPOCHS].tolist() == pytest.approx([0.1, 0.2, 0.3])

    html = (out / "report.html").read_text()
    assert (
        html.count("<img ")
        == html.count('src="data:image/png;base64,')
        == len([a for a in summary["artifacts"] if a.startswith("figures/")])
    )
