"""Known-good CNN recipes side by side: which one the search should start from, and which
second model its ensemble gains most from.

    python -m bench.bench_recipes --data $FER2013_PATH --epochs 8
    python -m bench.bench_recipes --data $FER2013_PATH --epochs 8 --pairs \
        --recipes fast-cnn,fast-cnn-seed2,neighbour-crop,neighbour-smooth,neighbour-strong

Each recipe is `jobs.space.FAST_CNN` with some fields replaced (the `neighbour-*` ones are
`jobs.space.NEIGHBOURS` of the known-good point, the search's first proposals). All of them
train at once, one process and one TensorFlow thread each, on every training row, through the
trials' own epoch loop (`jobs.training.EpochLoop`) on a cosine over `--epochs`, so they share
the machine's speed and load: only their accuracies and images/s in the same run compare.
Writes `bench/results/recipes.json` (per recipe: the epoch history and the best PublicTest
accuracy). With `--pairs` (default output `bench/results/recipe_pairs.json`) it also scores
every pair of recipes as a two-member ensemble on the search's `report` half of PublicTest:
the mean of the two best epochs' flip-averaged probabilities against the better member alone,
as the search's `ensemble_gain_points` counts it.

A recipe may train its own number of epochs (`name@epochs`, e.g. `fast-cnn@57`), and
`--groups` scores given groups of them as ensembles, so equal compute spent on fewer, longer
models or more, shorter ones compares in one run:

    python -m bench.bench_recipes --data $FER2013_PATH --fraction 0.1 \
        --recipes fast-cnn@115,fast-cnn-seed2@115,fast-cnn@57,fast-cnn-seed2@57,... \
        --groups "fast-cnn@115+fast-cnn-seed2@115;fast-cnn@57+fast-cnn-seed2@57+..."
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from jobs.space import (
    AUGMENTATIONS,
    FAST_CNN,
    KNOWN_GOOD_CNN,
    model_from_params,
    neighbours,
    training_from_params,
)
from model.configs import config_to_dict

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "recipes.json"
PAIR_RESULTS = ROOT / "bench" / "results" / "recipe_pairs.json"


@dataclass(frozen=True)
class Recipe:
    """FAST_CNN with `model` fields replaced, trained with `training` fields of
    `jobs.training.TrainingConfig` replaced and its seed moved by `seed_offset`."""

    model: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    seed_offset: int = 0


def _neighbour_recipes() -> dict[str, Recipe]:
    """The known-good point's NEIGHBOURS as recipes: their model and training fields."""
    base_model = config_to_dict(FAST_CNN)
    base_training = training_from_params(KNOWN_GOOD_CNN, 1, 0)
    found = {}
    for suffix, point in neighbours(KNOWN_GOOD_CNN):
        model = config_to_dict(model_from_params({**point, "family": "cnn"}))
        training = training_from_params(point, 1, 0)
        found[f"neighbour-{suffix}"] = Recipe(
            {k: v for k, v in model.items() if base_model.get(k) != v},
            {k: v for k, v in training.items() if base_training[k] != v},
        )
    return found


# name: how it differs from FAST_CNN ("fast-cnn" is the known-good point as it is now).
RECIPES: dict[str, Recipe] = {
    "fast-cnn": Recipe(),
    # The same recipe with the next seed: what the search's exploit finals train beside it.
    "fast-cnn-seed2": Recipe(seed_offset=1),
    # The known-good point until 2026-12-04 (underfitted in an hour: BENCHMARKS.md).
    "strong-dropout-0.3": Recipe({"dropout": 0.3, "augmentation": AUGMENTATIONS["strong"]}),
    "shift-dropout-0.2": Recipe({"dropout": 0.2, "augmentation": {"flip": True, "shift": 0.1}}),
    # The crop neighbour's earlier form (dropout 0.3), measured as `neighbour-crop` in
    # BENCHMARKS.md's 80-epoch pairs runs.
    "crop-dropout-0.3": Recipe({"dropout": 0.3, "augmentation": AUGMENTATIONS["crop"]}),
    **_neighbour_recipes(),
}
# The crop neighbour with the next seed: two of it are what a user who knew it was the best
# config would train by hand (against fast-cnn and fast-cnn-seed2, the by-hand baseline).
RECIPES["neighbour-crop-seed2"] = replace(RECIPES["neighbour-crop"], seed_offset=1)
DEFAULT_RECIPES = ("fast-cnn", "strong-dropout-0.3", "shift-dropout-0.2")


def entry(text: str, epochs: int) -> tuple[str, int]:
    """A `--recipes` entry, `name` or `name@epochs`: the recipe's name and its epochs (`epochs`
    where the entry names none)."""
    name, _, count = text.partition("@")
    if not count:
        return name, epochs
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"recipe {text!r}: expected name@epochs with epochs >= 1, got {count!r}")
    return name, int(count)


