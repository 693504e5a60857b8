"""Every benchmark side by side in one run: `make bench` (see BENCHMARKS.md).

Writes `bench/results/latest.json` and the table in `BENCHMARKS.md`. The hour-long budget
search is not re-run unless `--with-budget` is given; its last stored result
(`bench/results/budget_search.json`, with date and commit) is merged in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

GOALS: dict[str, tuple[str, float, str]] = {
    # key: (comparison, goal, what)
    "trial_overhead_ratio": ("<=", 1.03, "Tune trial + MLflow ÷ plain model.fit, same epochs"),
    "same_pipeline_trial_overhead_ratio": (
        "<=",
        1.03,
        "control, not an issue key: the plain script fed by our input pipeline",
    ),
    "concurrency_speedup": (">=", 1.0, "trials/hour, cores shared ÷ one trial at a time"),
    "kerastuner_time_to_target_ratio": ("<=", 0.5, "time to target: ours ÷ KerasTuner"),
    "load_cold_s": ("<=", 3.0, "load_fer2013, full file, cold"),
    "load_warm_s": ("<=", 0.3, "load_fer2013, full file, cached"),
    "memory_estimate_median_abs_err": (
        "<=",
        0.15,
        "trial memory estimate vs real trials' measured peak",
    ),
    "budget_memory_estimate_median_abs_err": (
        "<=",
        0.15,
        "the same, over the trials of the 60-min search (its parent run)",
    ),
    "budget_trials_over_reservation": (
        "<=",
        0,
        "trials of that search tagged fer.memory_over_reservation (peak > 1.2x placed)",
    ),
    "viz_seconds": ("<=", 60.0, "full viz of a best run (< 1 M params)"),
    "budget_search_best_val_accuracy": (">=", 0.66, "60-min search, full data, 2 cores"),
    "dnn_best_val_accuracy": (">=", 0.47, "best param-matched DNN of that search"),
    "budget_trials_started": (">=", 6, "trials started in that search"),
    "epoch_time_estimate_median_abs_err": (
        "<=",
        0.25,
        "epoch time estimated before launch vs measured, that search",
    ),
    "ensemble_gain_points": (
        ">=",
        1.5,
        "that search's ensemble + flip minus its best single model, report half, points",
    ),
    "search_gain_points_large": (
        ">=",
        2.0,
        "search champion minus the known-good CNN by hand, 10 % of rows, 20 min, points",
    ),
    "search_gain_points_hour": (
        ">=",
        0.0,
        "search champion minus the known-good CNN by hand, every row, 60 min, points",
    ),
    # A dotted key reads a figure inside a stored result (`_lookup`).
    "search_value_hour.search.ensemble_gain_points": (
        ">=",
        1.5,
        "that hour search's ensemble + flip minus its best single model, report half, points",
    ),
    "warm_start_gain_points": (
        ">=",
        0.0,
        "second search in the same store minus the first, 10 % of rows, 20 min, points",
    ),
}
# The budget search's keys, stored apart (budget_search.json) with its date and commit.
BUDGET_KEYS = (
    "budget",
    "dnn_",
    "epoch_time_estimate",
    "reference_images_per_second",
    "ensemble",
)
# The search-value benchmark's keys (bench/bench_search_value.py), stored apart the same way.
SEARCH_VALUE_KEYS = ("search_gain_points", "search_value", "warm_start")
STORED_FILES = {"budget": "budget_search.json", "search-value": "search_value.json"}
# Run only with --with-budget: hours each.
WITH_BUDGET = ("budget", "search-value")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory_gb:.0f} GiB RAM, no GPU, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def _headline(value: Any) -> float | None:
    if isinstance(value, dict):
        return value.get("median")
    return value


def _step(name: str, results: dict[str, Any], errors: dict[str, str], work: Any) -> None:
    print(f"== {name}", flush=True)
    started = time.perf_counter()
    try:
        results.update(work())
    except Exception as error:  # one benchmark failing must not hide the others
        errors[name] = f"{type(error).__name__}: {error}"
        print(f"   failed: {errors[name]}", flush=True)
    print(f"   {time.perf_counter() - started:.0f} s", flush=True)


def run_all(
    data: str,
    with_budget: bool,
    only: list[str] | None,
    regimes: tuple[str, ...] = (),
    second_search: bool = True,
) -> dict[str, Any]:
    """Every benchmark asked for; `regimes`: the search-value regimes (all where empty);
    `second_search`: the large regime's second search (bench/bench_search_value.py)."""
    from bench import (
        bench_budget,
        bench_kerastuner,
        bench_load,
        bench_memory,
        bench_search,
        bench_search_value,
    )

    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    # Wall times mean little on a shared machine: record how busy it was when the run began.
    load_before = round(os.getloadavg()[0], 2)
    steps = {
        "load": lambda: bench_load.run(data, repeats=5),
        "memory": lambda: bench_memory.run(data=data),
        "search": lambda: bench_search.run(data, repeats=7, same_pipeline_repeats=4),
        "viz": lambda: __import__("bench.bench_viz", fromlist=["run"]).run(data=data, repeats=3),
        "kerastuner": lambda: bench_kerastuner.run(data),
    }
    ran = []
    for name, work in steps.items():
        if only and name not in only:
            continue
        _step(name, results, errors, work)
        ran.append(name)
    if with_budget and (not only or "budget" in only):
        _step("budget", results, errors, lambda: bench_budget.run(data))
        ran.append("budget")
    if with_budget and (not only or "search-value" in only):
        chosen = regimes or tuple(bench_search_value.REGIMES)
        _step(
            "search-value",
            results,
            errors,
            lambda: bench_search_value.run(data, chosen, second_search=second_search),
        )
        ran.append("search-value")
    _keep_stored(results, errors, "budget", "budget_search_best_val_accuracy", BUDGET_KEYS)
    _keep_stored(results, errors, "search-value", "search_value_run_date", SEARCH_VALUE_KEYS)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    results["_meta"] = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "command": "make bench",
        "load_average_before": load_before,
        "errors": errors,
        "ran": [name for name in ran if name not in errors],
    }
    return results


