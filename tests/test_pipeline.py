"""The main job's console: no TensorFlow load-time noise, and the closing lines a user reads
last."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.search import SearchResult
from pipeline import closing_lines
from schema.cli import NO_GPU_NOISE, TF_LOAD_NOISE, quiet_import

ROOT = Path(__file__).resolve().parents[1]
# What TensorFlow 2.21 writes while it loads on a machine without a GPU (and a CUDA wheel's
# duplicate registrations), whatever TF_CPP_MIN_LOG_LEVEL says.
LOAD_NOISE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796455244.063514   16951 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.\n"
    "E0000 00:00:1758131045.203198 3722035 cuda_dnn.cc:8579] Unable to register cuDNN factory: "
    "Attempting to register factory for plugin cuDNN when one has already been registered\n"
)


def test_an_import_loses_only_tensorflows_load_noise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    for name, tail in (("noisy_ok", ""), ("noisy_broken", "raise ImportError('broken')\n")):
        (tmp_path / f"{name}.py").write_text(
            f"import os\nos.write(2, {(LOAD_NOISE + 'a real problem: ' + name + chr(10))!r}"
            f".encode())\n{tail}"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    quiet_import("noisy_ok", TF_LOAD_NOISE)
    with pytest.raises(ImportError, match="broken"):
        quiet_import("noisy_broken", TF_LOAD_NOISE)
    print("after", file=sys.stderr)
    err = capfd.readouterr().err
    assert err.splitlines() == [
        "a real problem: noisy_ok",
        "a real problem: noisy_broken",
        "after",
    ]


def test_the_cuda_probe_error_is_dropped_only_where_there_is_no_gpu() -> None:
    line = (
        "E0000 00:00:1796459237.831257   10894 cuda_platform.cc:52] failed call to cuInit: "
        "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)"
    )
    assert NO_GPU_NOISE.search(line)
    assert not TF_LOAD_NOISE.search(line)  # with a GPU it is a real error
    assert not NO_GPU_NOISE.search("E0000 cuda_platform.cc:52] out of memory")


@pytest.mark.integration
def test_a_cpu_machine_console_has_no_tensorflow_load_noise(tmp_path: Path) -> None:
    """The driver (up to its first error) and a trial worker's set-up import TensorFlow with
    TF_CPP_MIN_LOG_LEVEL unset, as a new user's first run does."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env |= {"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    worker = (
        "from jobs.trial import configure_backend\n"
        "configure_backend(1.0, 0.0)\n"
        "import keras, tensorflow\n"
        "print(keras.backend.backend(), int(tensorflow.constant(1) + 1))\n"
    )
    runs = {
        "driver": [sys.executable, "-m", "pipeline", "--data", str(tmp_path / "absent.csv")],
        "worker": [sys.executable, "-c", worker],
    }
    for name, command in runs.items():
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        console = done.stdout + done.stderr
        noisy = [line for line in console.splitlines() if TF_LOAD_NOISE.search(line)]
        assert noisy == [], f"{name}: {noisy}"
        assert "cuInit" not in console, f"{name}: {console[-2000:]}"
        if name == "driver":
            assert done.returncode == 2 and "absent.csv does not exist" in done.stderr, console
        else:
            assert done.returncode == 0 and done.stdout.strip() == "tensorflow 2", console


def test_closing_lines_name_the_champion_its_accuracy_the_report_and_how_to_serve() -> None:
    result = SearchResult(
        parent_run_id="p1",
        best_run_id="b1",
        best_val_accuracy=0.652,
        tune_path="tune",
        champion_run_id="e1",
        wall_seconds=3600,
        strategy="exploit: one cnn-fast model takes 63.0 min of a slot",
    )
    viz = {"accuracy": 0.661, "split": "PublicTest", "split_size": 3589}
    text = closing_lines(result, registered=True, viz=viz)
    assert "run e1, an ensemble of trials (0.661 on 3589 PublicTest rows" in text
    assert "best trial val_accuracy 0.652" in text
    assert "mlflow artifacts download -r e1 -a report.html" in text
    assert "make ui" in text and "make serve" in text
    assert "Strategy:  exploit: one cnn-fast model takes 63.0 min" in text
    quiet = closing_lines(result, registered=False, viz=None)
    assert "Report:" not in quiet and "make serve" not in quiet
    single = dataclasses.replace(result, champion_run_id=None)
    assert "run b1, the best trial" in closing_lines(single, registered=True, viz=None)


def test_closing_lines_of_a_search_that_trained_nothing() -> None:
    result = SearchResult("p1", None, None, "tune", wall_seconds=60)
    assert "no trained model" in closing_lines(result, registered=True, viz=None)