def recipe(name: str) -> Recipe:
    """A recipe by name or `name@epochs` entry (a ValueError names the recipes there are)."""
    name, _ = entry(name, 1)
    if name not in RECIPES:
        raise ValueError(f"recipe: expected one of {sorted(RECIPES)}, got {name!r}")
    return RECIPES[name]


def recipe_config(name: str) -> Any:
    """The model config of a recipe."""
    from jobs.space import FAST_CNN
    from model.configs import config_from_dict, config_to_dict

    return config_from_dict({**config_to_dict(FAST_CNN), **recipe(name).model})


def pair_table(predictions: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Every pair of recipes as an equal-weight, flip-averaged ensemble, on the `report` half of
    the validation rows the search would use with `seed`: its accuracy, each member's alone
    (plain and flip-averaged), and `gain_points` = (pair - better member plain) x 100, the
    search's `ensemble_gain_points`. Best gain first."""
    from bench.value_baseline import flip_mean, report_accuracy

    names = sorted(predictions)
    if len(names) < 2:
        raise ValueError(f"predictions: expected at least 2 recipes, got {names}")
    labels = predictions[names[0]].labels
    for name in names:
        if not np.array_equal(predictions[name].labels, labels):
            raise ValueError(f"recipe {name}: predicted other validation rows than {names[0]}")

    def on_report(probabilities: np.ndarray) -> float:
        return round(report_accuracy(probabilities, labels, seed), 4)

    alone = {name: on_report(predictions[name].probabilities) for name in names}
    flipped = {name: on_report(flip_mean([predictions[name]])) for name in names}
    rows = []
    for a, b in combinations(names, 2):
        together = on_report(flip_mean([predictions[a], predictions[b]]))
        rows.append(
            {
                "members": [a, b],
                "report_accuracy": together,
                "report_members": [alone[a], alone[b]],
                "report_members_flip": [flipped[a], flipped[b]],
                "gain_points": round(100 * (together - max(alone[a], alone[b])), 2),
            }
        )
    return sorted(rows, key=lambda row: -row["gain_points"])


def parse_groups(text: str, names: list[str]) -> list[list[str]]:
    """`--groups`: `a+b;c+d+e`, each member one of `names` (the `--recipes` entries)."""
    groups = [[m.strip() for m in g.split("+") if m.strip()] for g in text.split(";") if g.strip()]
    for group in groups:
        unknown = [m for m in group if m not in names]
        if unknown or not group:
            raise ValueError(
                f"--groups: expected groups of the --recipes entries {names} joined by '+', "
                f"got {'+'.join(group)!r}"
            )
    return groups


def group_table(
    predictions: dict[str, Any], groups: list[list[str]], epochs: dict[str, int], seed: int
) -> list[dict[str, Any]]:
    """Each group as an equal-weight, flip-averaged ensemble on the `report` half (as
    `pair_table` scores a pair), with the epochs its members trained in all and its accuracy
    against the first group's in points."""
    from bench.value_baseline import flip_mean, report_accuracy

    labels = predictions[groups[0][0]].labels
    rows = []
    for group in groups:
        probabilities = flip_mean([predictions[m] for m in group])
        rows.append(
            {
                "members": group,
                "member_epochs": sum(epochs[m] for m in group),
                "report_accuracy": round(report_accuracy(probabilities, labels, seed), 4),
                "report_members_flip": [
                    round(report_accuracy(flip_mean([predictions[m]]), labels, seed), 4)
                    for m in group
                ],
            }
        )
    for row in rows:
        row["points_on_first"] = round(
            100 * (row["report_accuracy"] - rows[0]["report_accuracy"]), 2
        )
    return rows


def _worker(
    name: str, data: str, epochs: int, fraction: float, seed: int, predictions: str
) -> None:
    """Train one recipe; one JSON line per epoch on stdout; the best epoch's validation
    predictions copied to `predictions` where given."""
    from jobs.trial import configure_tensorflow

    configure_tensorflow(1, 0.0)  # before TensorFlow's first op
    import keras

    from jobs.data import prepare_arrays
    from jobs.training import BEST_PREDICTIONS, EpochLoop, TrainData, TrainingConfig
    from model.configs import build_model

    arrays, _ = prepare_arrays(data, 1.0, seed)
    if fraction < 1.0:
        # A share of the training rows only: every PublicTest row is scored, as in the
        # search-value benchmark's large regime (a share of them would leave a report half of
        # a few hundred rows, where one row is a quarter of a point).
        from model.batches import stratified_indices
        from model.preprocessing import pixel_statistics

        keep = stratified_indices(arrays["y_train"], fraction, seed)
        arrays["x_train"], arrays["y_train"] = arrays["x_train"][keep], arrays["y_train"][keep]
        arrays["mean"], arrays["variance"] = pixel_statistics(arrays["x_train"])
    seed += recipe(name).seed_offset
    keras.utils.set_random_seed(seed)
    model = build_model(recipe_config(name), stats=(arrays["mean"], arrays["variance"]))
    config = TrainingConfig(
        **{**recipe(name).training, "max_epochs": epochs, "lr_schedule": "cosine", "seed": seed}
    )
    train = TrainData(arrays["x_train"], arrays["y_train"], arrays["x_val"], arrays["y_val"])
    keys = ("epoch", "accuracy", "val_accuracy", "epoch_seconds", "images_per_second")

    def report(metrics: dict[str, Any], _: Path) -> None:
        print(json.dumps({k: float(metrics[k]) for k in keys}), flush=True)

    with tempfile.TemporaryDirectory() as workdir:
        EpochLoop(lambda: model, train, config, Path(workdir)).run(report)
        if predictions:
            shutil.copyfile(Path(workdir) / BEST_PREDICTIONS, predictions)


def run(
    data: str,
    names: list[str],
    epochs: int,
    fraction: float,
    seed: int,
    pairs: bool = False,
    groups: list[list[str]] | None = None,
) -> dict[str, Any]:
    # Bad names and epochs fail before anything trains.
    counts = {name: entry(name, epochs)[1] for name in names}
    for name in names:
        recipe_config(name)
    if pairs and len(names) < 2:
        raise ValueError(f"--pairs: expected at least 2 recipes, got {names}")
    keep = pairs or bool(groups)
    started = time.time()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as logs:
        saved = {name: Path(logs) / f"{name}.npz" for name in names}
        # stderr (TensorFlow's logs) to files: a full pipe would stall a worker while the
        # driver waits on another.
        errors = {name: Path(logs) / f"{name}.err" for name in names}
        processes = {}
        for name in names:
            with open(errors[name], "w") as err:  # the child keeps its own descriptor
                processes[name] = subprocess.Popen(
                    [sys.executable, "-m", "bench.bench_recipes", "--worker", name]
                    + ["--data", data, "--epochs", str(counts[name])]
                    + ["--fraction", str(fraction), "--seed", str(seed)]
                    + (["--predictions", str(saved[name])] if keep else []),
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
                "epochs": counts[name],
                "model": recipe(name).model,
                "training": recipe(name).training,
                "seed": seed + recipe(name).seed_offset,
                "history": history,
                "best_val_accuracy": max(row["val_accuracy"] for row in history),
                "median_images_per_second": statistics.median(
                    row["images_per_second"] for row in history
                ),
            }
            best = results[name]["best_val_accuracy"]
            print(f"{name}: best val_accuracy {best:.4f}", flush=True)
        loaded = _loaded(saved) if keep else {}
        table = pair_table(loaded, seed) if pairs else None
        scored = group_table(loaded, groups, counts, seed) if groups else None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "epochs": epochs,
        "data_fraction": fraction,
        "seed": seed,
        "wall_seconds": round(time.time() - started, 1),
        "recipes": results,
        **({"pairs": table} if table is not None else {}),
        **({"groups": scored} if scored is not None else {}),
    }


