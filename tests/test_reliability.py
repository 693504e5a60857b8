"""Reliability suite (issue 7): one real fault per test, against real processes.

`pytest -m reliability` (the default run excludes it). Each test is named after the numbered
requirement it proves; number 2 (driver killed, then `--resume true`) lives in
tests/test_resume.py. The faults are real: a trial process that exits with 137 and a
`ResourceExhaustedError` mid-epoch (both injected into the trial's own epoch loop by
tests/fault_hooks.py, the product carries no hook), `mlflow server`
and moto S3 processes that are stopped or sit behind a connection-dropping proxy, Keras files
with live payloads. Everything listens on 127.0.0.1, every wait is bounded, the data is a tiny
generated CSV, and each test cleans up the processes it started (by their process group).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from conftest import child_runs, free_port, search_cmd, sqlite_tracking
from fault_hooks import faulty_ray
from jobs.tracking import EPOCH_METRICS
from viz_helpers import dnn_plan, run_config, tiny_dnn, write_fer_csv

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STACK_SH = ROOT / "infra" / "local" / "stack.sh"


# ---- helpers ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _hermetic_environ(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The jobs set environment defaults in-process (MLflow HTTP retries, S3 retries): undo them
    after each test; parsed-data caches go to a temporary folder, not ~/.cache."""
    saved = dict(os.environ)
    os.environ["FER2013_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "fer-cache")
    yield
    os.environ.clear()
    os.environ.update(saved)


def job_env(**extra: str) -> dict[str, str]:
    """Environment of a job subprocess: this checkout, no inherited MLflow/Ray/S3 targets."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_USAGE_STATS_ENABLED": "0",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    for name in (
        "MLFLOW_RUN_ID",
        "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "RAY_ADDRESS",
        "AWS_RETRY_MODE",
        "AWS_MAX_ATTEMPTS",
        "AWS_ENDPOINT_URL",
        "MLFLOW_S3_ENDPOINT_URL",
    ):
        env.pop(name, None)
    for name in [n for n in env if n.startswith("MLFLOW_HTTP_REQUEST_")]:
        env.pop(name)  # the jobs choose their own (see jobs.tracking.quick_failing_client_env)
    env.update(extra)
    return env


def stop_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """Stop a process started with start_new_session=True, and whatever it left in its group.

    SIGTERM, then SIGKILL after `grace_s`; with `grace_s` 0, SIGKILL at once."""
    plan = [(signal.SIGTERM, grace_s)] if grace_s > 0 else []
    for sig, wait_s in [*plan, (signal.SIGKILL, 10)]:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            try:  # the leader is gone; children (e.g. Ray's) may still be in the group
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        break


@contextmanager
def background(
    cmd: list[str], log: Path, env: dict[str, str], err: Path | None = None
) -> Iterator[subprocess.Popen]:
    """A job in its own process group, output to files; stopped on the way out."""
    with open(log, "w") as out, open(err or log, "a") as errors:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=errors if err else subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_group(proc)


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path}: no file)"


def error_line(stderr: str) -> str:
    """The one `error: ...` line a job prints for an expected failure (jobs/cli.py)."""
    found = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(found) == 1, stderr[-4000:]
    return found[0]


def steps(client: MlflowClient, run_id: str, key: str = "val_accuracy") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def assert_complete_epochs(client: MlflowClient, run: Any, epochs: int) -> None:
    """Every per-epoch metric has exactly one value per epoch 1..epochs."""
    name = run.info.run_name
    for key in EPOCH_METRICS:
        assert steps(client, run.info.run_id, key) == list(range(1, epochs + 1)), (name, key)


@pytest.fixture
def local_ray() -> Iterator[None]:
    """A Ray of this test only (2 CPUs), shut down afterwards."""
    import ray

    from jobs.search import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def tune_results(tune_path: str) -> dict[str, list[dict[str, Any]]]:
    """Every result each trial reported, from Tune's own log (result.json per trial folder)."""
    found = {}
    for path in Path(tune_path).glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        found[path.parent.name] = rows
    return found


def planned(settings: Any) -> list[Any]:
    """The plans a search with these settings starts first, in order (names, batch sizes):
    the fixed points, up to num_samples."""
    from jobs.space import fixed_points, parse_families

    families = parse_families(settings.families)
    return fixed_points(families, settings.max_epochs, settings.seed)[: settings.num_samples]


def bigger_fer_csv(path: Path) -> Path:
    """Two tiny CSVs in one: 84 Training rows, so batch 64 makes two micro-batches per epoch."""
    first = write_fer_csv(path.with_suffix(".a.csv"), seed=0).read_text().splitlines()
    second = write_fer_csv(path.with_suffix(".b.csv"), seed=1).read_text().splitlines()
    path.write_text("\n".join(first + second[1:]) + "\n")
    return path


# ---- 1. a trial's process killed mid-trial -------------------------------------------------------


@pytest.mark.timeout(900)
def test_01_worker_killed_mid_trial_resumes_from_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs.search import run_search
    from jobs.settings import SearchSettings

    client = sqlite_tracking(monkeypatch, tmp_path, "t01")
    marker = tmp_path / "killed.pid"
    settings = SearchSettings(
        data=str(write_fer_csv(tmp_path / "fer.csv")),
        families="cnn",
        num_samples=1,
        max_epochs=3,
        grace_epochs=3,
        max_failures=2,
        time_budget_min=12,
        storage=str(tmp_path / "tune"),
        name="t01",
        register=False,
        cpus_per_trial=2,
        explore_fraction=1.0,
        final_budget_share=0.0,
    )
    (plan,) = planned(settings)
    faults = {plan.name: {"kill_at_epoch": 2, "kill_marker": str(marker)}}

    with faulty_ray(faults):
        result = run_search(settings)

    assert marker.exists(), "the trial process was never killed: the fault did not happen"
    killed_pid = int(marker.read_text())
    (trial,) = tune_results(result.tune_path).values()
    epochs = [row["epoch"] for row in trial]
    # Resumed from the epoch-2 checkpoint: epoch 3 ran in a new process, and epochs 1-2 were
    # not trained again (a restart from scratch would report 1, 2, 1, 2, 3).
    assert epochs == [1, 2, 3], epochs
    assert [row["pid"] for row in trial[:2]] == [killed_pid, killed_pid]
    assert trial[2]["pid"] != killed_pid

    (run,) = child_runs(client, result.parent_run_id)
    assert run.info.status == "FINISHED", run.data.tags.get("fer.error")
    assert run.data.tags["fer.trial_status"] == "finished"
    assert run.data.tags["fer.epochs_done"] == "3"
    assert_complete_epochs(client, run, 3)
    assert result.best_run_id == run.info.run_id
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"


# ---- 3. the tracking server goes down ----------------------------------------------------------


class MlflowServer:
    """A plain `mlflow server` (SQLite store, local artifacts) on a loopback port."""

    def __init__(self, root: Path, port: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.port = root, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> None:
        import requests

        cmd = [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root}/server.db",
            "--artifacts-destination",
            str(self.root / "artifacts"),
        ]
        env = job_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"mlflow server exited:\n{tail(self.log)}"
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(f"mlflow server not healthy after {timeout_s} s:\n{tail(self.log)}")

    def stop(self, crash: bool = False) -> None:
        """Stop the server: SIGTERM (graceful), or with `crash` SIGKILL at once."""
        if self.proc is not None:
            stop_group(self.proc, grace_s=0 if crash else 20)
            self.proc = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)
        raise AssertionError(f"port {self.port} still accepts connections after stop")


