"""What the search decides on this machine now, without training: the large regime's sizing
and the default hour's strategy, each from a calibration as the search's own.

    python -m bench.probe_strategy --data $FER2013_PATH
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FER2013_PATH", ""))
    args = parser.parse_args(argv)
    if not args.data:
        parser.error("--data or FER2013_PATH is required")
    import ray

    from bench.bench_search_value import REGIMES, sized_minutes, training_subset
    from jobs.cli import setup_logging
    from jobs.search.driver import strategy_for
    from jobs.settings import SearchSettings
    from schema.cli import import_tensorflow

    setup_logging()  # the strategy's numbers, in words
    import_tensorflow()
    large = REGIMES["large"]
    with tempfile.TemporaryDirectory(prefix="fer-probe-") as tmp:
        data = Path(tmp) / "data.csv"
        subset = training_subset(args.data, large.fraction, SearchSettings.seed, data)
        settings = SearchSettings(data=subset, time_budget_min=large.minutes)
        minutes, sizing = sized_minutes(settings, large)
    print(f"large regime: {minutes:g} min per arm ({sizing})", flush=True)
    hour = REGIMES["hour"]
    try:
        probe = strategy_for(SearchSettings(data=args.data, time_budget_min=hour.minutes))
    finally:
        ray.shutdown()
    print(f"hour regime: {probe.kind}: {probe.reason}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
