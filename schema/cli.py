"""Settings dataclasses as argparse flags, and TensorFlow's log level: what the `jobs/` and
`viz/` CLIs share, below both.

One `--field-name` flag per dataclass field (`run_id` -> `--run-id`), typed and defaulted by the
field's default, so MLproject parameters, the CLIs and the dataclasses cannot drift apart
(`tests/test_settings.py` checks them against MLproject). Imports nothing of the project.
"""

from __future__ import annotations

import argparse
import os
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