@pytest.fixture
def quick_client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's MLflow calls fail fast (no minutes of retries while a server is down)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def wait_for_first_epoch(
    client: MlflowClient,
    experiment: str,
    driver: subprocess.Popen,
    log: Path,
    timeout_s: float = 600,
) -> str:
    """Poll until some trial's first epoch metric is in the store; returns the parent run id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert driver.poll() is None, f"the search exited early:\n{tail(log)}"
        try:
            found = client.get_experiment_by_name(experiment)
            runs = (
                client.search_runs(
                    [found.experiment_id],
                    filter_string="tags.`fer.role` = 'trial' and metrics.val_accuracy >= 0",
                )
                if found
                else []
            )
        except Exception:
            runs = []
        if runs:
            return runs[0].data.tags["mlflow.parentRunId"]
        time.sleep(0.5)
    raise AssertionError(f"no epoch metric within {timeout_s} s:\n{tail(log)}")


@pytest.mark.timeout(1200)
def test_03_tracking_server_down_30s_then_every_metric_arrives(
    tmp_path: Path, quick_client_env: None
) -> None:
    from jobs.settings import SearchSettings

    server = MlflowServer(tmp_path / "server", free_port())
    server.start()
    client = MlflowClient(server.url)
    log = tmp_path / "search.log"
    env = job_env(
        MLFLOW_TRACKING_URI=server.url, MLFLOW_EXPERIMENT_NAME="t03", FER_TRACKING_DRAIN_S="300"
    )
    cmd = search_cmd(
        write_fer_csv(tmp_path / "fer.csv"),
        tmp_path / "tune",
        "t03",
        num_samples=2,
        max_epochs=4,
        grace_epochs=4,
    )
    try:
        with background(cmd, log, env) as driver:
            parent_id = wait_for_first_epoch(client, "t03", driver, log)
            server.stop(crash=True)  # at once, so later epochs end while it is down
            down_ms = time.time() * 1000
            outage_end = time.monotonic() + 30
            while time.monotonic() < outage_end:
                assert driver.poll() is None, f"the search died with the server:\n{tail(log)}"
                time.sleep(1)
            server.start()
            up_ms = time.time() * 1000
            returncode = driver.wait(timeout=600)
        assert returncode == 0, tail(log)
        assert "tracking store unreachable" in log.read_text(), "the outage went unnoticed"

        runs = child_runs(client, parent_id)
        names = {p.name for p in planned(SearchSettings(families="cnn", num_samples=2))}
        assert {r.info.run_name for r in runs} == names and len(runs) == 2
        during = 0
        for run in runs:
            assert run.info.status == "FINISHED", run.data.tags.get("fer.error")
            assert run.data.tags["fer.trial_status"] == "finished"
            assert_complete_epochs(client, run, 4)
            history = client.get_metric_history(run.info.run_id, "val_accuracy")
            during += sum(down_ms <= m.timestamp <= up_ms for m in history)
            files = {f.path for f in client.list_artifacts(run.info.run_id, "model")}
            assert "model/model.keras" in files
        # Epochs that ended while the server was down were buffered, then delivered later.
        assert during >= 1, "no epoch ended during the outage: the test proved nothing"
        assert client.get_run(parent_id).info.status == "FINISHED"
    finally:
        server.stop()


def checkpoint_epochs(storage: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["epoch"] for p in storage.rglob("state.json"))


@pytest.mark.timeout(900)
def test_03_tracking_server_down_for_good_fails_clearly_and_keeps_checkpoints(
    tmp_path: Path, quick_client_env: None
) -> None:
    server = MlflowServer(tmp_path / "server", free_port())
    server.start()
    client = MlflowClient(server.url)
    out, err = tmp_path / "search.out", tmp_path / "search.err"
    env = job_env(
        MLFLOW_TRACKING_URI=server.url, MLFLOW_EXPERIMENT_NAME="t03b", FER_TRACKING_DRAIN_S="20"
    )
    storage = tmp_path / "tune"
    cmd = search_cmd(
        write_fer_csv(tmp_path / "fer.csv"), storage, "t03b", max_epochs=3, grace_epochs=3
    )
    try:
        with background(cmd, out, env, err=err) as driver:
            wait_for_first_epoch(client, "t03b", driver, err)
            server.stop()
            stopped = time.monotonic()
            try:
                returncode = driver.wait(timeout=420)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the search hung with the tracking server down:\n{tail(err)}")
            waited = time.monotonic() - stopped
    finally:
        server.stop()
    assert returncode == 2, tail(err)
    last = error_line(err.read_text())
    assert last.startswith(
        f"error: the MLflow tracking store ({server.url}) stayed unreachable for 20 s"
    ), tail(err)
    assert "Trial checkpoints are kept in Tune storage" in last
    assert waited < 400
    # The trial ran to the end and its checkpoint (with the best model) is in Tune storage.
    assert checkpoint_epochs(storage)[-1] == 3
    (final,) = [
        p.parent for p in storage.rglob("state.json") if json.loads(p.read_text())["epoch"] == 3
    ]
    assert (final / "best.keras").is_file() and (final / "model.keras").is_file()


@pytest.mark.timeout(600)
def test_03_tracking_server_down_at_start_is_one_clear_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = job_env(MLFLOW_TRACKING_URI=url, MLFLOW_EXPERIMENT_NAME="t03c")
    cmd = search_cmd(write_fer_csv(tmp_path / "fer.csv"), tmp_path / "tune", "t03c")
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 2, done.stderr[-4000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    last = error_line(done.stderr)
    assert last.startswith(f"error: MLflow tracking store {url}: "), done.stderr[-4000:]
    assert time.monotonic() - started < 480


# ---- 4. concurrent trials on the default SQLite store -------------------------------------------


@pytest.mark.timeout(1200)
def test_04_eight_concurrent_trials_on_sqlite(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # All eight must run at once to load SQLite with eight writers. A local search starts its
    # trials one after another (one pending at a time keeps the plan order), and a tiny trial
    # can end before the eighth starts: let Tune request all eight together here.
    env = job_env(
        MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="t04", TUNE_MAX_PENDING_TRIALS_PG="8"
    )
    cmd = search_cmd(
        write_fer_csv(tmp_path / "fer.csv"),
        tmp_path / "tune",
        "t04",
        families="dnn",
        num_samples=8,
        cpus_per_trial=0.25,
        max_epochs=2,
        grace_epochs=2,
        worker_memory_gb=64,
    )
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1100)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "database is locked" not in output.lower()
    parent_id = re.findall(r'"parent_run_id": "([0-9a-f]{32})"', done.stdout)[-1]

    client = MlflowClient(uri)
    runs = child_runs(client, parent_id)
    assert len(runs) == 8, [r.info.run_name for r in runs]
    for run in runs:
        assert run.info.status == "FINISHED", (run.info.run_name, run.data.tags.get("fer.error"))
        assert run.data.tags["fer.trial_status"] == "finished"
        assert_complete_epochs(client, run, 2)
        assert len(client.get_metric_history(run.info.run_id, "best_val_accuracy")) == 2
    # All eight were running at once: every child run started before any of them ended.
    assert max(r.info.start_time for r in runs) < min(r.info.end_time for r in runs)


# ---- 5. a config larger than every worker --------------------------------------------------------


@pytest.mark.timeout(900)
def test_05_config_larger_than_every_worker_is_refused_before_launch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_ray: None, default_runtime_memory: None
) -> None:
    from jobs.resources import WorkerBudget
    from jobs.search import Strategy, plan_trials, run_search
    from jobs.settings import SearchSettings
    from jobs.space import fixed_points

    client = sqlite_tracking(monkeypatch, tmp_path, "t05")
    plans = fixed_points(("dnn",), 2, 2017) + [
        dnn_plan(f"dnn-{width}", (width,), max_epochs=2) for width in (16, 32, 64)
    ]
    settings = SearchSettings(
        data=str(write_fer_csv(tmp_path / "fer.csv")),
        families="dnn",
        num_samples=4,
        max_epochs=2,
        grace_epochs=2,
        time_budget_min=12,
        storage=str(tmp_path / "tune"),
        name="t05",
        register=False,
    )
    probe = {
        e["plan"]["name"]: e["placement"]
        for e in plan_trials(settings, WorkerBudget("cpu", 1, "probe"), plans)
    }
    # A worker just too small for the param-matched DNN even at its smallest micro-batch.
    budget_mb = probe["dnn-matched"]["min_estimated_mb"] - 0.5
    settings.worker_memory_gb = budget_mb / 1024
    too_big = {name for name, p in probe.items() if p["min_estimated_mb"] > budget_mb}
    fitting = set(probe) - too_big
    assert "dnn-matched" in too_big and fitting, probe

    result = run_search(settings, Strategy.fixed(plans))

    assert set(result.refused) == too_big
    runs = {r.info.run_name: r for r in child_runs(client, result.parent_run_id)}
    assert set(runs) == set(probe)
    for name in too_big:
        run = runs[name]
        assert run.data.tags["fer.trial_status"] == "does_not_fit"
        assert "largest worker" in run.data.tags["fer.refusal"]
        assert "ray.trial_id" not in run.data.tags  # never handed to Tune
        assert not client.get_metric_history(run.info.run_id, "val_accuracy")
    for name in fitting:
        run = runs[name]
        assert run.info.status == "FINISHED", run.data.tags.get("fer.error")
        assert run.data.tags["fer.trial_status"] == "finished"
        assert float(run.data.params["estimated_memory_mb"]) <= budget_mb
        assert_complete_epochs(client, run, 2)
    # Refused before launch: Tune only ever saw the trials that fit.
    assert len(tune_results(result.tune_path)) == len(fitting)
    assert result.best_run_id in {runs[name].info.run_id for name in fitting}


# ---- 6. OOM at runtime ------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_06_runtime_oom_halves_the_micro_batch_and_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs.search import run_search
    from jobs.settings import SearchSettings

    client = sqlite_tracking(monkeypatch, tmp_path, "t06")
    settings = SearchSettings(
        data=str(bigger_fer_csv(tmp_path / "fer.csv")),
        families="cnn",
        num_samples=1,
        max_epochs=3,
        grace_epochs=3,
        time_budget_min=12,
        storage=str(tmp_path / "tune"),
        name="t06",
        register=False,
        worker_memory_gb=16,
        cpus_per_trial=2,
        explore_fraction=1.0,
        final_budget_share=0.0,
    )
    (plan,) = planned(settings)
    batch = plan.training.batch_size
    half = batch // 2
    assert batch <= 64, "84 training rows must make at least two micro-batches an epoch"
    # A real tf.errors.ResourceExhaustedError in epoch 2 while the micro-batch is above half.
    faults = {plan.name: {"oom_at_epoch": 2, "above_micro_batch": half}}

    with faulty_ray(faults):
        result = run_search(settings)

    (trial,) = tune_results(result.tune_path).values()
    assert [row["epoch"] for row in trial] == [1, 2, 3]
    assert [row["micro_batch_size"] for row in trial] == [batch, half, half]
    assert [row["oom_retries"] for row in trial] == [0, 1, 1]
    (run,) = child_runs(client, result.parent_run_id)
    assert run.info.status == "FINISHED", run.data.tags.get("fer.error")
    assert run.data.tags["fer.trial_status"] == "finished"
    assert run.data.tags["fer.micro_batch_size"] == str(half)
    assert run.data.tags["fer.oom_retries"] == "1"
    assert run.data.params["batch_size"] == str(batch)
    assert run.data.params["micro_batch_size"] == str(batch)  # the plan; the tags: what ran
    assert_complete_epochs(client, run, 3)
    local = client.download_artifacts(run.info.run_id, "model/config.json", str(tmp_path))
    saved = json.loads(Path(local).read_text())
    assert saved["training"]["micro_batch_size"] == half
    assert saved["training"]["batch_size"] == batch


# ---- 7. malformed data -------------------------------------------------------------------------


def _bad_rows(lines: list[str]) -> dict[str, tuple[list[str], str]]:
    """Kinds of bad input -> (file lines, what the DataError must say). Row 21 is line 21."""
    row = lines[20]
    label, pixels, usage = row.split(",")
    values = pixels.split()
    header = lines[0]

    def at_21(new: str) -> list[str]:
        return lines[:20] + [new] + lines[21:]

    return {
        "short pixels": (at_21(f"{label},{' '.join(values[:-1])},{usage}"), "line 21: "),
        "pixel 256": (at_21(f"{label},{' '.join(values[:-1] + ['256'])},{usage}"), "line 21: "),
        "text pixel": (at_21(f"{label},{' '.join(['x'] + values[1:])},{usage}"), "line 21: "),
        "label 9": (at_21(f"9,{pixels},{usage}"), "line 21: label"),
        "usage": (at_21(f"{label},{pixels},Validation"), "line 21: Usage"),
        "extra field": (at_21(row + ",x"), "line 21: expected 3 comma-separated fields"),
        "no pixels column": (
            [header.replace("pixels", "pixelz")] + lines[1:],
            "line 1: missing column",
        ),
    }


@pytest.mark.timeout(900)
def test_07_malformed_data_fails_before_any_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from jobs.search import run_search
    from jobs.settings import SearchSettings
    from model.data import DataError

    client = sqlite_tracking(monkeypatch, tmp_path, "t07")
    lines = write_fer_csv(tmp_path / "good.csv").read_text().splitlines()
    assert not ray.is_initialized()
    for kind, (bad_lines, expected) in _bad_rows(lines).items():
        path = tmp_path / f"{kind.replace(' ', '_')}.csv"
        path.write_text("\n".join(bad_lines) + "\n")
        settings = SearchSettings(data=str(path), storage=str(tmp_path / "tune"), name="t07")
        with pytest.raises(DataError) as info:
            run_search(settings)
        assert str(info.value).startswith(f"{path}, {expected}"), (kind, str(info.value))
    assert not ray.is_initialized(), "Ray started before the data was checked"
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not (tmp_path / "tune").exists()

    # The same through the CLI and through `mlflow run`: a non-zero exit with that message.
    bad = tmp_path / "label_9.csv"
    uri = f"sqlite:///{tmp_path}/cli.db"
    cli = subprocess.run(
        search_cmd(bad, tmp_path / "tune", "t07"),
        cwd=ROOT,
        env=job_env(MLFLOW_TRACKING_URI=uri),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 2, cli.stderr[-3000:]
    assert error_line(cli.stderr).startswith(f"error: {bad}, line 21: label")
    assert "Traceback" not in cli.stderr

    project = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(ROOT),
            "--env-manager",
            "local",
            "-e",
            "search",
            "--experiment-name",
            "t07-project",
            "-P",
            f"data={bad}",
            "-P",
            f"storage={tmp_path / 'tune'}",
        ],
        cwd=ROOT,
        env=job_env(MLFLOW_TRACKING_URI=uri),
        capture_output=True,
        text=True,
        timeout=400,
    )
    output = project.stdout + project.stderr
    assert project.returncode != 0, output[-3000:]
    assert f"error: {bad}, line 21: label" in output, output[-3000:]
    assert "Started a local Ray instance" not in output
    cli_client = MlflowClient(uri)
    experiment = cli_client.get_experiment_by_name("t07-project")
    runs = cli_client.search_runs([experiment.experiment_id])
    assert runs, "mlflow run created no run"
    assert [r.info.status for r in runs] == ["FAILED"] * len(runs)
    assert not (tmp_path / "tune").exists()


# ---- 8. hostile model artifacts ----------------------------------------------------------------


class _PicklePayload:
    """Unpickling this writes `path` (what a pickled "model" could do to a viz host)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.path, "pwned by a pickle"))


