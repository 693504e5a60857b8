"""The local tracking stack (infra/local/stack.sh) for real: PostgreSQL, moto S3, mlflow server.

`pytest -m infra` (excluded from the default run). One stack serves the module: it starts once,
the tests below use it in file order, and the last test takes it down and proves nothing is
left. The state lives in a temporary STACK_DIR, so a developer's own `.stack/` is untouched.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.infra

ROOT = Path(__file__).resolve().parent.parent
STACK_SH = ROOT / "infra" / "local" / "stack.sh"
UP_TIMEOUT_S = 300  # the script's own per-service limit is 120 s
SEARCH_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"


@dataclass
class Stack:
    state: Path
    exports: str
    env: dict[str, str]  # the exported variables

    @property
    def url(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def backend_uri(self) -> str:
        return (self.state / "backend_store_uri").read_text().strip()

    def client_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def run_stack(
    command: str, state: Path, timeout: float = UP_TIMEOUT_S, python: str = sys.executable
) -> subprocess.CompletedProcess:
    env = {**os.environ, "STACK_DIR": str(state), "PYTHON": python}
    return subprocess.run(
        ["bash", str(STACK_SH), command],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def parse_exports(text: str) -> dict[str, str]:
    found = dict(re.findall(r"^export (\w+)=(.*)$", text, flags=re.M))
    assert found, f"no export lines in {text!r}"
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("stack") / "state"
    # First without a Python (as on a fresh clone before `make test`): a clear error that says
    # how to get one, and nothing left that blocks the `up` that follows.
    failed = run_stack("up", state, timeout=60, python=str(state.parent / "no-python"))
    assert failed.returncode != 0 and "run `make test` once" in failed.stderr, failed.stderr
    started = time.monotonic()
    result = run_stack("up", state)
    if result.returncode != 0:
        run_stack("down", state, timeout=120)
        pytest.fail(f"stack.sh up failed ({result.returncode}):\n{result.stderr}")
    print(f"stack up in {time.monotonic() - started:.1f} s", file=sys.stderr)
    try:
        yield Stack(state, result.stdout, parse_exports(result.stdout))
    finally:
        # The last test takes the stack down itself; this covers a session that stops early.
        run_stack("down", state, timeout=120)


@pytest.fixture
def tracking_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    for name, value in stack.env.items():
        monkeypatch.setenv(name, value)
    import mlflow

    # A URI set by an earlier test in this process would override the exported environment.
    mlflow.set_tracking_uri(None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.env["MLFLOW_TRACKING_URI"])
    return stack


def status(url: str, auth: tuple[str, str] | None = None) -> int:
    return requests.get(url, auth=auth, timeout=30).status_code


def bucket_keys(stack: Stack, prefix: str = "") -> list[str]:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=stack.env["MLFLOW_S3_ENDPOINT_URL"],
        aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=stack.env["ARTIFACT_BUCKET"], Prefix=prefix
    )
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


# ---- what `up` gives ------------------------------------------------------------------------


def test_up_prints_every_export(stack: Stack) -> None:
    required = {
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_S3_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "ARTIFACT_BUCKET",
    }
    assert required <= set(stack.env)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", stack.url)
    password = stack.env["MLFLOW_TRACKING_PASSWORD"]
    assert password != "password1234" and len(password) >= 12
    for secret in ("secrets.env", "env", "basic_auth.ini", "backend_store_uri"):
        assert (stack.state / secret).stat().st_mode & 0o777 == 0o600, secret


def test_only_the_right_credentials_get_in(stack: Stack) -> None:
    url = stack.url + SEARCH_PATH
    user = stack.env["MLFLOW_TRACKING_USERNAME"]
    assert status(url) == 401, "anonymous requests must be refused"
    assert status(url, (user, "not-the-password")) == 401
    assert status(url, (user, "password1234")) == 401, "MLflow's old default must not work"
    assert status(url, (user, stack.env["MLFLOW_TRACKING_PASSWORD"])) == 200


def test_a_run_lands_in_postgres_and_its_artifact_in_the_bucket(tracking_env: Stack) -> None:
    import psycopg
    from mlflow.tracking import MlflowClient

    client = MlflowClient()  # tracking URI and credentials from the exported environment
    experiment_id = client.create_experiment(f"infra-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    client.log_param(run_id, "probe", "stack")
    client.log_text(run_id, "hello from the infra test\n", "probe/hello.txt")
    client.set_terminated(run_id, "FINISHED")

    # Served artifacts: the client talks to the server only; the server writes to the bucket.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    keys = bucket_keys(tracking_env, "mlartifacts/")
    assert any(k.endswith(f"{run_id}/artifacts/probe/hello.txt") for k in keys), keys
    assert client.download_artifacts(run_id, "probe/hello.txt")

    with psycopg.connect(tracking_env.backend_uri, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT status, experiment_id FROM runs WHERE run_uuid = %s", (run_id,)
        ).fetchone()
        param = conn.execute(
            "SELECT value FROM params WHERE run_uuid = %s AND key = 'probe'", (run_id,)
        ).fetchone()
    assert row == ("FINISHED", int(experiment_id))
    assert param == ("stack",)


def pid_of(state: Path, name: str) -> int:
    return int((state / f"{name}.pid").read_text())


def test_up_twice_changes_nothing(stack: Stack) -> None:
    before = {name: pid_of(stack.state, name) for name in ("moto", "mlflow")}
    started = time.monotonic()
    again = run_stack("up", stack.state)
    assert again.returncode == 0, again.stderr
    assert again.stdout == stack.exports
    assert {name: pid_of(stack.state, name) for name in before} == before
    assert "already running" in again.stderr
    assert time.monotonic() - started < 60
    assert run_stack("env", stack.state).stdout == stack.exports


# ---- the train entry point against the stack -------------------------------------------------


def test_train_entry_point_tracks_to_the_stack(stack: Stack, fer2013_path: Path) -> None:
    if not (ROOT / "MLproject").is_file() or not (ROOT / "jobs" / "train.py").is_file():
        pytest.skip("MLproject or jobs/train.py does not exist yet")
    from mlflow.tracking import MlflowClient

    from schema.run import MODEL_DIR, MODEL_FILE

    env = stack.client_env()
    # MLproject commands call `python`: make it this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    experiment = f"infra-train-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [
            sys.executable, "-m", "mlflow", "run", str(ROOT),
            "--env-manager", "local", "-e", "train", "--experiment-name", experiment,
            "-P", f"data={fer2013_path}", "-P", "data_fraction=0.02", "-P", "epochs=1",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = re.search(r"Run \(ID '([0-9a-f]{32})'\) succeeded", result.stdout + result.stderr)
    assert match, result.stderr[-3000:]
    run_id = match[1]

    os.environ.update(stack.env)  # MlflowClient reads credentials from the environment
    try:
        run = MlflowClient().get_run(run_id)
    finally:
        for name in stack.env:
            os.environ.pop(name, None)
    assert run.info.status == "FINISHED"
    keys = bucket_keys(stack, "mlartifacts/")
    assert any(k.endswith(f"{run_id}/artifacts/{MODEL_DIR}/{MODEL_FILE}") for k in keys), keys

    if (ROOT / "viz" / "main.py").is_file():
        out = stack.state.parent / "viz_out"
        viz = subprocess.run(
            [
                sys.executable, "-m", "viz.main", "--run-id", run_id,
                "--data", str(fer2013_path), "--out", str(out), "--filters-per-layer", "2",
                *light_viz_flags(),
            ],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
            cwd=ROOT,
        )  # fmt: skip
        assert viz.returncode == 0, viz.stdout[-3000:] + viz.stderr[-3000:]
        assert any(out.rglob("*")), "viz pulled the model back but wrote nothing"


def light_viz_flags() -> list[str]:
    """Fewer gradient-ascent steps and SmoothGrad samples, where viz has those knobs: this
    test proves the model comes back from the stack, not the figures' quality."""
    try:
        from viz.settings import VizSettings
    except ImportError:
        return []
    known = {f.name for f in dataclasses.fields(VizSettings)}
    light = {"ascent_steps": "10", "smooth_samples": "2"}
    return [
        arg
        for name, value in light.items()
        if name in known
        for arg in ("--" + name.replace("_", "-"), value)
    ]


