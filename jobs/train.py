"""One training run of one config, tracked as one MLflow run (no Ray).

python -m jobs.train --family cnn --preset seed2017 --epochs 10 --data fer2013.csv.gz
python -m jobs.train --family dnn --preset "" --config '{"hidden_units": [512, 256]}'
python -m jobs.train --preset cnn-fast --epochs 100 --time-budget-min 50 --lr-schedule cosine
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from jobs.settings import TrainSettings, add_arguments, from_namespace


def preset_configs() -> dict[str, Any]:
    """Named starting points for `--preset` (model configs)."""
    from jobs.space import FAST_CNN, matched_dnn
    from model.cnn import SEED2017, CNNConfig
    from model.dnn import DNNConfig

    return {
        "seed2017": SEED2017,
        "cnn-fast": FAST_CNN,  # the known-good CNN the search starts from
        "dnn-matched": matched_dnn(),
        "cnn-default": CNNConfig(),
        "dnn-default": DNNConfig(),
    }


def resolve_model_config(family: str, preset: str, overrides: str) -> Any:
    from model.configs import config_from_dict, config_to_dict

    presets = preset_configs()
    name = preset or f"{family}-default"
    if name not in presets:
        raise ValueError(f"preset: expected one of {sorted(presets)} or '', got {preset!r}")
    base = config_to_dict(presets[name])
    if base["family"] != family:
        raise ValueError(f"preset {name!r} is a {base['family']} config, but family={family!r}")
    if overrides:
        try:
            extra = json.loads(overrides)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"config: expected a JSON object, got {overrides!r} ({error})"
            ) from error
        if not isinstance(extra, dict):
            raise ValueError(f"config: expected a JSON object, got {type(extra).__name__}")
        base.update(extra)
    return config_from_dict(base)


def training_config(settings: TrainSettings) -> Any:
    """The epoch loop's `jobs.training.TrainingConfig` for these settings (one micro-batch per
    batch: a single run has the whole worker)."""
    from jobs.training import TrainingConfig

    return TrainingConfig(
        batch_size=settings.batch_size,
        micro_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        optimizer=settings.optimizer,
        max_epochs=settings.epochs,
        seed=settings.seed,
        lr_schedule=settings.lr_schedule,
        precision=settings.precision,
        time_budget_s=settings.time_budget_min * 60,
    )


def train(settings: TrainSettings) -> dict[str, Any]:
    """Train, log to MLflow (the run `mlflow run` opened, or a new one); return final metrics."""
    from model.backend import require_backend

    backend = require_backend(settings.backend)  # before anything imports Keras
    import keras
    import mlflow
    from mlflow.tracking import MlflowClient

    from jobs.data import prepare_arrays, resolve_data
    from jobs.resources import MIB
    from jobs.tracking.models import dataset_inputs, log_keras_model
    from jobs.training import BEST_MODEL, BEST_PREDICTIONS, EpochLoop, TrainData
    from model.configs import build_model, config_to_dict
    from model.memory import estimate_training_memory
    from model.precision import apply_precision, resolve_precision
    from schema import run as layout

    data = resolve_data(settings.data)
    model_config = resolve_model_config(settings.family, settings.preset, settings.config)
    training = training_config(settings)
    arrays, data_info = prepare_arrays(data, settings.data_fraction, settings.seed)
    keras.utils.set_random_seed(settings.seed)
    stats = (arrays["mean"], arrays["variance"])
    policy = resolve_precision(settings.precision)
    apply_precision(policy)  # before the model: its layers take the policy they are built under
    model = build_model(model_config, stats=stats)
    estimate = estimate_training_memory(model, settings.batch_size, optimizer=settings.optimizer)
    # Pixels stay uint8: the model casts on entry.
    train_data = TrainData(arrays["x_train"], arrays["y_train"], arrays["x_val"], arrays["y_val"])

    client = MlflowClient()
    # Inside `mlflow run` this resumes the run it opened (MLFLOW_RUN_ID); else starts one.
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        mlflow.set_tags(
            {
                layout.TAG_PRECISION: policy,
                layout.TAG_BACKEND: backend,
                layout.TAG_ROLE: layout.ROLE_TRAIN,
                layout.TAG_FAMILY: settings.family,
                layout.TAG_DATA_SHA: data_info["sha256"],
            }
        )
        params = _run_params(settings, model, estimate / MIB, training, model_config)
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        client.log_inputs(run_id, dataset_inputs(data_info))

        with tempfile.TemporaryDirectory() as workdir:
            loop = EpochLoop(lambda: model, train_data, training, Path(workdir))
            state = loop.run(lambda metrics, _: _log_epoch(metrics, training.max_epochs))
            run_config = layout.run_config(
                settings.preset or settings.family,
                config_to_dict(model_config),
                {
                    **vars(training),
                    "micro_batch_size": state.micro_batch_size,
                    "backend": backend,
                },
                data_info,
                model.count_params(),
            )
            best = Path(workdir) / BEST_MODEL
            digest = layout.log_model_files(client, run_id, best, run_config)
            model_uri = log_keras_model(run_id, best)
            layout.log_predictions(client, run_id, Path(workdir) / BEST_PREDICTIONS)
        mlflow.set_tags(
            {layout.TAG_STATUS: layout.STATUS_FINISHED, layout.TAG_MODEL_URI: model_uri}
        )
        mlflow.log_metric("best_val_accuracy", state.best_val_accuracy)
    return {
        "run_id": run_id,
        "best_val_accuracy": state.best_val_accuracy,
        "best_epoch": state.best_epoch,
        "model_sha256": digest,
        "epochs": state.epoch,
    }


def _run_params(
    settings: TrainSettings, model: Any, estimated_mb: float, training: Any, model_config: Any
) -> dict[str, Any]:
    """The run's MLflow params: the settings, the model's size and estimate, its config."""
    from model.configs import config_to_dict

    params = {
        "family": settings.family,
        "preset": settings.preset,
        "param_count": model.count_params(),
        "estimated_memory_mb": round(estimated_mb, 1),
        "data_fraction": settings.data_fraction,
        "backend": settings.backend,
        **{k: v for k, v in vars(training).items()},
    }
    for key, value in config_to_dict(model_config).items():
        if key != "family":
            params[f"model.{key}"] = json.dumps(value) if isinstance(value, dict | list) else value
    return params


def _log_epoch(metrics: dict[str, Any], max_epochs: int) -> None:
    """One epoch's metrics to the active run, and a progress line."""
    import mlflow

    epoch = int(metrics["epoch"])
    mlflow.log_metrics(
        {
            k: float(v)
            for k, v in metrics.items()
            if k not in {"epoch", "micro_batch_size", "oom_retries", "planned_epochs"}
        },
        step=epoch,
    )
    print(
        f"epoch {epoch}/{max_epochs}: "
        f"val_accuracy {metrics['val_accuracy']:.4f} "
        f"({metrics['epoch_seconds']:.1f} s)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import run_cli

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, TrainSettings)
    settings = from_namespace(TrainSettings, parser.parse_args(argv))

    def work() -> int:
        print(json.dumps(train(settings), indent=2))
        return 0

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
