"""The search end to end on a tiny generated data set: Ray Tune, memory placement, MLflow."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import child_runs
from jobs.plan import TrainingConfig, TrialPlan
from jobs.resources import GIB, MIB, WorkerBudget, budget_from_nodes, place
from jobs.search import Strategy, plan_trials, run_search
from jobs.settings import SearchSettings
from jobs.space import fixed_points
from jobs.tracking import TAG_STOP_REASON
from schema import run as layout
from viz_helpers import write_fer_csv


def big_cnn_plan(name: str) -> TrialPlan:
    """A kernel-5 CNN at batch 128: several times SEED2017's training memory."""
    from model.configs import CNNConfig, config_to_dict

    config = CNNConfig(filters=(64, 128, 256), convs_per_block=2, kernel_size=5, dense_units=(256,))
    training = TrainingConfig(batch_size=128, micro_batch_size=128, max_epochs=2, seed=2017)
    return TrialPlan(name, config_to_dict(config), training)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from jobs.search import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_budget_detection_prefers_gpu_memory() -> None:
    nodes = [
        {"Alive": True, "Resources": {"CPU": 4, "memory": 8 * GIB}},
        {
            "Alive": True,
            "Resources": {"CPU": 8, "GPU": 2, "gpu_memory_mb": 2 * 24576, "memory": 32 * GIB},
        },
        {"Alive": False, "Resources": {"CPU": 8, "GPU": 1, "gpu_memory_mb": 81920}},
    ]
    budget = budget_from_nodes(nodes)
    assert budget.kind == "gpu" and budget.bytes_per_worker == 24576 * MIB
    assert budget_from_nodes(nodes[:1]).bytes_per_worker == 8 * GIB
    assert budget_from_nodes(nodes, worker_memory_gb=1.5).bytes_per_worker == int(1.5 * GIB)