# ---- down (last: it ends the module's stack) -------------------------------------------------


def process_group(leader: int) -> set[int]:
    """Live members of a process group (servers fork workers into their group)."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == leader and fields[0] != "Z":
            members.add(int(stat.parent.name))
    return members


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's bookkeeping remains


def port_open(url: str) -> bool:
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, int(port))) == 0


def test_down_stops_everything_and_down_again_is_harmless(stack: Stack) -> None:
    pids = process_group(pid_of(stack.state, "mlflow")) | process_group(pid_of(stack.state, "moto"))
    pg_root = Path((stack.state / "pg_root").read_text().strip())
    postmaster = int((pg_root / "data" / "postmaster.pid").read_text().split()[0])
    pids.add(postmaster)
    assert all(alive(pid) for pid in pids)
    endpoints = [stack.url, stack.env["MLFLOW_S3_ENDPOINT_URL"]]

    started = time.monotonic()
    first = run_stack("down", stack.state, timeout=120)
    assert first.returncode == 0, first.stderr
    print(f"stack down in {time.monotonic() - started:.1f} s", file=sys.stderr)
    second = run_stack("down", stack.state, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "nothing to stop" in second.stderr

    left = [pid for pid in pids if alive(pid)]
    assert not left, f"still running after down: {left}"
    assert not stack.state.exists() and not pg_root.exists()
    assert not any(port_open(url) for url in endpoints)
    assert run_stack("env", stack.state).returncode == 1
