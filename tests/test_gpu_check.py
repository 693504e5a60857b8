"""bench/gpu_check.py on a machine without a GPU: it says so, names what it skipped, writes JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