def _gadget_keras(good: Path, out: Path, gadget: dict[str, Any]) -> Path:
    """`good` with its Flatten layer's class replaced by `gadget` (module/class_name/config)."""
    with zipfile.ZipFile(good) as source:
        members = {name: source.read(name) for name in source.namelist()}
    config = json.loads(members["config.json"])
    (layer,) = [lay for lay in config["config"]["layers"] if lay["class_name"] == "Flatten"]
    layer.update(gadget)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(out, "w") as target:
        for name, data in members.items():
            target.writestr(name, data)
    return out


@pytest.mark.timeout(600)
def test_08_hostile_model_artifacts_are_refused_by_viz(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import keras

    from model.data import load_fer2013
    from schema.run import (
        CONFIG_FILE,
        MODEL_DIR,
        MODEL_FILE,
        SHA_FILE,
        log_model_files,
        sha256_file,
    )
    from viz.main import run_viz
    from viz.runs import VizError
    from viz.settings import VizSettings

    client = sqlite_tracking(monkeypatch, tmp_path, "t08")
    experiment_id = client.create_experiment(
        "t08-hostile", artifact_location=(tmp_path / "art").as_uri()
    )
    csv = write_fer_csv(tmp_path / "fer.csv")
    data_sha = load_fer2013(csv).sha256
    markers = tmp_path / "markers"
    markers.mkdir()
    build = tmp_path / "build"
    build.mkdir()
    good = build / "good.keras"
    tiny_dnn().save(good)
    config = run_config("dnn", csv, data_sha, 100)

    hostile: dict[str, Path] = {}
    # A Lambda layer whose function writes a marker: live (it ran while the model was built).
    lam_marker = markers / "lambda"
    inputs = keras.Input((48, 48, 1))
    x = keras.layers.Lambda(
        lambda t, m=str(lam_marker): (__import__("pathlib").Path(m).write_text("pwned"), t)[1]
    )(inputs)
    x = keras.layers.Flatten()(x)
    keras.Model(inputs, keras.layers.Dense(7, activation="softmax")(x)).save(build / "lam.keras")
    assert lam_marker.exists(), "the Lambda payload is not live"
    lam_marker.unlink()
    hostile["lambda"] = build / "lam.keras"
    # Module gadgets in config.json: classes outside Keras that would run a command or write.
    origin = csv.as_uri()
    gadgets = {
        "os.system": {
            "module": "os",
            "class_name": "system",
            "config": {"command": f"touch {markers / 'os_system'}"},
        },
        "subprocess.Popen": {
            "module": "subprocess",
            "class_name": "Popen",
            "config": {"args": ["touch", str(markers / "popen")]},
        },
        "keras.utils.get_file": {
            "module": "keras.utils",
            "class_name": "get_file",
            "config": {
                "fname": "get_file",
                "origin": origin,
                "cache_dir": str(markers),
                "cache_subdir": ".",
            },
        },
    }
    for name, gadget in gadgets.items():
        hostile[name] = _gadget_keras(good, build / f"{name}.keras", gadget)
    # A pickle in place of model.keras: live (unpickling a copy writes its marker).
    blob = pickle.dumps(_PicklePayload(markers / "pickle"))
    pickle.loads(blob)
    assert (markers / "pickle").exists(), "the pickle payload is not live"
    (markers / "pickle").unlink()
    (build / "pickle.keras").write_bytes(blob)
    hostile["pickle as model.keras"] = build / "pickle.keras"

    settings = dict(data=str(csv), ascent_steps=5, smooth_samples=2, filters_per_layer=2)
    for name, path in hostile.items():
        run_id = client.create_run(experiment_id, run_name=name).info.run_id
        log_model_files(client, run_id, path, config)
        with pytest.raises(VizError) as info:
            run_viz(VizSettings(run_id=run_id, **settings), client)
        message = str(info.value)
        # Refused by the safe load, with the recorded hash matching the file.
        assert "safe_mode=True" in message, (name, message)
        assert "SHA-256" not in message, (name, message)
        local = Path(client.download_artifacts(run_id, MODEL_DIR, str(tmp_path / run_id)))
        assert sha256_file(local / MODEL_FILE) == (local / SHA_FILE).read_text().split()[0]
        assert sha256_file(local / MODEL_FILE) == sha256_file(path)
        gadget = gadgets.get(name)
        if gadget:
            assert gadget["class_name"] in message, (name, message)
        # Nothing was logged to a refused run.
        assert {f.path for f in client.list_artifacts(run_id)} == {MODEL_DIR}, name

    # A pickled model placed in a run as model.pkl (no model.keras): refused, never unpickled.
    run_id = client.create_run(experiment_id, run_name="model.pkl").info.run_id
    staged = tmp_path / "pkl"
    staged.mkdir()
    (staged / "model.pkl").write_bytes(blob)
    (staged / SHA_FILE).write_text(sha256_file(staged / "model.pkl") + "\n")
    (staged / CONFIG_FILE).write_text(json.dumps(config))
    client.log_artifacts(run_id, str(staged), MODEL_DIR)
    with pytest.raises(VizError, match=r"lacks model \(expected model\.keras"):
        run_viz(VizSettings(run_id=run_id, **settings), client)

    assert not any(markers.iterdir()), f"a payload ran: {sorted(markers.iterdir())}"


# ---- 9. team server authentication --------------------------------------------------------------


def _run_stack(command: str, state: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "STACK_DIR": str(state), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(STACK_SH), command], capture_output=True, text=True, timeout=timeout, env=env
    )


