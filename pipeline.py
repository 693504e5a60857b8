"""The main job: a search, then the viz of its best run (MLproject's `main` entry point).

python -m pipeline --data fer2013.csv.gz --num-samples 4 --max-epochs 2 --final-max-epochs 2 \
    --data-fraction 0.03

It chains `jobs/` and `viz/` from above both, so neither imports the other.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from jobs.settings import SearchSettings, add_arguments, from_namespace


def closing_lines(result: Any, registered: bool, viz: dict[str, Any] | None) -> str:
    """What a user reads last: the champion, its accuracy, the report, the UI and serving."""
    minutes = result.wall_seconds / 60
    if not result.best_run_id:
        return f"\nSearch ended after {minutes:.1f} min with no trained model (see the log above)."
    champion = result.champion_run_id or result.best_run_id
    kind = "an ensemble of trials" if champion != result.best_run_id else "the best trial"
    accuracy = f"best trial val_accuracy {result.best_val_accuracy:.3f}"
    if viz and viz.get("accuracy") is not None:
        accuracy = (
            f"{viz['accuracy']:.3f} on {viz.get('split_size')} {viz.get('split')} rows; " + accuracy
        )
    lines = ["", f"Search finished in {minutes:.1f} min."]
    if result.strategy:
        lines.append(f"  Strategy:  {result.strategy}")
    lines.append(f"  Champion:  run {champion}, {kind} ({accuracy})")
    if viz:
        lines.append(
            f"  Report:    report.html and figures/ in run {champion}'s artifacts "
            f"(mlflow artifacts download -r {champion} -a report.html)"
        )
    lines.append("  Browse:    make ui      (MLflow UI on http://127.0.0.1:5000)")
    if registered:
        lines.append("  Serve:     make serve   (the registered @champion over HTTP)")
    return "\n".join(lines)


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
        print(closing_lines(result, settings.register, summary.get("viz")), file=sys.stderr)
        return 0 if result.best_run_id else 1

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
