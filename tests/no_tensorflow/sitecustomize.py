"""On PYTHONPATH, makes a Python like the lent GPU machine's: TensorFlow, Ray and MLflow do not
import (tests/test_gpu_check.py runs the device script's dry run so)."""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

ABSENT = ("tensorflow", "ray", "mlflow")


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Absent())
