"""Benchmark: wall time of a full `run_viz` on a small real CNN.

Setup (not timed): train a CNN under 1M parameters for a few epochs on a stratified subset of
FER2013 ($FER2013_PATH) and log it as a search trial into a throw-away sqlite MLflow store,
exactly in the layout jobs/ writes (docs/ARCHITECTURE.md). Timed: `run_viz` on that run with
the default VizSettings, `repeats` times.

    python -m bench.bench_viz [--data PATH] [--repeats 1] [--fraction 0.15] [--epochs 3]
                              [--output bench/results/viz.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Runnable as `python bench/bench_viz.py` too: the project root must be importable.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SEED = 2017


def _train_and_log(
    client: Any, data: str, fraction: float, epochs: int, workdir: Path
) -> dict[str, Any]:
    """Train a small CNN and log it as the best trial of a search; returns run facts."""
    import keras
    import numpy as np

    from model.cnn import CNNConfig, build_cnn
    from model.configs import config_to_dict
    from model.data import load_fer2013
    from schema.run import TAG_BEST_RUN, TAG_FAMILY, TAG_ROLE, log_model_files

    dataset = load_fer2013(data)
    subset = dataset.subset(fraction, SEED)
    train_x, train_y = subset.split("Training")
    val_x, val_y = subset.split("PublicTest")

    keras.utils.set_random_seed(SEED)
    config = CNNConfig(filters=(16, 32, 64), convs_per_block=2, batch_norm=True, dense_units=(128,))
    model = build_cnn(config)
    params = int(model.count_params())
    if params >= 1_000_000:
        raise ValueError(f"benchmark model: expected < 1M parameters, found {params:,}")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    best_file = workdir / "best.keras"
    checkpoint = keras.callbacks.ModelCheckpoint(
        best_file, monitor="val_accuracy", mode="max", save_best_only=True
    )
    start = time.perf_counter()
    history = model.fit(
        train_x.astype("float32"),
        train_y,
        validation_data=(val_x.astype("float32"), val_y),
        epochs=epochs,
        batch_size=64,
        verbose=0,
        callbacks=[checkpoint],
    )
    train_seconds = time.perf_counter() - start

    experiment = client.create_experiment(
        "bench-viz", artifact_location=(workdir / "artifacts").as_uri()
    )
    parent = client.create_run(experiment, tags={TAG_ROLE: "search"}).info.run_id
    run = client.create_run(
        experiment,
        tags={"mlflow.parentRunId": parent, TAG_ROLE: "trial", TAG_FAMILY: "cnn"},
    ).info.run_id
    client.log_param(run, "family", "cnn")
    client.log_param(run, "param_count", params)
    for epoch, (acc, val) in enumerate(
        zip(history.history["accuracy"], history.history["val_accuracy"], strict=True), start=1
    ):
        client.log_metric(run, "accuracy", float(acc), step=epoch)
        client.log_metric(run, "val_accuracy", float(val), step=epoch)
    best = float(np.max(history.history["val_accuracy"]))
    client.log_metric(run, "best_val_accuracy", best)
    run_config = {
        "family": "cnn",
        "model": config_to_dict(config),
        "training": {
            "batch_size": 64,
            "micro_batch_size": 64,
            "learning_rate": 1e-3,
            "optimizer": "adam",
            "max_epochs": epochs,
            "seed": SEED,
        },
        "data": {
            "source": str(Path(data).resolve()) if "://" not in data else data,
            "sha256": dataset.sha256,
            "data_fraction": fraction,
            "seed": SEED,
            "train_usage": "Training",
            "val_usage": "PublicTest",
        },
        "param_count": params,
    }
    log_model_files(client, run, best_file, run_config)
    client.set_tag(parent, TAG_BEST_RUN, run)
    return {
        "run_id": run,
        "params": params,
        "train_images": int(len(train_y)),
        "val_images": int(len(val_y)),
        "train_seconds": train_seconds,
        "best_val_accuracy": best,
    }


def reference_images_per_second() -> float:
    """The machine's speed, as the search's calibration measures it (the reference CNN on all
    cores), in a fresh process: it sets TensorFlow's thread pools before anything else."""
    import subprocess

    code = (
        "import os; from jobs.timing import measure_reference; "
        "print(measure_reference(os.cpu_count() or 1).reference_images_per_second)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip().splitlines()[-1])


def run(
    data: str | None = None,
    repeats: int = 1,
    fraction: float = 0.15,
    epochs: int = 3,
    filters_per_layer: int | None = None,
    ascent_steps: int | None = None,
    out: str = "",
) -> dict[str, Any]:
    """Train (untimed), then time `repeats` full run_viz calls; returns the measurements.

    filters_per_layer / ascent_steps: None keeps the VizSettings defaults; out: keep the
    figures and reports there (written by run_viz, so inside the timing).
    """
    from mlflow.tracking import MlflowClient

    from viz.main import run_viz
    from viz.settings import VizSettings

    data = data or os.environ.get("FER2013_PATH", "")
    if not data:
        raise ValueError("data: expected a FER2013 path (or $FER2013_PATH), found none")
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, found {repeats}")
    overrides: dict[str, Any] = {}
    if filters_per_layer is not None:
        overrides["filters_per_layer"] = filters_per_layer
    if ascent_steps is not None:
        overrides["ascent_steps"] = ascent_steps

    reference = reference_images_per_second()
    with tempfile.TemporaryDirectory(prefix="bench-viz-") as tmp:
        workdir = Path(tmp)
        client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
        trained = _train_and_log(client, data, fraction, epochs, workdir)
        settings = VizSettings(run_id=trained["run_id"], data=data, out=out, **overrides)
        seconds, cpu_seconds, summary = [], [], {}
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            summary = run_viz(settings, client)
            seconds.append(time.perf_counter() - start)
            # CPU time of this process (all threads): comparable across a loaded shared box,
            # where wall time mostly measures the neighbours.
            cpu_seconds.append(time.process_time() - cpu_start)

    return {
        "viz_seconds": {
            "median": statistics.median(seconds),
            "min": min(seconds),
            "max": max(seconds),
            "repeats": repeats,
        },
        "viz_cpu_seconds": {
            "median": statistics.median(cpu_seconds),
            "min": min(cpu_seconds),
            "max": max(cpu_seconds),
        },
        "load_average_1min": os.getloadavg()[0],
        "viz_reference_images_per_second": reference,
        "stage_seconds": summary["timings"],
        "model_params": trained["params"],
        "conv_layers": summary["filter_layers"],
        "filters_per_layer": settings.filters_per_layer,
        "ascent_steps": settings.ascent_steps,
        "smooth_samples": settings.smooth_samples,
        "split": summary["split"],
        "split_size": summary["split_size"],
        "accuracy": summary["accuracy"],
        "sanity_spearman": summary["sanity_spearman"],
        "setup": {k: v for k, v in trained.items() if k != "run_id"},
        "data": data,
        "fraction": fraction,
        "epochs": epochs,
        "cpu_count": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="FER2013 file (default $FER2013_PATH)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=0.15, help="data subset to train on")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--filters-per-layer", type=int, default=None)
    parser.add_argument("--ascent-steps", type=int, default=None)
    parser.add_argument("--out", default="", help="keep figures/ and reports in this folder")
    parser.add_argument("--output", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    # viz's per-stage progress lines on stderr; everything else stays at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("viz").setLevel(logging.INFO)
    result = run(
        data=args.data,
        repeats=args.repeats,
        fraction=args.fraction,
        epochs=args.epochs,
        filters_per_layer=args.filters_per_layer,
        ascent_steps=args.ascent_steps,
        out=args.out,
    )
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
