"""Benchmark FER2013 loading: load_fer2013 cold and warm, against a plain pandas parse.

    python bench/bench_load.py --data ../shared/data/fer2013/fer2013.csv.gz --repeats 5 \
        --json bench-load.json

Cold: each repeat loads into a fresh, empty cache folder (parse + cache write). Warm: the cache
is filled once, then each repeat loads from it (hash the source + read the cached arrays).
Baseline: ``pandas.read_csv`` and a per-row ``str.split`` of the pixel column, the usual way
FER2013 is read (fewer repeats: it is slow).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: make the repository importable
    sys.path.insert(0, str(ROOT))

KEYS = ("load_cold_s", "load_warm_s", "load_pandas_baseline_s")


def _summary(samples: list[tuple[float, float]]) -> dict[str, Any]:
    wall = [w for w, _ in samples]
    return {
        "median": round(statistics.median(wall), 4),
        "min": round(min(wall), 4),
        "max": round(max(wall), 4),
        "repeats": len(wall),
        # CPU seconds of the whole process (all threads): on a busy shared machine wall time
        # swings with the neighbours' load, CPU time much less.
        "cpu_median": round(statistics.median(c for _, c in samples), 4),
    }


def _time(fn: Callable[[], object], repeats: int) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds of each call."""
    samples = []
    for _ in range(repeats):
        cpu, started = time.process_time(), time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started, time.process_time() - cpu))
    return samples


def pandas_baseline(data: str | os.PathLike[str]) -> int:
    """The plain way: pandas reads the CSV, then every row's pixel string is split in Python."""
    import numpy as np
    import pandas as pd

    frame = pd.read_csv(data)
    images = np.array([np.array(p.split(), dtype=np.uint8) for p in frame["pixels"]])
    return int(images.reshape(-1, 48, 48, 1).shape[0])


def run(data: str | os.PathLike[str], repeats: int, baseline_repeats: int | None = None) -> dict:
    """Time the three ways of loading ``data``.

    Returns {key: {median, min, max, repeats, cpu_median}} for each key of KEYS (the baseline
    only when it ran), plus "data" (source, sha256, rows) and "machine"."""
    from model.data import load_fer2013

    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, found {repeats}")
    baseline_repeats = min(repeats, 2) if baseline_repeats is None else baseline_repeats

    def cold() -> None:
        with tempfile.TemporaryDirectory(prefix="fer-bench-cold-") as cache:
            load_fer2013(data, cache_dir=cache)

    results: dict[str, Any] = {"load_cold_s": _summary(_time(cold, repeats))}
    with tempfile.TemporaryDirectory(prefix="fer-bench-warm-") as cache:
        dataset = load_fer2013(data, cache_dir=cache)
        warm = _time(lambda: load_fer2013(data, cache_dir=cache), repeats)
    results["load_warm_s"] = _summary(warm)
    if baseline_repeats > 0:
        rows = []
        samples = _time(lambda: rows.append(pandas_baseline(data)), baseline_repeats)
        if rows[0] != len(dataset):
            raise RuntimeError(f"baseline read {rows[0]} rows, load_fer2013 {len(dataset)}")
        results["load_pandas_baseline_s"] = _summary(samples)
    results["data"] = {"source": dataset.source, "sha256": dataset.sha256, "rows": len(dataset)}
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    return results


def format_table(results: dict) -> str:
    lines = [f"{'measure':<26}{'median s':>10}{'min s':>10}{'max s':>10}{'cpu s':>10}{'n':>4}"]
    for key in KEYS:
        if key in results:
            r = results[key]
            lines.append(
                f"{key:<26}{r['median']:>10.3f}{r['min']:>10.3f}{r['max']:>10.3f}"
                f"{r['cpu_median']:>10.3f}{r['repeats']:>4}"
            )
    lines.append("(wall seconds; cpu: median process CPU seconds, all threads)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default=os.environ.get("FER2013_PATH"),
        help="fer2013.csv(.gz), a folder or s3:// URI (default: $FER2013_PATH)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="cold and warm repeats")
    parser.add_argument(
        "--baseline-repeats",
        type=int,
        default=None,
        help="pandas baseline repeats (default: min(repeats, 2); 0 skips it)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if not args.data:
        parser.error("--data is required when $FER2013_PATH is not set")
    results = run(args.data, args.repeats, args.baseline_repeats)
    print(format_table(results))
    print(f"rows: {results['data']['rows']}, sha256: {results['data']['sha256']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