def _keep_stored(
    results: dict[str, Any], errors: dict[str, str], name: str, marker: str, keys: tuple[str, ...]
) -> None:
    """A benchmark stored apart (`bench/results/<name>.json`, with its date and commit): save
    this run's figures over the stored ones (a run of some search-value regimes keeps the
    others'), or, where it was not re-run or failed, merge in the last good ones."""
    stored = RESULTS / STORED_FILES[name]
    if name not in errors and marker in results:
        RESULTS.mkdir(parents=True, exist_ok=True)
        before = json.loads(stored.read_text()) if stored.exists() else {}
        figures = {k: v for k, v in results.items() if k.startswith(keys)}
        stored.write_text(json.dumps({**before, **figures}, indent=2))
        results.update({k: v for k, v in before.items() if k not in results})
    elif stored.exists():
        results.update(json.loads(stored.read_text()))


def record_sources(meta: dict[str, Any], previous: dict[str, Any] | None = None) -> None:
    """`meta["sources"]`: for each benchmark, the run its figures come from (date, commit,
    command), so a partial run (`--only`) keeps the provenance of what it did not re-run."""
    sources = dict((previous or {}).get("sources", {}))
    for name in meta.get("ran", []):
        sources[name] = {key: meta.get(key) for key in ("date", "commit", "command")}
    meta["sources"] = sources


def merge_previous(results: dict[str, Any]) -> dict[str, Any]:
    """With `--only`, keep the other benchmarks' last figures (their dates stay visible)."""
    latest = RESULTS / "latest.json"
    if not latest.exists():
        return results
    previous = json.loads(latest.read_text())
    merged = {**previous, **{k: v for k, v in results.items() if k != "_meta"}}
    merged["_meta"] = results["_meta"]
    earlier = previous.get("_meta", {})
    record_sources(merged["_meta"], earlier)
    return merged