def _artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for info in client.list_artifacts(run_id, path):
        found += _artifact_files(client, run_id, info.path) if info.is_dir else [info.path]
    return found


@pytest.mark.timeout(1200)
def test_09_team_server_auth_and_no_credentials_in_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    import requests

    state = tmp_path / "stack"
    try:
        up = _run_stack("up", state, timeout=420)
    except subprocess.TimeoutExpired:
        up = None
    if up is None or up.returncode != 0:
        _run_stack("down", state, timeout=120)
        reason = up.stderr.strip().splitlines()[-1] if up and up.stderr.strip() else "timed out"
        pytest.skip(f"infra/local/stack.sh up could not start the stack: {reason}")
    try:
        exports = dict(re.findall(r"^export (\w+)=(.*)$", up.stdout, flags=re.M))
        url, user = exports["MLFLOW_TRACKING_URI"], exports["MLFLOW_TRACKING_USERNAME"]
        password = exports["MLFLOW_TRACKING_PASSWORD"]
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(api, timeout=30).status_code == 401, "anonymous call accepted"
        assert (
            requests.get(api, auth=(user, "wrong-" + password[:4]), timeout=30).status_code == 401
        )
        assert requests.get(api, auth=(user, "password1234"), timeout=30).status_code == 401
        assert requests.get(api, auth=("admin", "password1234"), timeout=30).status_code == 401
        assert requests.get(api, auth=(user, password), timeout=30).status_code == 200

        secrets = {
            "tracking password": password,
            "AWS secret key": exports["AWS_SECRET_ACCESS_KEY"],
            "basic-auth token": base64.b64encode(f"{user}:{password}".encode()).decode(),
        }
        for line in (state / "secrets.env").read_text().splitlines():
            name, _, value = line.partition("=")
            if name in {"PG_PASSWORD", "FLASK_KEY"}:
                secrets[name] = value
        experiment = f"t09-{uuid.uuid4().hex[:8]}"
        train = subprocess.run(
            [
                sys.executable,
                "-m",
                "jobs.train",
                "--data",
                str(write_fer_csv(tmp_path / "f.csv")),
                "--epochs",
                "1",
            ],
            cwd=ROOT,
            env=job_env(**exports, MLFLOW_EXPERIMENT_NAME=experiment),
            capture_output=True,
            text=True,
            timeout=900,
        )
        output = train.stdout + train.stderr
        for name, value in secrets.items():
            assert value not in output, f"the train job printed the {name}"
        assert train.returncode == 0, output[-3000:]
        run_id = re.findall(r'"run_id": "([0-9a-f]{32})"', train.stdout)[-1]

        for name, value in exports.items():
            monkeypatch.setenv(name, value)
        mlflow.set_tracking_uri(url)
        client = MlflowClient(url)
        run = client.get_run(run_id)
        texts = {"params": json.dumps(run.data.params), "tags": json.dumps(run.data.tags)}
        files = _artifact_files(client, run_id)
        assert {"model/model.keras", "model/config.json", "model/model.sha256"} <= set(files)
        local = Path(client.download_artifacts(run_id, "", str(tmp_path / "artifacts")))
        model_uri = run.data.tags["fer.model_uri"]
        logged = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "lm")))
        model_id = model_uri.split("/")[-1]
        logged_model = client.get_logged_model(model_id)
        texts["logged model params"] = json.dumps(logged_model.params)
        texts["logged model tags"] = json.dumps(logged_model.tags)
        scanned = [p for root in (local, logged) for p in root.rglob("*") if p.is_file()]
        assert len(scanned) >= len(files) + 2  # the run's files and the MLflow model's
        for path in scanned:
            texts[str(path.relative_to(tmp_path))] = path.read_bytes().decode("latin-1")
        for where, text in texts.items():
            for name, value in secrets.items():
                assert value not in text, f"the {name} is in {where}"
    finally:
        down = _run_stack("down", state, timeout=180)
        assert down.returncode == 0, down.stderr[-2000:]


