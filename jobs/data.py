"""The data every job trains on: the source resolved, loaded, subset and split once.

The search driver, the single-run `train` job and `prepare` share it; none imports another job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.settings import DATA_HELP


def resolve_data(source: str) -> str:
    """Absolute local path (or the URI unchanged); a clear error where the file is missing."""
    if source.startswith("s3://"):
        return source
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = (Path.cwd() / path).resolve()
    if not path.exists():
        raise FileNotFoundError(
            f"data: {path} does not exist. {DATA_HELP} Then pass -P data=/path/to/fer2013.csv "
            f"(or --data), or set it to an s3:// URI."
        )
    return str(path)


def prepare_arrays(data: str, fraction: float, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load, subset and split once in the driver; trials get the arrays via the object store."""
    from model.data import load_fer2013
    from model.preprocessing import pixel_statistics

    dataset = load_fer2013(data)
    subset = dataset.subset(fraction, seed) if fraction < 1.0 else dataset
    x_train, y_train = subset.split("Training")
    x_val, y_val = subset.split("PublicTest")
    mean, variance = pixel_statistics(x_train)
    arrays = {
        "x_train": x_train,
        "y_train": y_train,
        "x_val": x_val,
        "y_val": y_val,
        "mean": mean,
        "variance": variance,
    }
    info = {
        "source": data,
        "sha256": dataset.sha256,
        "data_fraction": fraction,
        "seed": seed,
        "train_usage": "Training",
        "val_usage": "PublicTest",
        "train_rows": int(len(y_train)),
        "val_rows": int(len(y_val)),
    }
    return arrays, info
