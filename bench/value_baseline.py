"""The no-search baseline of `bench/bench_search_value.py`: the known-good CNN trained by hand.

What a skilled user does with the search's budget and machine instead of searching: the
known-good CNN (`jobs.space.KNOWN_GOOD_CNN`) through the `train` entry point's function on
every training row, one copy per trial slot the search would use (`jobs.search.context.slots`),
each with its own seed, one process per copy pinned to its cores (`bench/core_rotation.py`),
on a cosine that the epoch loop sizes to end with the budget (as the search's finals do). Each
copy first measures the reference CNN as the search's calibration does (its thread pools set
as a trial's). The baseline's probabilities: the mean of the copies' flip-averaged ones.

    python -m bench.value_baseline --data D --seed S --cores 0 --deadline T   # one copy
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# The epoch loop plans as many epochs as fit in the time budget, at most this many: the
# budget, not a cap, decides.
BASELINE_MAX_EPOCHS = 500
RESULT_PREFIX = "RESULT "


def baseline_settings(data: str, seed: int, time_budget_min: float = 0.0) -> Any:
    """The `train` entry point's settings for the known-good CNN with its own training recipe
    (a cosine in place of its explored constant rate); a ValueError where the recipe needs a
    field the entry point lacks."""
    from jobs.settings import TrainSettings
    from jobs.space import KNOWN_GOOD_CNN

    recipe = {k.split(".", 1)[1]: v for k, v in KNOWN_GOOD_CNN.items() if k.startswith("training.")}
    for field in ("weight_decay", "label_smoothing", "mixup"):
        if recipe.get(field, 0.0):
            raise ValueError(
                f"KNOWN_GOOD_CNN training.{field}: expected 0 (the train entry point has no "
                f"such setting), got {recipe[field]!r}"
            )
    return TrainSettings(
        data=data,
        family="cnn",
        preset="cnn-fast",
        epochs=BASELINE_MAX_EPOCHS,
        batch_size=int(recipe["batch_size"]),
        learning_rate=float(recipe["learning_rate"]),
        optimizer=str(recipe["optimizer"]),
        seed=seed,
        lr_schedule="cosine",
        time_budget_min=time_budget_min,
    )


def flip_mean(copies: list[Any]) -> np.ndarray:
    """The baseline's probabilities: the mean of its copies' flip-averaged probabilities."""
    from model.ensemble import with_flip

    if not copies:
        raise ValueError("copies: expected at least one copy's predictions, got none")
    flipped = [with_flip(c.probabilities, c.probabilities_flipped, True) for c in copies]
    return np.mean(flipped, axis=0)


def report_accuracy(probabilities: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """Accuracy on the `report` half of these validation rows (the search's split)."""
    from model.ensemble import accuracy, split_halves

    rows = split_halves(labels, seed).report
    return accuracy(np.asarray(probabilities)[rows], np.asarray(labels)[rows])


def _worker(args: argparse.Namespace) -> None:
    """One baseline copy: pin to its cores, measure the reference, train to the deadline."""
    from bench.core_rotation import pin

    pin({os.getpid()}, {int(c) for c in args.cores.split(",")})
    from jobs.timing import measure_reference

    reference = measure_reference(args.threads)  # sets the thread pools, as a trial's would
    from jobs.proposals import SETUP_SECONDS
    from jobs.search.final import FINAL_FILL
    from jobs.train import train

    # The budget the search's finals get (what is left, less their margins): the cosine ends
    # with it.
    budget_s = max(1.0, (args.deadline - time.time()) * FINAL_FILL - SETUP_SECONDS)
    result = train(baseline_settings(args.data, args.seed, budget_s / 60))
    record = {
        **result,
        "seed": args.seed,
        "cores": args.cores,
        "time_budget_s": round(budget_s, 1),
        "reference_images_per_second": reference.reference_images_per_second,
    }
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def _slots(cpus_per_trial: float) -> int:
    """The search's slots on this machine (its own function, on a Ray started for it)."""
    import ray

    from jobs.search.context import init_ray, slots

    init_ray()
    try:
        return slots(cpus_per_trial)
    finally:
        ray.shutdown()


def _launch(data: str, seed: int, cores: list[int], deadline: float, folder: Path) -> Any:
    """One copy's process, logging to its own tracking store in `folder` (no two writers on
    one SQLite file); its stderr (TensorFlow's logs) to a file, so a full pipe cannot stall it."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")
    }
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{folder}/mlflow.db", MLFLOW_EXPERIMENT_NAME="baseline"
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, "-m", "bench.value_baseline", "--data", data, "--seed", str(seed)]
    command += ["--threads", str(len(cores)), "--cores", ",".join(map(str, cores))]
    command += ["--deadline", str(deadline)]
    with open(folder / "stderr.log", "w") as err:  # the child keeps its own descriptor
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True
        )


def run_baseline(
    data: str, minutes: float, workdir: Path, cpus_per_trial: float, seed: int
) -> tuple[list[dict[str, Any]], list[Any], float]:
    """Train one copy per slot at once, to the deadline; what each measured, its predictions
    (`schema.run.Predictions`) and the arm's wall seconds."""
    from mlflow.tracking import MlflowClient

    from schema import run as layout

    copies = _slots(cpus_per_trial)
    threads = max(1, int(round(cpus_per_trial)))
    cores = sorted(os.sched_getaffinity(0))
    started = time.time()
    deadline = started + minutes * 60
    folders = [workdir / f"copy-{copy}" for copy in range(copies)]
    processes = []
    try:
        for copy, folder in enumerate(folders):
            own = [cores[(copy * threads + t) % len(cores)] for t in range(threads)]
            processes.append(_launch(data, seed + copy, own, deadline, folder))
        records, predictions = [], []
        for copy, (folder, process) in enumerate(zip(folders, processes, strict=True)):
            out, _ = process.communicate()
            if process.returncode != 0:
                tail = (folder / "stderr.log").read_text().strip().splitlines()[-5:]
                raise RuntimeError(f"baseline copy {copy} exited {process.returncode}: {tail}")
            line = [x for x in out.splitlines() if x.startswith(RESULT_PREFIX)][-1]
            record = json.loads(line.removeprefix(RESULT_PREFIX))
            client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
            found = layout.download_predictions(client, record["run_id"], folder / "predictions")
            records.append(record)
            predictions.append(found)
    finally:
        for process in processes:  # a copy that failed must not leave the others training
            if process.poll() is None:
                process.kill()
                process.wait()
    return records, predictions, time.time() - started


def baseline_record(
    records: list[dict[str, Any]], predictions: list[Any], seconds: float, seed: int
) -> dict[str, Any]:
    """What the baseline arm reached on the report half, and what it cost."""
    labels = predictions[0].labels
    for copy, found in enumerate(predictions):
        if not np.array_equal(found.labels, labels):
            raise ValueError(f"baseline copy {copy}: predicted other validation rows")
    from model.ensemble import split_halves, with_flip

    def on_report(probabilities: np.ndarray) -> float:
        return round(report_accuracy(probabilities, labels, seed), 4)

    return {
        "reference_images_per_second": statistics.median(
            r["reference_images_per_second"] for r in records
        ),
        "trials": len(records),
        "minutes": round(seconds / 60, 2),
        "members": [f"cnn-fast-seed{r['seed']}" for r in records],
        "epochs": [r["epochs"] for r in records],
        "time_budget_s": [r["time_budget_s"] for r in records],
        "best_val_accuracy": [round(r["best_val_accuracy"], 4) for r in records],
        "report_members": [on_report(p.probabilities) for p in predictions],
        "report_members_flip": [
            on_report(with_flip(p.probabilities, p.probabilities_flipped, True))
            for p in predictions
        ],
        "report_accuracy": on_report(flip_mean(predictions)),
        "report_rows": int(len(split_halves(labels, seed).report)),
        "_labels": labels,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cores", default="0", help="comma list of the cores to pin to")
    parser.add_argument("--deadline", type=float, required=True, help="wall time (epoch s)")
    _worker(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
