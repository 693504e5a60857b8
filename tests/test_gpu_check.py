"""bench/gpu_check.py on a machine without a GPU: it says so, names what it skipped, writes JSON;
and the lent GPU machine's script (bench/device/gpu_check.sh) in its CPU dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_gpu_check_runs_on_a_cpu_and_names_what_it_skipped(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--json", str(out), "--data", ""],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # no GPU, even on a GPU machine
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < 120
    found = json.loads(out.read_text())
    assert found["gpus"] == []
    assert set(found["skipped"]) == {
        "packed_trials",
        "estimate_vs_gpu_peak",
        "mixed_precision_throughput",
    }
    assert "no GPU visible to TensorFlow" in done.stdout


@pytest.mark.integration
def test_the_device_scripts_dry_run_writes_its_json_without_tensorflow_ray_or_mlflow(
    tmp_path: Path,
) -> None:
    """The script the GPU machine runs, on JAX on this CPU, in a Python where TensorFlow, Ray
    and MLflow do not import (as there): every kind of case runs, each in a fresh process."""
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT / "tests" / "no_tensorflow"),
    }
    done = subprocess.run(
        ["bash", "bench/device/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    found = json.loads((tmp_path / "gpu.json").read_text())
    assert found["mode"] == "jax-dry-run-cpu" and found["failed_cases"] == []
    assert found["skipped"] == {}
    assert found["facts"]["backend"] == "jax" and found["facts"]["gpus"] == []
    memory = found["estimate_vs_gpu_peak"]
    assert {row["config"] for row in memory} == {"tiny-cnn", "tiny-dnn"}
    assert all(row["estimated_mb"] > 0 and row["measured_mb"] is None for row in memory)
    speed = found["throughput"]
    for precision in ("float32", "mixed_bfloat16"):
        row = speed[f"tiny-cnn/{precision}"]
        # The last epoch is reported, not the first (which compiles).
        assert len(row["by_epoch"]) == 2 and row["images_per_second"] == row["by_epoch"][-1] > 0
    oom = found["oom_fallback"]
    assert oom["injected"] is True and oom["oom_retries"] == 1
    assert oom["epochs"] == [1, 2] and oom["micro_batch_sizes"] == [8, 8]


def test_the_device_wheels_pin_the_keras_of_requirements() -> None:
    pins = {
        line.split("==")[0]: line.strip()
        for line in (ROOT / "bench" / "device" / "wheels.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert set(pins) == {"keras", "optree", "namex"}
    assert pins["keras"] in (ROOT / "requirements.txt").read_text().splitlines()
