"""The search's command line: `python -m jobs.search --data fer2013.csv.gz --num-samples 4 ...`."""

from __future__ import annotations

import argparse
import json

from jobs.search.driver import run_search
from jobs.settings import SearchSettings, add_arguments, from_namespace

DESCRIPTION = "The Tune driver: propose and place trials, run them, train the best to the end."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    add_arguments(parser, SearchSettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import run_cli

    args = build_parser().parse_args(argv)
    settings = from_namespace(SearchSettings, args)

    def work() -> int:
        result = run_search(settings)
        print(
            json.dumps(
                {
                    "parent_run_id": result.parent_run_id,
                    "best_run_id": result.best_run_id,
                    "best_val_accuracy": result.best_val_accuracy,
                    "refused": result.refused,
                    "tune_path": result.tune_path,
                    "wall_seconds": round(result.wall_seconds, 1),
                },
                indent=2,
            )
        )
        return 0 if result.best_run_id else 1

    return run_cli(work)
