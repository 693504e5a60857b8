"""The main job: a search, then the viz of its best run (MLproject's `main` entry point).

python -m pipeline --data fer2013.csv.gz --num-samples 4 --max-epochs 2 --data-fraction 0.03

It chains `jobs/` and `viz/` from above both, so neither imports the other.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.settings import SearchSettings, add_arguments, from_namespace


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import run_cli

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, SearchSettings)
    parser.add_argument("--skip-viz", action="store_true", help="run the search only")
    args = parser.parse_args(argv)
    settings = from_namespace(SearchSettings, args)

    def work() -> int:
        from jobs.search import run_search

        result = run_search(settings)
        summary = {
            "parent_run_id": result.parent_run_id,
            "best_run_id": result.best_run_id,
            "best_val_accuracy": result.best_val_accuracy,
            "champion_run_id": result.champion_run_id,
            "wall_seconds": round(result.wall_seconds, 1),
        }
        champion = result.champion_run_id or result.best_run_id
        if champion and not args.skip_viz:
            from viz.main import run_viz
            from viz.settings import VizSettings

            summary["viz"] = run_viz(VizSettings(run_id=champion, data=settings.data))
        print(json.dumps(summary, indent=2, default=str))
        return 0 if result.best_run_id else 1

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