@pytest.mark.e2e
def test_search_refuses_what_fits_no_worker_and_tracks_the_rest(
    tmp_path: Path, tracking: MlflowClient, ray_session: None, default_runtime_memory: None
) -> None:
    data = write_fer_csv(tmp_path / "fer.csv")
    settings = SearchSettings(
        data=str(data),
        families="cnn,dnn",
        num_samples=4,
        max_epochs=2,
        time_budget_min=10,
        storage=str(tmp_path / "tune"),
        name="t-search",
        grace_epochs=1,
        cpus_per_trial=1,
    )
    # The fixed points and a kernel-5 CNN at batch 128; the worker is sized just under what
    # that CNN needs at its smallest micro-batch and what SEED2017 needs at its batch of 64:
    # the CNN must be refused, SEED2017 downsized, the DNN fit as it is.
    plans = fixed_points(("cnn", "dnn"), 2, 2017) + [big_cnn_plan("cnn-big")]
    probe = plan_trials(settings, WorkerBudget("cpu", 1, "probe"), plans)
    smallest = {e["plan"]["name"]: e["placement"]["min_estimated_mb"] for e in probe}
    whole = {e["plan"]["name"]: e["placement"]["estimated_mb"] for e in probe}
    budget_mb = min(smallest["cnn-big"], whole["seed2017"]) - 0.5
    settings.worker_memory_gb = budget_mb / 1024
    entries = plan_trials(settings, WorkerBudget("cpu", int(budget_mb * MIB), "test"), plans)
    status = {e["plan"]["name"]: e["placement"]["status"] for e in entries}
    assert status.pop("cnn-fast") in {"fits", "downsized"}
    assert status == {"seed2017": "downsized", "dnn-matched": "fits", "cnn-big": "does_not_fit"}, (
        status,
        smallest,
        whole,
    )
    largest = "cnn-big"

    staging = Path(tempfile.gettempdir())
    staged_before = set(staging.glob("fer-model-*"))
    result = run_search(settings, Strategy.fixed(plans))

    # Each model was staged for upload in the temp dir, and removed once logged.
    assert set(staging.glob("fer-model-*")) == staged_before
    # The experiment was found by name without exporting its id into this process.
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ
    assert largest in result.refused
    parent = tracking.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[layout.TAG_ROLE] == "search"
    assert parent.data.tags[layout.TAG_BACKEND] == "tensorflow"
    # The trials' measured epochs corrected the calibration's estimates (jobs/timing.py).
    assert parent.data.metrics[layout.METRIC_EPOCH_TIME_CORRECTION] > 0
    assert parent.info.run_name == Path(result.tune_path).name  # <name>-<timestamp>
    assert parent.info.run_name.startswith("t-search-")
    # The UI opens the experiment on its training runs, not the GenAI overview.
    experiment = tracking.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    children = child_runs(tracking, result.parent_run_id)
    assert len(children) == 4
    assert all(run.info.status in {"FINISHED", "FAILED"} for run in children)
    by_name = {run.info.run_name: run for run in children}
    refused_run = by_name[largest]
    assert refused_run.data.tags[layout.TAG_STATUS] == "does_not_fit"
    assert "fer.refusal" in refused_run.data.tags
    trained = [run for run in children if run.info.run_name != largest]
    seed2017 = by_name["seed2017"]
    assert int(seed2017.data.params["micro_batch_size"]) < int(seed2017.data.params["batch_size"])
    for run in trained:
        assert run.info.status == "FINISHED", run.data.tags.get("fer.error")
        assert run.data.tags[layout.TAG_STATUS] in {"finished", "early_stopped"}
        if run.data.tags[layout.TAG_STATUS] == "early_stopped":
            # Minutes inside a 10-minute budget: only ASHA can have stopped it.
            assert run.data.tags[TAG_STOP_REASON] == "scheduler"
        for key in ("family", "param_count", "estimated_memory_mb"):
            assert key in run.data.params
        # Estimated before launch from the calibration: the trial's time, next to its memory.
        assert float(run.data.params["estimated_epoch_seconds"]) > 0
        # The data it saw, as MLflow datasets: the UI's Dataset column names it.
        inputs = tracking.get_run(run.info.run_id).inputs.dataset_inputs
        contexts = {i.tags[0].value: i.dataset for i in inputs}
        assert set(contexts) == {"training", "validation"}
        assert all(d.name == "fer2013" for d in contexts.values())
        sha = parent.data.tags[layout.TAG_DATA_SHA]
        assert contexts["training"].digest == f"{sha[:24]}-training"
        assert json.loads(contexts["validation"].profile)["sha256"] == sha
        steps = [m.step for m in tracking.get_metric_history(run.info.run_id, "val_accuracy")]
        assert steps == sorted(set(steps)) and steps[0] == 1
        # peak_memory_mb: measured beside the estimate the trial was placed by.
        for key in (
            "loss",
            "accuracy",
            "val_loss",
            "epoch_seconds",
            "images_per_second",
            "peak_memory_mb",
        ):
            assert len(tracking.get_metric_history(run.info.run_id, key)) == len(steps)
        assert run.data.metrics["peak_memory_mb"] > 0
        # System metrics under MLflow's names, one sample per epoch.
        for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
            assert len(tracking.get_metric_history(run.info.run_id, key)) == len(steps), key
        # The start-up span is logged once, with the first epoch (the trial never restarted).
        setup = tracking.get_metric_history(run.info.run_id, "setup_seconds")
        assert [m.step for m in setup] == [1] and setup[0].value > 0
        # The precision the trial resolved and applied ("auto" is float32 on a CPU).
        assert run.data.params["precision"] == "auto"
        assert run.data.tags["fer.precision"] == "float32"
        # The Keras backend the trial trained on (the search's default).
        assert run.data.tags[layout.TAG_BACKEND] == "tensorflow"
        files = {f.path for f in tracking.list_artifacts(run.info.run_id, layout.MODEL_DIR)}
        assert {"model/model.keras", "model/model.sha256", "model/config.json"} <= files
        # The best epoch's validation probabilities, what the ensemble is chosen from.
        kept = layout.download_predictions(tracking, run.info.run_id, tmp_path / run.info.run_id)
        assert kept.probabilities.shape == kept.probabilities_flipped.shape == (len(kept.labels), 7)
        assert np.allclose(kept.probabilities.sum(axis=1), 1.0, atol=1e-4)
    families = {run.data.tags[layout.TAG_FAMILY] for run in trained}
    assert families == {"cnn", "dnn"}
    best = max(trained, key=lambda r: r.data.metrics["best_val_accuracy"])
    assert parent.data.tags[layout.TAG_BEST_RUN] == best.info.run_id == result.best_run_id
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(
        best.data.metrics["best_val_accuracy"]
    )
    csv_text = mlflow.artifacts.load_text(f"runs:/{result.parent_run_id}/search/trials.csv")
    assert csv_text.count("\n") == 5  # header + 4 trials
    # How the budget went: the machine's speed, and each trial's minutes and time estimate.
    assert parent.data.metrics["reference_images_per_second"] > 0
    assert parent.data.metrics["budget_trials_started"] == 3
    budget = json.loads(
        mlflow.artifacts.load_text(f"runs:/{result.parent_run_id}/search/budget.json")
    )
    assert budget["trials_started"] == 3 and budget["trials_refused"] == 1
    assert {t["name"] for t in budget["trials"]} == set(by_name)
    assert budget["epoch_time_estimate_median_abs_err"] is not None
    memory_csv = mlflow.artifacts.load_text(f"runs:/{result.parent_run_id}/search/memory.csv")
    assert memory_csv.count("\n") == 4  # header + the 3 trials that trained
    assert parent.data.metrics["memory_estimate_median_abs_err"] >= 0

    # The last step: an ensemble of the trained trials, chosen on one half of the validation
    # rows and judged on the other; the champion is whichever the parent says, with why.
    (ensemble,) = child_runs(tracking, result.parent_run_id, role="ensemble")
    assert ensemble.info.status == "FINISHED"
    assert set(ensemble.data.tags[layout.TAG_MEMBERS].split(",")) <= {
        run.info.run_id for run in trained
    }
    assert 0 <= ensemble.data.metrics["val_report_accuracy"] <= 1
    kind = parent.data.tags[layout.TAG_CHAMPION]
    assert kind in {"ensemble", "single"}, parent.data.tags
    assert ensemble.info.run_name in parent.data.tags[layout.TAG_CHAMPION_REASON]
    champion_run = ensemble.info.run_id if kind == "ensemble" else result.best_run_id
    assert parent.data.tags[layout.TAG_CHAMPION_RUN] == champion_run == result.champion_run_id
    version = tracking.get_model_version_by_alias(layout.REGISTERED_MODEL, "champion")
    assert version.run_id == champion_run
    champion = mlflow.pyfunc.load_model(f"models:/{layout.REGISTERED_MODEL}@champion")

    predictions = np.asarray(champion.predict(np.zeros((3, 48, 48, 1), dtype=np.float32)))
    assert predictions.shape == (3, 7)
    assert np.allclose(predictions.sum(axis=1), 1.0, atol=1e-4)


