"""Kill the search driver mid-search; `--resume true` completes it without duplicate child runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import child_runs, search_cmd
from viz_helpers import write_fer_csv

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.reliability


def killme_command(data: Path, storage: Path, resume: bool) -> list[str]:
    """Four trials on every row, the fixed points then the searcher's first."""
    return search_cmd(
        data,
        storage,
        "killme",
        families="cnn,dnn",
        num_samples=4,
        max_epochs=4,
        grace_epochs=4,
        resume=str(resume).lower(),
    )


def test_02_driver_killed_then_resumed(tmp_path: Path) -> None:
    data = write_fer_csv(tmp_path / "fer.csv")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_EXPERIMENT_NAME": "resume",
        "PYTHONPATH": str(ROOT),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("MLFLOW_RUN_ID", None)
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(
            killme_command(data, tmp_path / "tune", False),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = MlflowClient(uri)
    deadline = time.monotonic() + 400
    parent_id = None
    # Kill once some trial has logged an epoch but the search is not over.
    while time.monotonic() < deadline:
        time.sleep(2)
        assert driver.poll() is None, log_path.read_text()[-3000:]
        try:
            experiment = client.get_experiment_by_name("resume")
            if experiment is None:
                continue
            parents = client.search_runs(
                [experiment.experiment_id], filter_string="tags.`fer.role` = 'search'"
            )
        except Exception:
            continue
        if not parents:
            continue
        parent_id = parents[0].info.run_id
        logged = [
            r
            for r in child_runs(client, parent_id)
            if client.get_metric_history(r.info.run_id, "val_accuracy")
        ]
        if logged:
            break
    assert parent_id is not None, log_path.read_text()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    before = {r.data.tags.get("ray.trial_id") for r in child_runs(client, parent_id)}
    time.sleep(3)  # let the orphaned Ray processes notice their driver is gone

    second = subprocess.run(
        killme_command(data, tmp_path / "tune", True),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    children = child_runs(client, parent_id)
    trial_ids = [r.data.tags.get("ray.trial_id") for r in children]
    assert len(children) == 4, [(r.info.run_name, r.info.status) for r in children]
    assert len(set(trial_ids)) == len(trial_ids), "a trial got two child runs"
    assert before <= set(trial_ids)
    assert all(r.info.status != "RUNNING" for r in children)
    assert client.get_run(parent_id).info.status == "FINISHED"
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert len(steps) == len(set(steps)), f"{run.info.run_name}: duplicated epochs {steps}"
        assert run.data.tags.get("fer.trial_status") in {"finished", "early_stopped"}, (
            f"{run.info.run_name}: {run.data.tags.get('fer.error', 'no error tag')[-2000:]}"
        )