def _loaded(saved: dict[str, Path]) -> dict[str, Any]:
    from schema.run import Predictions

    return {name: Predictions.from_npz(path, str(path)) for name, path in saved.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--fraction", type=float, default=1.0, help="stratified share of the training rows"
    )
    parser.add_argument("--seed", type=int, default=2017)
    parser.add_argument(
        "--recipes", default=",".join(DEFAULT_RECIPES), help=f"comma list of {sorted(RECIPES)}"
    )
    parser.add_argument(
        "--pairs", action="store_true", help="score every pair as a two-member ensemble"
    )
    parser.add_argument(
        "--groups",
        default="",
        help="score groups of the --recipes entries as ensembles: 'a+b;c+d+e'",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--predictions", default="", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=f"default {RESULTS} ({PAIR_RESULTS} with --pairs)")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.data, args.epochs, args.fraction, args.seed, args.predictions)
        return 0
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    groups = parse_groups(args.groups, names) if args.groups else None
    results = run(args.data, names, args.epochs, args.fraction, args.seed, args.pairs, groups)
    output = args.output or (PAIR_RESULTS if args.pairs or groups else RESULTS)
    Path(output).write_text(json.dumps(results, indent=2) + "\n")
    for row in results.get("pairs", []):
        members = " + ".join(row["members"])
        print(f"{members}: {row['report_accuracy']:.4f} ({row['gain_points']:+.2f} points)")
    for row in results.get("groups", []):
        members = " + ".join(row["members"])
        print(f"{members}: {row['report_accuracy']:.4f} ({row['points_on_first']:+.2f} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