def test_place_fits_downsizes_or_refuses() -> None:
    from model.cnn import SEED2017, build_cnn
    from model.memory import estimate_training_memory

    model = build_cnn(SEED2017)
    full = estimate_training_memory(model, 64)
    at_8 = estimate_training_memory(model, 8, accumulation_steps=8)  # 8 x 8 = the batch of 64
    fits = place(model, 64, "adam", WorkerBudget("cpu", full + MIB, "t"), 1.0)
    assert fits.status == "fits" and fits.micro_batch_size == 64
    assert fits.resources == {"CPU": 1.0, "memory": float(fits.estimated_bytes)}
    down = place(model, 64, "adam", WorkerBudget("cpu", at_8 + 1, "t"), 1.0)
    assert down.status == "downsized" and down.micro_batch_size == 8
    assert down.estimated_bytes <= at_8 + 1 and "accumulation" in down.reason
    refused = place(model, 64, "adam", WorkerBudget("cpu", 10 * MIB, "t"), 1.0)
    assert refused.status == "does_not_fit" and refused.resources == {}
    gpu = place(model, 64, "adam", WorkerBudget("gpu", 4 * full, "t"), 2.0)
    assert gpu.resources["GPU"] == pytest.approx(0.25, abs=0.011)
    assert gpu.resources["gpu_memory_mb"] >= full / MIB
    assert gpu.gpu_memory_limit_mb >= full / MIB


