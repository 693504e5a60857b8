"""Settings dataclasses as argparse flags, and a quiet console (TensorFlow's log level, its
import without load-time noise): what the `jobs/` and `viz/` CLIs share, below both.

One `--field-name` flag per dataclass field (`run_id` -> `--run-id`), typed and defaulted by the
field's default, so MLproject parameters, the CLIs and the dataclasses cannot drift apart
(`tests/test_settings.py` checks them against MLproject). Imports nothing of the project.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

S = TypeVar("S")

_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off", ""}


def parse_bool(text: str) -> bool:
    """MLproject passes every parameter as text: `true`/`false` (and the usual spellings)."""
    lowered = str(text).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, *, help_defaults: bool = False
) -> None:
    """Add one `--field-name` flag per dataclass field, defaulting to the field's default.

    Bool fields parse `true`/`false` text (`parse_bool`); others convert with the default's type.
    `help_defaults` gives each flag the help text `(default: <repr>)`.
    """
    for field in fields(cls):
        default = field.default
        converter: Any = parse_bool if isinstance(default, bool) else type(default)
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=converter,
            default=default,
            help=f"(default: {default!r})" if help_defaults else None,
        )


def from_namespace(cls: type[S], namespace: argparse.Namespace) -> S:
    """Build the settings dataclass from parsed arguments (ignores unrelated attributes)."""
    values = {f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)}
    return cls(**values)


def has_local_gpu() -> bool:
    """Whether this machine has an NVIDIA device node (decided without importing TensorFlow)."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def tf_log_level() -> str:
    """TensorFlow's C++ log level for this machine's processes ($TF_CPP_MIN_LOG_LEVEL wins).

    On a machine without a GPU, TensorFlow's CUDA probe fails in every process that imports
    it and logs that failure as an error ("failed call to cuInit"), which says nothing about
    the job; level 3 keeps those out. With a GPU, level 2 keeps TensorFlow's errors visible.
    """
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL") or ("2" if has_local_gpu() else "3")


def quiet_environment() -> None:
    """What every process of a job sets before it imports TensorFlow or downloads artifacts:
    TensorFlow's level (`tf_log_level`), and no MLflow progress bars (one per download, drawn
    with carriage returns, they bury the job's own lines in a captured console; a value the
    user set wins)."""
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = tf_log_level()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# Lines TensorFlow's native libraries write to stderr while they load, whatever
# TF_CPP_MIN_LOG_LEVEL says: absl writes every message logged before absl::InitializeLog() to
# stderr (tensorflow/tensorflow#100442), so on a machine without a GPU each process prints the
# CUDA stub's notice twice, and a CUDA wheel its duplicate plugin registrations. None of them
# says anything about the job; every other line is passed on.
TF_LOAD_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
)
# On a machine without a GPU (no NVIDIA device node), TensorFlow's first look for devices
# fails its CUDA probe and logs the failure as an error in every process, also before absl
# is initialised; there it says nothing. With a GPU it is a real error and stays.
NO_GPU_NOISE = re.compile(TF_LOAD_NOISE.pattern + r"|failed call to cuInit")


def import_tensorflow() -> None:
    """Import TensorFlow (when installed) at this machine's log level without its load-time
    noise (`TF_LOAD_NOISE`); call before anything imports Keras on TensorFlow."""
    quiet_environment()
    if "tensorflow" in sys.modules:
        return
    try:
        installed = importlib.util.find_spec("tensorflow") is not None
    except ImportError:  # a Python that refuses the import (tests/no_tensorflow)
        installed = False
    if installed:
        gpu = has_local_gpu()
        # The device probe runs inside the capture too (once per process): its CUDA error is
        # what a machine without a GPU would print next.
        quiet_import(
            "tensorflow",
            TF_LOAD_NOISE if gpu else NO_GPU_NOISE,
            then=lambda tf: gpu or tf.config.list_physical_devices("GPU"),
        )


def quiet_import(
    module: str, noise: re.Pattern[str], then: Callable[[Any], Any] | None = None
) -> None:
    """Import `module` (then call `then` on it) with file descriptor 2 captured: lines
    matching `noise` are dropped, the rest written to stderr once the import returns (or
    fails)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            imported = importlib.import_module(module)
            if then is not None:
                then(imported)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().splitlines(keepends=True)
                if not noise.search(line.decode(errors="replace"))
            ]
            if kept:
                os.write(2, b"".join(kept))
