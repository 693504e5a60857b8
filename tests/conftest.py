"""Shared fixtures: the real data file (skipped with a reason where absent) and loopback servers."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Keep TensorFlow quiet and on the CPU threads pytest leaves it; tests build tiny models.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Ray and MLflow must never phone home from tests.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


ROOT = Path(__file__).resolve().parent.parent


def search_cmd(data: Path, storage: Path, name: str, **flags: Any) -> list[str]:
    """`python -m jobs.search` (run from ROOT) with small defaults; `flags` override them
    (underscored names)."""
    args: dict[str, Any] = {
        "families": "cnn",
        "num_samples": 1,
        "max_epochs": 2,
        "grace_epochs": 2,
        "time_budget_min": 15,
        "register": "false",
        "cpus_per_trial": 1,
        # One phase on every row: the trials these tests check are exactly the planned ones.
        "explore_fraction": 1.0,
        "final_budget_share": 0.0,
    }
    args.update(flags)
    cmd = [
        sys.executable,
        "-m",
        "jobs.search",
        "--data",
        str(data),
        "--storage",
        str(storage),
        "--name",
        name,
    ]
    for key, value in args.items():
        cmd += ["--" + key.replace("_", "-"), str(value)]
    return cmd


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, server: Any, log: Path, timeout_s: float) -> None:
    """Poll `url` until it answers; fail with the server's log if it exits or times out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)


def sqlite_tracking(monkeypatch: pytest.MonkeyPatch, root: Path, experiment: str) -> Any:
    """An MlflowClient on a fresh SQLite store under `root`, made this process's tracking URI
    (environment and mlflow's module global) with `experiment` as the experiment name."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A SQLite tracking store of this test only; mlflow's global URI is reset afterwards
    (it is a module global: later tests must not inherit it)."""
    import mlflow

    yield sqlite_tracking(monkeypatch, tmp_path, "search-test")
    mlflow.set_tracking_uri(None)


@pytest.fixture
def default_runtime_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The search's calibration measures its speed as always but reports the default runtime
    memory (`jobs.resources.DEFAULT_RUNTIME_BYTES`): a worker sized from `plan_trials`' probe
    (which has no calibration) then holds the same trials in the search, whatever this
    machine's runtime measured."""
    import dataclasses

    import jobs.timing
    from jobs.resources import DEFAULT_RUNTIME_BYTES

    measure = jobs.timing.calibrate

    def calibrate(*args: Any, **kwargs: Any) -> Any:
        measured = measure(*args, **kwargs)
        return dataclasses.replace(measured, runtime_memory_bytes=DEFAULT_RUNTIME_BYTES)

    monkeypatch.setattr(jobs.timing, "calibrate", calibrate)


def child_runs(client: Any, parent_id: str, role: str | None = "trial") -> list[Any]:
    """The child runs of `parent_id` (of one `fer.role`; every role with None)."""
    experiment = client.get_run(parent_id).info.experiment_id
    query = f"tags.`mlflow.parentRunId` = '{parent_id}'"
    if role is not None:
        query += f" and tags.`fer.role` = '{role}'"
    return client.search_runs([experiment], filter_string=query, max_results=1000)


@pytest.fixture(scope="session")
def fer2013_path() -> Path:
    """The shared FER2013 file, from $FER2013_PATH; tests that need it skip where it is unset."""
    value = os.environ.get("FER2013_PATH")
    if not value:
        pytest.skip("FER2013_PATH is not set: point it at fer2013.csv(.gz) to run real-data tests")
    path = Path(value)
    if not path.exists():
        pytest.skip(f"FER2013_PATH={value} does not exist")
    return path


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3-compatible server on loopback; yields its endpoint and sets boto3's env."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _isolated_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Parsed-data caches go to a per-session folder, never the user's ~/.cache (subprocesses
    inherit it through the environment)."""
    previous = os.environ.get("FER2013_CACHE_DIR")
    os.environ["FER2013_CACHE_DIR"] = str(tmp_path_factory.mktemp("fer2013-cache"))
    yield
    if previous is None:
        os.environ.pop("FER2013_CACHE_DIR", None)
    else:
        os.environ["FER2013_CACHE_DIR"] = previous