@pytest.mark.e2e
def test_trials_start_in_plan_order_on_a_local_ray(
    tmp_path: Path, tracking: MlflowClient, ray_session: None
) -> None:
    """One trial at a time (each takes both CPUs): they must start in the order planned,
    although each asks Ray for a different amount of memory. (Short trials often keep the
    order even without the cap; the 60-minute benchmark did not, see the next test.)"""
    from model.configs import DNNConfig, config_to_dict

    data = write_fer_csv(tmp_path / "fer.csv")
    training = TrainingConfig(batch_size=16, micro_batch_size=16, max_epochs=1, seed=0)
    widths = (16, 512, 64, 1024)
    plans = [
        TrialPlan(
            f"order-{index}",
            config_to_dict(DNNConfig(hidden_units=(width,), normalization="rescale")),
            training,
        )
        for index, width in enumerate(widths)
    ]
    settings = SearchSettings(
        data=str(data),
        families="dnn",
        num_samples=len(plans),
        max_epochs=1,
        time_budget_min=10,
        storage=str(tmp_path / "tune"),
        name="t-order",
        cpus_per_trial=2,
        register=False,
    )
    result = run_search(settings, Strategy.fixed(plans))

    started = sorted(
        child_runs(tracking, result.parent_run_id), key=lambda run: run.info.start_time
    )
    assert [run.info.run_name for run in started] == [plan.name for plan in plans]
    assert "TUNE_MAX_PENDING_TRIALS_PG" not in os.environ  # set for the search only