def _lookup(results: dict[str, Any], key: str) -> Any:
    """`results[key]`, or for a dotted key the figure at that path (None where it is not)."""
    if key in results:
        return results[key]
    value: Any = results
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def table(results: dict[str, Any]) -> str:
    rows = ["| key | what | median | min | max | goal | met |", "|---|---|---|---|---|---|---|"]
    for key, (op, goal, what) in GOALS.items():
        value = _lookup(results, key)
        headline = _headline(value)
        low = value.get("min") if isinstance(value, dict) else headline
        high = value.get("max") if isinstance(value, dict) else headline
        if headline is None:
            rows.append(f"| `{key}` | {what} | not measured | | | {op} {goal} | — |")
            continue
        met = headline <= goal if op == "<=" else headline >= goal
        rows.append(
            f"| `{key}` | {what} | {headline:.3f} | {low:.3f} | {high:.3f} | "
            f"{op} {goal} | {'yes' if met else '**no**'} |"
        )
    return "\n".join(rows)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, dict):
        value = value.get("median")
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def details(results: dict[str, Any]) -> str:
    """What stands behind each headline figure: baselines, both sides of each ratio, rows."""
    from bench import bench_search_value

    lines: list[str] = []
    if "load_pandas_baseline_s" in results:
        lines.append(
            f"- load: plain pandas + per-row split baseline "
            f"{_fmt(results['load_pandas_baseline_s'])} s in the same run "
            f"(cold load CPU {_fmt(results['load_cold_s'].get('cpu_median'))} s)."
        )
    if "trial_seconds" in results:
        lines.append(
            f"- trial overhead: {results.get('epochs')} epochs of the same CNN on "
            f"{results.get('data_fraction')} of the data, paired (both sides at once, one thread "
            f"and one core each, cores swapped every second; the driver and Ray's processes on "
            f"our side's core): our trial {_fmt(results['trial_seconds'])} s (child run start "
            f"to end: Ray actor, object-store data, checkpoint per epoch, MLflow metrics and "
            f"model) vs plain `model.fit(x, y)` script {_fmt(results['plain_fit_seconds'])} s "
            f"(n = {results['trial_overhead_ratio'].get('n')}; per repeat: "
            f"{', '.join(f'{r:.3f}' for r in results.get('trial_overhead_ratios', []))})."
        )
        if "same_pipeline_trial_seconds" in results:
            lines.append(
                f"  Control, the plain script fed by our input pipeline (`model/batches.py`): "
                f"our trial {_fmt(results['same_pipeline_trial_seconds'])} s vs "
                f"{_fmt(results['same_pipeline_plain_fit_seconds'])} s (n = "
                f"{results['same_pipeline_trial_overhead_ratio'].get('n')}; per repeat: "
                + ", ".join(
                    f"{r:.3f}" for r in results.get("same_pipeline_trial_overhead_ratios", [])
                )
                + ")."
            )
        if "trial_span_seconds" in results:
            spans = ", ".join(f"{k} {v:.1f} s" for k, v in results["trial_span_seconds"].items())
            lines.append(f"  Where our trial's time went (medians): {spans}.")
    if "trials_per_hour_shared" in results:
        lines.append(
            f"- concurrency: {results.get('concurrency_trials')} identical trials on "
            f"{results.get('concurrency_cores')} cores: "
            f"{_fmt(results['trials_per_hour_shared'])} trials/h with one CPU per concurrent "
            f"trial vs {_fmt(results['trials_per_hour_serial'])} trials/h one at a time with "
            f"all cores."
        )
    if "kerastuner" in results:
        ours, kt = results.get("ours", {}), results["kerastuner"]
        lines.append(
            f"- vs KerasTuner Hyperband: target val accuracy "
            f"{_fmt(results.get('kerastuner_target_val_accuracy'))} (KerasTuner's best in its "
            f"budget) on {results.get('kerastuner_data_fraction')} of the data, "
            f"{results.get('kerastuner_budget_min')} min each, reference CNN "
            f"{_fmt(results.get('kerastuner_reference_images_per_second'))} images/s: ours "
            f"reached it after "
            f"{_fmt(ours.get('seconds_to_target'))} s (best {_fmt(ours.get('best_val_accuracy'))}),"
            f" KerasTuner after {_fmt(kt.get('seconds_to_target'))} s "
            f"(best {_fmt(kt.get('best_val_accuracy'))}); a tool that never reaches the target "
            f"is censored at the budget ({results.get('censored')})."
        )
    if "stage_seconds" in results:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in results["stage_seconds"].items())
        lines.append(
            f"- viz of a {results.get('model_params', 0):,}-parameter CNN: {stages} (reference "
            f"{_fmt(results.get('viz_reference_images_per_second'))} images/s, load "
            f"{_fmt(results.get('load_average_1min'))})."
        )
    if "budget_trials" in results:
        trials = "; ".join(
            f"{t['name']} {_fmt(t['best_val_accuracy'])} after {t['epochs_done']} epochs"
            + (f" on {t['train_fraction']:g} of the rows" if t.get("train_fraction", 1) < 1 else "")
            + f" ({t['status']}{' by ' + t['stop_reason'] if t.get('stop_reason') else ''}, "
            f"{_fmt(t.get('images_per_second_median'))} img/s)"
            for t in results["budget_trials"]
        )
        lines.append(
            f"- budget search ({results.get('budget_run_date')}, commit "
            f"`{results.get('budget_commit')}`, {_fmt(results.get('budget_wall_minutes'))} min "
            f"wall; the machine: reference CNN "
            f"{_fmt(results.get('reference_images_per_second'))} images/s, plain Keras, one "
            f"thread, measured by the same run): {trials}."
        )
    if results.get("ensemble_report"):
        table = results["ensemble_report"]
        lines.append(
            f"- ensemble of that search: members {results.get('ensemble_members')} (weights "
            f"{results.get('ensemble_weights')}, flip {results.get('ensemble_flip')}); on the "
            f"report half ({results.get('ensemble_report_rows')} PublicTest rows, not used to "
            f"choose): best single ({results.get('ensemble_best_single')}) "
            f"{_fmt(table.get('best_single'))}, + flip {_fmt(table.get('best_single_flip'))}, "
            f"ensemble {_fmt(table.get('ensemble'))}, + flip {_fmt(table.get('ensemble_flip'))}; "
            f"{_fmt(results.get('ensemble_predict_ms_per_image'))} ms per image; champion: "
            f"{results.get('ensemble_champion')}."
        )
    lines += bench_search_value.details(results, _fmt)
    rows = results.get("memory_estimate_rows")
    if rows:
        lines += [
            "",
            "Trial memory estimate vs the trial's own measured peak (`peak_memory_mb`): real "
            "trials of the search's trainable, placed by its planner after its calibration "
            f"(runtime {_fmt(results.get('memory_runtime_mb'))} MiB, reference "
            f"{_fmt(results.get('memory_reference_images_per_second'))} images/s), "
            f"{results.get('memory_epochs')} epochs each, two at a time:",
            "",
            "| config | optimizer | params | batch | rows | estimated MB | measured MB | error |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['config']} | {r['optimizer']} | {r['params']:,} | {r['batch']} | "
            f"{r.get('train_fraction', '')} | {r['estimated_mb']} | {r['measured_mb']} | "
            f"{r['rel_error'] * 100:+.1f} % |"
            for r in rows
        ]
    return "\n".join(lines)


