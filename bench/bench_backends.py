"""Which Keras backend trains faster on this CPU: TensorFlow and JAX side by side, in one run.

    nice python -m bench.bench_backends [--images 2048 --epochs 3] [--json PATH]

Each (case, backend) runs in a fresh process with the same settings: pinned to one core, one
intra-op thread (`jobs.trial.configure_backend` with a CPU share of one), KERAS_BACKEND set
before Keras is imported. Cases: the reference CNN of the search's calibration
(`jobs.timing.measure_reference`, the machine's speed that other results are compared by), and
cnn-fast and SEED2017 through our epoch loop (`jobs.training.EpochLoop`, batch 64, random
pixels) for a few epochs; the last epoch is the one reported (the first one compiles). The two
backends alternate case by case, so both see the machine in the same state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("tensorflow", "jax")
CASES = ("reference", "cnn-fast", "seed2017")
CASE_TIMEOUT_S = 1800


def worker(case: str, images: int, epochs: int, core: int) -> dict[str, Any]:
    """In a fresh process whose KERAS_BACKEND is set: one case on one core."""
    os.sched_setaffinity(0, {core})
    from jobs.trial import configure_backend

    backend = configure_backend(1, 0.0)
    if case == "reference":
        from jobs.timing import measure_reference

        calibration = measure_reference(1)
        return {"backend": backend, "images_per_second": calibration.reference_images_per_second}
    import numpy as np

    from jobs.space import FAST_CNN
    from jobs.training import EpochLoop, TrainData, TrainingConfig
    from model.cnn import SEED2017
    from model.configs import build_model
    from model.preprocessing import pixel_statistics

    config = {"cnn-fast": FAST_CNN, "seed2017": SEED2017}[case]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, 48, 48, 1), dtype=np.uint8)
    y = rng.integers(0, 7, images)
    data = TrainData(x, y, x[: images // 8], y[: images // 8])
    stats = pixel_statistics(x)
    rates: list[float] = []
    seconds: list[float] = []
    training = TrainingConfig(batch_size=64, micro_batch_size=64, max_epochs=epochs)
    with tempfile.TemporaryDirectory() as tmp:
        loop = EpochLoop(lambda: build_model(config, stats=stats), data, training, Path(tmp))
        loop.run(
            lambda m, _: (rates.append(m["images_per_second"]), seconds.append(m["epoch_seconds"]))
        )
    return {
        "backend": backend,
        "images_per_second": rates[-1],
        "by_epoch": rates,
        "epoch_seconds": seconds,
    }


def _run_case(backend: str, case: str, images: int, epochs: int, core: int) -> dict[str, Any]:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)
    args = json.dumps([case, images, epochs, core])
    code = (
        "import json, sys; from bench.bench_backends import worker; "
        "print('RESULT ' + json.dumps(worker(*json.loads(sys.argv[1]))))"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CASE_TIMEOUT_S,
        env=env,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            found = json.loads(line[len("RESULT ") :])
            return {**found, "process_seconds": time.perf_counter() - started}
    return {"error": f"exit {done.returncode}: {done.stderr[-1500:]}"}


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("keras", "tensorflow", "jax", "jaxlib")}


def table(found: dict[str, Any]) -> str:
    """The side-by-side table of BENCHMARKS.md."""
    lines = [
        "| case | TensorFlow images/s | JAX images/s | JAX ÷ TensorFlow |",
        "|---|---|---|---|",
    ]
    for case in CASES:
        rates = [found["results"][case][b].get("images_per_second") for b in BACKENDS]
        if all(rates):
            lines.append(
                f"| {case} | {rates[0]:.0f} | {rates[1]:.0f} | {rates[1] / rates[0]:.2f} |"
            )
        else:
            lines.append(f"| {case} | failed: see the JSON | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--core", type=int, default=0, help="the core every case is pinned to")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "backends.json")
    args = parser.parse_args(argv)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    found: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "command": "python -m bench.bench_backends " + " ".join(argv or sys.argv[1:]),
        "versions": _versions(),
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "images": args.images,
        "epochs": args.epochs,
        "results": {},
    }
    for case in CASES:
        for backend in BACKENDS:
            row = _run_case(backend, case, args.images, args.epochs, args.core)
            print(f"{case} {backend}: {json.dumps(row)}", flush=True)
            found["results"].setdefault(case, {})[backend] = row
    found["load_average_after"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(found, indent=2))
    print(table(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