# ---- 10. transient S3 faults -------------------------------------------------------------------


class DroppingProxy:
    """A TCP proxy on 127.0.0.1: resets the next `drop` connections, forwards the others."""

    def __init__(self, target_port: int, drop: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.lock = threading.Lock()
        self.drop_left, self.dropped, self.forwarded = drop, 0, 0
        self.sockets: list[socket.socket] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def reset(self, drop: int) -> None:
        with self.lock:
            self.drop_left, self.dropped, self.forwarded = drop, 0, 0

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                drop = self.drop_left > 0
                self.drop_left -= drop
                self.dropped += drop
                self.forwarded += not drop
            if drop:  # an RST, as from a crashed or overloaded endpoint
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                continue
            threading.Thread(target=self._forward, args=(conn,), daemon=True).start()

    def _forward(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        with self.lock:
            self.sockets += [conn, upstream]
        back = threading.Thread(target=self._pipe, args=(upstream, conn), daemon=True)
        back.start()
        self._pipe(conn, upstream)
        back.join(timeout=30)
        conn.close()
        upstream.close()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.stopping.set()
        self.server.close()
        self.thread.join(timeout=5)
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.close()
                except OSError:
                    pass


@pytest.mark.timeout(900)
def test_10_s3_upload_survives_dropped_connections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: str
) -> None:
    import boto3
    from botocore.exceptions import BotoCoreError

    from schema.run import download_model_files, sha256_file

    bucket, drops = "fer-artifacts", 5
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    proxy = DroppingProxy(int(s3_server.rsplit(":", 1)[1]), drop=drops)
    try:
        # Control: botocore's defaults (standard mode, 3 attempts) lose to this fault.
        monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
        monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
        with pytest.raises(BotoCoreError):
            boto3.client("s3", endpoint_url=proxy.url).put_object(
                Bucket=bucket, Key="control", Body=b"x"
            )
        assert proxy.forwarded == 0 and 1 < proxy.dropped < drops

        proxy.reset(drop=drops)
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        client = MlflowClient(uri)
        client.create_experiment("t10", artifact_location=f"s3://{bucket}/mlflow")
        env = job_env(
            MLFLOW_TRACKING_URI=uri,
            MLFLOW_EXPERIMENT_NAME="t10",
            MLFLOW_S3_ENDPOINT_URL=proxy.url,
            AWS_ENDPOINT_URL=proxy.url,
        )
        train = subprocess.run(
            [
                sys.executable,
                "-m",
                "jobs.train",
                "--data",
                str(write_fer_csv(tmp_path / "f.csv")),
                "--epochs",
                "1",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=800,
        )
        assert train.returncode == 0, (train.stdout + train.stderr)[-4000:]
        assert proxy.dropped == drops, "the injected faults were not all hit"
        assert proxy.forwarded >= 1
    finally:
        proxy.close()
    summary = json.loads(train.stdout[train.stdout.rindex("{\n") :])
    run = client.get_run(summary["run_id"])
    assert run.info.artifact_uri.startswith(f"s3://{bucket}/mlflow/")
    # Straight from the S3 server now: the stored model is the one the job hashed.
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server)
    files = download_model_files(client, summary["run_id"], tmp_path / "download")
    digest = sha256_file(files["model"])
    assert digest == files["sha256"].read_text().split()[0] == summary["model_sha256"]
