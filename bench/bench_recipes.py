"""Known-good CNN recipes side by side: which one the search should start from.

    python -m bench.bench_recipes --data $FER2013_PATH --epochs 8

Each recipe is `jobs.space.FAST_CNN` with some fields replaced. All of them train at once, one
process and one TensorFlow thread each, on every training row, through the trials' own epoch
loop (`jobs.training.EpochLoop`) on a cosine over `--epochs`, so they share the machine's
speed and load: only their accuracies and images/s in the same run compare. Writes
`bench/results/recipes.json` (per recipe: the epoch history and the best PublicTest accuracy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.space import AUGMENTATIONS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "recipes.json"

# name: fields of FAST_CNN replaced ("fast-cnn" is the known-good point as it is now).
RECIPES: dict[str, dict[str, Any]] = {
    "fast-cnn": {},
    # The known-good point until 2026-12-04 (underfitted in an hour: BENCHMARKS.md).
    "strong-dropout-0.3": {"dropout": 0.3, "augmentation": AUGMENTATIONS["strong"]},
    "shift-dropout-0.2": {"dropout": 0.2, "augmentation": {"flip": True, "shift": 0.1}},
}


def recipe_config(name: str) -> Any:
    """The model config of a recipe (a ValueError names the recipes there are)."""
    from jobs.space import FAST_CNN
    from model.configs import config_from_dict, config_to_dict

    if name not in RECIPES:
        raise ValueError(f"recipe: expected one of {sorted(RECIPES)}, got {name!r}")
    return config_from_dict({**config_to_dict(FAST_CNN), **RECIPES[name]})


def _worker(name: str, data: str, epochs: int, fraction: float, seed: int) -> None:
    """Train one recipe; one JSON line per epoch on stdout."""
    from jobs.trial import configure_tensorflow

    configure_tensorflow(1, 0.0)  # before TensorFlow's first op
    import keras

    from jobs.data import prepare_arrays
    from jobs.training import EpochLoop, TrainData, TrainingConfig
    from model.configs import build_model

    arrays, _ = prepare_arrays(data, fraction, seed)
    keras.utils.set_random_seed(seed)
    model = build_model(recipe_config(name), stats=(arrays["mean"], arrays["variance"]))
    config = TrainingConfig(max_epochs=epochs, lr_schedule="cosine", seed=seed)
    train = TrainData(arrays["x_train"], arrays["y_train"], arrays["x_val"], arrays["y_val"])
    keys = ("epoch", "accuracy", "val_accuracy", "epoch_seconds", "images_per_second")

    def report(metrics: dict[str, Any], _: Path) -> None:
        print(json.dumps({k: float(metrics[k]) for k in keys}), flush=True)

    with tempfile.TemporaryDirectory() as workdir:
        EpochLoop(lambda: model, train, config, Path(workdir)).run(report)


def run(data: str, names: list[str], epochs: int, fraction: float, seed: int) -> dict[str, Any]:
    for name in names:
        recipe_config(name)  # a bad name fails before anything trains
    started = time.time()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as logs:
        # stderr (TensorFlow's logs) to files: a full pipe would stall a worker while the
        # driver waits on another.
        errors = {name: Path(logs) / f"{name}.err" for name in names}
        processes = {}
        for name in names:
            with open(errors[name], "w") as err:  # the child keeps its own descriptor
                processes[name] = subprocess.Popen(
                    [sys.executable, "-m", "bench.bench_recipes", "--worker", name]
                    + ["--data", data, "--epochs", str(epochs), "--fraction", str(fraction)]
                    + ["--seed", str(seed)],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                )
        for name, process in processes.items():
            out, _ = process.communicate()
            if process.returncode != 0:
                tail = "\n".join(errors[name].read_text().strip().splitlines()[-5:])
                raise RuntimeError(f"recipe {name} exited {process.returncode}:\n{tail}")
            history = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            results[name] = {
                "model": RECIPES[name],
                "history": history,
                "best_val_accuracy": max(row["val_accuracy"] for row in history),
                "median_images_per_second": statistics.median(
                    row["images_per_second"] for row in history
                ),
            }
            best = results[name]["best_val_accuracy"]
            print(f"{name}: best val_accuracy {best:.4f}", flush=True)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "epochs": epochs,
        "data_fraction": fraction,
        "seed": seed,
        "wall_seconds": round(time.time() - started, 1),
        "recipes": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the data")
    parser.add_argument("--seed", type=int, default=2017)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma list of names")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.data, args.epochs, args.fraction, args.seed)
        return 0
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    results = run(args.data, names, args.epochs, args.fraction, args.seed)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