def _merged_note(meta: dict[str, Any], results: dict[str, Any]) -> str:
    sources = dict(meta.get("sources") or {})
    if "budget" not in sources and "budget_run_date" in results:
        # Stored apart (budget_search.json), with its own date and commit.
        sources["budget"] = {
            "date": results["budget_run_date"],
            "commit": results.get("budget_commit"),
            "command": "make bench ARGS='--with-budget'",
        }
    if "search-value" not in sources and "search_value_run_date" in results:
        sources["search-value"] = {
            "date": results["search_value_run_date"],
            "commit": results.get("search_value_commit"),
            "command": "make bench ARGS='--with-budget --only search-value'",
        }
    if sources and set(sources) != set(meta.get("ran", [])):
        by_run: dict[tuple[Any, ...], list[str]] = {}
        for name, source in sources.items():
            key = (source.get("date"), source.get("commit"), source.get("command"))
            by_run.setdefault(key, []).append(name)
        runs = "; ".join(
            f"{', '.join(names)} from {date} (commit `{commit}`, `{command}`)"
            for (date, commit, command), names in sorted(by_run.items(), key=str)
        )
        return f"\nThe figures come from several runs: {runs}."
    return ""


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """Replace the generated section of BENCHMARKS.md (between the markers) with this run."""
    meta = results.get("_meta", {})
    generated = "\n".join(
        [
            f"Machine: {meta.get('machine', '?')}. Date: {meta.get('date', '?')}. "
            f"Commit: `{meta.get('commit', '?')}`. Command: `{meta.get('command', 'make bench')}`."
            f" Load average before the run: {meta.get('load_average_before', '?')}.",
            _merged_note(meta, results),
            "",
            table(results),
            "",
            details(results),
            "",
            "Failed benchmarks in this run: "
            + (", ".join(f"{k} ({v})" for k, v in meta.get("errors", {}).items()) or "none")
            + ".",
        ]
    )
    begin, end = "<!-- generated:begin -->", "<!-- generated:end -->"
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{generated}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FER2013_PATH", ""))
    parser.add_argument(
        "--with-budget", action="store_true", help="also re-run the 60-minute budget search"
    )
    parser.add_argument(
        "--only",
        help="comma list of: load,memory,search,viz,kerastuner (and, with --with-budget, "
        "budget,search-value)",
    )
    parser.add_argument(
        "--regimes",
        default="",
        help="the search-value benchmark's regimes, comma list of hour,large (default: both)",
    )
    parser.add_argument(
        "--first-search-only",
        action="store_true",
        help="the search-value benchmark's large regime without its second search (an arm less)",
    )
    parser.add_argument(
        "--regenerate",
        action="store_true",
        help="run nothing: rewrite BENCHMARKS.md's table from bench/results/latest.json",
    )
    args = parser.parse_args(argv)
    if args.regenerate:
        results = json.loads((RESULTS / "latest.json").read_text())
        write_markdown(results, ROOT / "BENCHMARKS.md")
        print(table(results))
        return 0
    if not args.data:
        parser.error("--data or FER2013_PATH is required (the benchmarks use the real data)")
    only = args.only.split(",") if args.only else None
    if only and not args.with_budget and set(only) & set(WITH_BUDGET):
        parser.error(f"--only {args.only}: {', '.join(WITH_BUDGET)} run only with --with-budget")
    regimes = tuple(r.strip() for r in args.regimes.split(",") if r.strip())
    results = run_all(
        args.data, args.with_budget, only, regimes, second_search=not args.first_search_only
    )
    flags = (
        (["--with-budget"] if args.with_budget else [])
        + ([f"--only {args.only}"] if only else [])
        + ([f"--regimes {args.regimes}"] if regimes else [])
        + (["--first-search-only"] if args.first_search_only else [])
    )
    if flags:
        results["_meta"]["command"] = f"make bench ARGS='{' '.join(flags)}'"
    if only:
        results["_meta"]["only"] = args.only
        results = merge_previous(results)
    else:
        record_sources(results["_meta"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2, default=str))
    write_markdown(results, ROOT / "BENCHMARKS.md")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