def test_trial_slots_come_from_the_clusters_cpus(
    ray_session: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs.search.context import cluster_cpus, local_concurrency, slots

    assert cluster_cpus() == 2.0  # init_ray(num_cpus=2)
    assert (slots(1.0), slots(0.5), slots(0.7), slots(3.0)) == (2, 4, 2, 1)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert local_concurrency(1.0) == 2
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster's autoscaler decides
    assert local_concurrency(1.0) is None
    # No other module of jobs/ asks Ray (or the OS) for a CPU count.
    jobs = Path(__file__).resolve().parents[1] / "jobs"
    asking = {
        str(path.relative_to(jobs))
        for path in jobs.rglob("*.py")
        for call in ("cluster_resources(", "available_resources(", "cpu_count(")
        if call in path.read_text()
    }
    assert asking == {"search/context.py"}


def test_pending_trials_are_capped_only_for_a_local_search(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tune requests an actor for every pending trial and Ray grants them in no set order; one
    pending trial at a time keeps the plan order locally. A cluster (its autoscaler scales on
    pending requests) gets its slots' worth (Tune's default with a searcher is one), and a
    value the user set is left alone."""
    from jobs.search.context import PENDING_TRIALS_ENV
    from jobs.search.tune_phase import trials_in_plan_order as _trials_in_plan_order

    monkeypatch.delenv(PENDING_TRIALS_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with _trials_in_plan_order(cluster_pending=6):
        assert os.environ[PENDING_TRIALS_ENV] == "1"
    assert PENDING_TRIALS_ENV not in os.environ

    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with _trials_in_plan_order(cluster_pending=6):
        assert os.environ[PENDING_TRIALS_ENV] == "6"
    assert PENDING_TRIALS_ENV not in os.environ

    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv(PENDING_TRIALS_ENV, "8")
    with _trials_in_plan_order(cluster_pending=6):
        assert os.environ[PENDING_TRIALS_ENV] == "8"
    assert os.environ[PENDING_TRIALS_ENV] == "8"


@pytest.mark.parametrize("family", ["cnn", "dnn"])
def test_logged_signature_matches_what_a_predict_would_infer(family: str, tmp_path: Path) -> None:
    import keras
    import numpy as np
    from mlflow.models import infer_signature

    from jobs.tracking import fer_signature
    from model.configs import CNNConfig, DNNConfig, build_model

    config = (
        CNNConfig(filters=(4,), dense_units=(8,), normalization="rescale")
        if family == "cnn"
        else DNNConfig(hidden_units=(8,), normalization="rescale")
    )
    model = build_model(config)
    model.save(tmp_path / "model.keras")
    example = np.zeros((2, 48, 48, 1), dtype=np.float32)
    inferred = infer_signature(example, model.predict(example, verbose=0))
    assert fer_signature(tmp_path / "model.keras") == inferred
    keras.backend.clear_session()


def test_signature_refuses_a_model_file_with_other_inputs(tmp_path: Path) -> None:
    import keras

    from jobs.tracking import fer_signature

    inputs = keras.Input(shape=(32, 32, 3))
    outputs = keras.layers.Dense(7, activation="softmax")(keras.layers.Flatten()(inputs))
    path = tmp_path / "other.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ValueError, match=r"other\.keras: expected one float32 input of shape"):
        fer_signature(path)
    keras.backend.clear_session()


def test_a_checkpoint_tune_deleted_is_rebuilt_from_the_next_one(tmp_path: Path) -> None:
    """A driver killed between Tune registering checkpoint 3 (and deleting 2) and writing its
    experiment state restores the trial from checkpoint 2: it comes back with 3's files."""
    from ray import tune

    from jobs.restore import restorable
    from jobs.training import LAST_MODEL, STATE_FILE

    trial_dir = tmp_path / "train_trial_x"
    newer = trial_dir / "checkpoint_000003"
    newer.mkdir(parents=True)
    (newer / STATE_FILE).write_text('{"epoch": 4}')
    (newer / LAST_MODEL).write_bytes(b"model of epoch 4")
    partial = trial_dir / "checkpoint_000004"  # being written when the driver died
    partial.mkdir()
    (partial / LAST_MODEL).write_bytes(b"half")

    gone = tune.Checkpoint(str(trial_dir / "checkpoint_000002"))
    local = Path(restorable(gone).to_directory(str(tmp_path / "restored")))
    assert (local / STATE_FILE).read_text() == '{"epoch": 4}'
    assert (local / LAST_MODEL).read_bytes() == b"model of epoch 4"
    assert (trial_dir / "checkpoint_000002" / STATE_FILE).exists()  # Tune's name is back

    # A checkpoint that exists is used as it is.
    assert restorable(tune.Checkpoint(str(newer))).path == str(newer)
    # Nothing to rebuild from: a clear error, not a trial restarted from scratch.
    with pytest.raises(FileNotFoundError, match="checkpoint_000009.*is gone"):
        restorable(tune.Checkpoint(str(trial_dir / "checkpoint_000009")))


def test_a_trial_restores_from_a_checkpoint_tune_deleted(tmp_path: Path, ray_session) -> None:
    """A driver killed between Tune registering a trial's checkpoint (deleting the older one,
    num_to_keep=1) and saving its state leaves a state naming a checkpoint that is gone. Built
    here by hand: the trial fails after two checkpoints, then its last one is renamed to the
    next index, as if a newer one had been registered and the older deleted."""
    from ray import tune

    from jobs.restore import CheckpointRepair
    from jobs.training import STATE_FILE

    def trainable(config: dict) -> None:
        checkpoint = tune.get_checkpoint()
        start = 0
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                start = json.loads((Path(directory) / STATE_FILE).read_text())["epoch"]
        for epoch in range(start + 1, 4):
            if epoch == 3 and start == 0:
                raise RuntimeError("the first run stops here")
            with tempfile.TemporaryDirectory() as directory:
                (Path(directory) / STATE_FILE).write_text(json.dumps({"epoch": epoch}))
                tune.report(
                    {"epoch": epoch, "restored_from": start},
                    checkpoint=tune.Checkpoint.from_directory(directory),
                )

    tuner = tune.Tuner(
        trainable,
        run_config=tune.RunConfig(
            name="deleted",
            storage_path=str(tmp_path),
            callbacks=[CheckpointRepair()],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )
    assert tuner.fit().errors
    (trial_dir,) = [p for p in (tmp_path / "deleted").iterdir() if p.is_dir()]
    (named,) = trial_dir.glob("checkpoint_*")
    assert named.name == "checkpoint_000001"
    named.rename(trial_dir / "checkpoint_000002")

    restored = tune.Tuner.restore(str(tmp_path / "deleted"), trainable, resume_errored=True)
    (result,) = restored.fit()
    assert result.error is None, result.error
    assert result.metrics["epoch"] == 3 and result.metrics["restored_from"] == 2


@pytest.mark.e2e
def test_the_final_trains_the_best_config_until_its_share_of_the_budget_is_spent(
    tmp_path: Path, tracking: MlflowClient, ray_session: None
) -> None:
    """The final phase goes on with the best explored config on every row and plans its epochs
    on its measured epoch time: it ends on its own, finished, inside the budget, with epochs
    far below the cap."""
    data = write_fer_csv(tmp_path / "fer.csv")
    settings = SearchSettings(
        data=str(data),
        families="dnn",
        num_samples=3,
        max_epochs=1000,
        final_max_epochs=1000,  # the cap: the clock binds first
        # The calibration and Ray's start-up come out of the budget first: a minute of it on
        # a busy 2-core machine.
        time_budget_min=4.0,
        final_budget_share=0.5,
        final_trials=1,
        grace_epochs=1,
        min_rung_images=0,  # on these few hundred rows the 20,000-image floor is 472 epochs
        cpus_per_trial=1,
        storage=str(tmp_path / "tune"),
        name="t-final",
        register=False,
    )
    started = time.time()
    result = run_search(settings)

    runs = child_runs(tracking, result.parent_run_id)
    (final,) = [run for run in runs if run.data.params.get("phase") == "final"]
    assert final.info.run_name.endswith("-final")
    assert final.data.tags[layout.TAG_STATUS] == "finished", final.data.tags
    epochs = int(final.data.tags[layout.TAG_EPOCHS_DONE])
    assert 1 <= epochs < settings.final_max_epochs
    budget_s = float(final.data.params["time_budget_s"])
    assert 0 < budget_s < 120  # its share, less the margin and the setup
    trained_s = (final.info.end_time - final.info.start_time) / 1000
    assert trained_s < budget_s + 30, (trained_s, budget_s)  # setup and logging besides
    assert time.time() - started < 240 + 90  # the search as a whole: its budget, then tracking
    # Each real trial's memory estimate (its model's step, the calibrated runtime, its data)
    # against its own measured peak: a loose bound here, the benchmark holds the tight one.
    from jobs.search.summary import memory_rows

    rows = memory_rows(runs)
    assert {row["name"] for row in rows} >= {final.info.run_name}
    for row in rows:
        # Under: the reservation's promise (a trial above 1.2x its placement is tagged
        # over_reservation). Over is wasted packing, not a risk, and on these few rows the
        # fixed terms (runtime, checkpoints) dominate, and a trial the clock stops early peaks
        # low (dnn-matched once measured +0.70): looser there.
        assert -0.25 <= row["error"] <= 1.0, rows


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_an_exploiting_search_trains_seeded_copies_and_boxes_the_anchors(
    tmp_path: Path, tracking: MlflowClient, ray_session: None
) -> None:
    """strategy=exploit: no explore phase; one copy of the known-good CNN per slot, each its own
    seed, on every row to the end of the budget; the coursework anchors in their time box; the
    decision and its numbers on the parent run."""
    data = write_fer_csv(tmp_path / "fer.csv")
    settings = SearchSettings(
        data=str(data),
        families="cnn,dnn",
        max_epochs=1000,
        final_max_epochs=1000,  # the clock binds first
        time_budget_min=4,
        strategy="exploit",
        cpus_per_trial=1,
        storage=str(tmp_path / "tune"),
        name="t-exploit",
        register=False,
    )
    result = run_search(settings)

    parent = tracking.get_run(result.parent_run_id)
    assert parent.data.params[layout.PARAM_STRATEGY] == "exploit"
    assert "strategy=exploit was asked for" in parent.data.tags[layout.TAG_STRATEGY]
    runs = {run.info.run_name: run for run in child_runs(tracking, result.parent_run_id)}
    assert set(runs) == {"cnn-fast-final", "cnn-fast-final-2", "dnn-matched", "seed2017"}
    assert all(run.data.params.get("phase") == "final" for run in runs.values())
    copies = [runs["cnn-fast-final"], runs["cnn-fast-final-2"]]
    assert {run.data.tags[layout.TAG_STATUS] for run in copies} == {layout.STATUS_FINISHED}
    assert copies[0].data.params["seed"] != copies[1].data.params["seed"]
    assert {run.data.params["train_fraction"] for run in copies} == {"1.0"}
    # The second copy waited for the anchors' slot: its budget was cut to what was left.
    assert float(copies[1].data.params["time_budget_s"]) < float(
        copies[0].data.params["time_budget_s"]
    )
    for name in ("dnn-matched", "seed2017"):
        status = runs[name].data.tags[layout.TAG_STATUS]
        assert status in (*layout.TRAINED_STATUSES, layout.STATUS_OVER_BUDGET), (name, status)
        if status == layout.STATUS_OVER_BUDGET:
            assert "in its time box" in runs[name].data.tags[layout.TAG_REFUSAL]
