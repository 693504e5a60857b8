"""The Tune search, as phases (docs/ARCHITECTURE.md, "The search"):

    prepare data -> calibrate -> explore -> final -> ensemble -> summary -> register

- `driver`: `run_search`, the orchestration (and the data and parent-run set-up).
- `context`: the frozen `SearchContext` every phase takes; Ray start-up; environment policy.
- `strategy`: explore or exploit, from what one model costs against the budget.
- `calibrate`, `explore`, `final`, `ensemble`, `summary`, `register`: one phase each.
- `tune_phase`: one Tune run (explore and final); `progress`: the console's progress lines.
- `cli`: `python -m jobs.search`.
"""

from jobs.data import prepare_arrays
from jobs.search.cli import build_parser, main
from jobs.search.context import PENDING_TRIALS_ENV, TRIAL_ENV, init_ray
from jobs.search.driver import SearchResult, run_search
from jobs.search.explore import plan_trials
from jobs.search.strategy import Strategy

__all__ = [
    "PENDING_TRIALS_ENV",
    "TRIAL_ENV",
    "SearchResult",
    "Strategy",
    "build_parser",
    "init_ray",
    "main",
    "plan_trials",
    "prepare_arrays",
    "run_search",
]
