"""Settings of every job: the one source of truth for defaults.

`MLproject` parameters and the argparse CLIs both take their defaults from these dataclasses;
`tests/test_settings.py` proves they agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The generic dataclass <-> argparse helpers live below jobs/ and viz/ (schema/cli.py); they
# are re-exported here under the names the entry points and tests import.
from schema import run as layout
from schema.cli import add_arguments, from_namespace

__all__ = [
    "DATA_HELP",
    "PrepareSettings",
    "SearchSettings",
    "TrainSettings",
    "add_arguments",
    "as_dict",
    "from_namespace",
]

DATA_HELP = (
    "FER2013 as a path or s3:// URI: the challenge CSV fer2013.csv(.gz), icml_face_data.csv, "
    "the course train.csv/test.csv, or an image-folder tree. Get it from the Kaggle "
    "'Challenges in Representation Learning: Facial Expression Recognition' competition."
)


STRATEGIES = ("auto", layout.STRATEGY_EXPLORE, layout.STRATEGY_EXPLOIT)


@dataclass
class SearchSettings:
    """A Ray Tune search over CNN and DNN variants (the `search` and `main` entry points)."""

    data: str = "data/fer2013.csv"
    families: str = "cnn,dnn"
    num_samples: int = 100  # the most trials explored; the time budget usually binds first
    max_epochs: int = 30  # the most epochs an explored trial trains
    # The most epochs a final trial trains. A final plans its epochs on its clock so that its
    # cosine ends with the budget; as for a user training by hand (bench/value_baseline.py),
    # the budget decides, not this cap. On few rows or a fast worker `max_epochs` would stop
    # it with most of its time unused.
    final_max_epochs: int = 300
    time_budget_min: float = 60.0
    data_fraction: float = 1.0
    seed: int = 2017
    storage: str = "tune_results"
    resume: bool = False
    name: str = "fer2013-search"
    worker_memory_gb: float = 0.0  # 0: detect from the Ray cluster
    cpus_per_trial: float = 1.0
    # Share of the training rows each explored trial sees (lower fidelity, more proposals).
    explore_fraction: float = 0.25
    # Share of the time budget kept to train the best configs on every row, on a schedule
    # that ends with the budget; 0: no final training.
    final_budget_share: float = 0.5
    final_trials: int = 2  # best configs trained in the final share (at most one per slot)
    # auto: explore only where the budget holds enough finished models of the best known
    # config per slot, else train copies of it (jobs/search/strategy.py); explore / exploit
    # force one.
    strategy: str = "auto"
    # auto: mixed_bfloat16 / mixed_float16 on GPUs, float32 on CPUs (model/precision.py)
    precision: str = "auto"
    # The Keras backend trials train on: tensorflow or jax (model/backend.py). The driver, the
    # ensemble and viz stay on TensorFlow: a .keras file from either loads there.
    backend: str = "tensorflow"
    # Start from the explored trials of earlier searches of the same data and space in the
    # tracking store (jobs/tracking/history.py); false: every search starts afresh.
    remember: bool = True
    grace_epochs: int = 2
    # ASHA's first rung holds at least this many training images, however few the rows: before
    # it every model is near chance and a rung ranks noise. On 10 % of FER2013's rows the
    # known-good CNN was at 0.26 after 2 epochs (5,700 images; the majority class is 0.25),
    # 0.37 after 17,000 and 0.40 after 23,000 (BENCHMARKS.md, search value of 2026-12-05);
    # 2 epochs of every row are 57,000. 0: the rung is `grace_epochs` alone.
    min_rung_images: int = 20_000
    max_failures: int = 2
    register: bool = True

    def __post_init__(self) -> None:
        for name in ("max_epochs", "final_max_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.min_rung_images < 0:
            raise ValueError(f"min_rung_images: expected >= 0, got {self.min_rung_images}")
        if not 0 < self.explore_fraction <= 1:
            raise ValueError(
                f"explore_fraction: expected a number in (0, 1], got {self.explore_fraction}"
            )
        if not 0 <= self.final_budget_share < 1:
            raise ValueError(
                f"final_budget_share: expected a number in [0, 1), got {self.final_budget_share}"
            )
        if self.num_samples < 1:
            raise ValueError(f"num_samples: expected >= 1, got {self.num_samples}")
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"strategy: expected one of {', '.join(STRATEGIES)}, got {self.strategy!r}"
            )
        from model.backend import check_backend
        from model.precision import check_precision

        check_precision(self.precision)
        check_backend(self.backend)


@dataclass
class TrainSettings:
    """One training run of one config (the `train` entry point), tracked as one MLflow run."""

    data: str = "data/fer2013.csv"
    family: str = "cnn"
    preset: str = "seed2017"
    config: str = ""  # JSON object of model config fields overriding the preset
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 0.001
    optimizer: str = "adam"
    data_fraction: float = 1.0
    seed: int = 2017
    lr_schedule: str = "constant"  # or "cosine" (a half cosine over the epochs)
    # Minutes of training (0: no limit): the run plans its epochs on its measured epoch time,
    # at most `epochs`, so a cosine ends with the budget.
    time_budget_min: float = 0.0
    precision: str = "auto"  # mixed on a GPU, float32 on a CPU (model/precision.py)
    backend: str = "tensorflow"  # the Keras backend this run trains on: tensorflow or jax

    def __post_init__(self) -> None:
        from model.backend import check_backend

        check_backend(self.backend)
        if self.time_budget_min < 0:
            raise ValueError(f"time_budget_min: expected >= 0, got {self.time_budget_min}")


@dataclass
class PrepareSettings:
    """Parse and cache the data; optionally upload the source to S3 (the `prepare` entry point)."""

    data: str = "data/fer2013.csv"
    upload: str = ""  # s3://bucket/key to copy the source to


def as_dict(settings: Any) -> dict[str, Any]:
    return dataclasses.asdict(settings)
