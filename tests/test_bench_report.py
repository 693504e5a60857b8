"""`make bench`'s report keeps each benchmark's provenance across partial runs."""

from __future__ import annotations

from bench.bench_kerastuner import compare
from bench.run_all import _merged_note, record_sources


def test_a_partial_run_keeps_the_provenance_of_what_it_did_not_rerun() -> None:
    full = {"date": "d1", "commit": "c1", "command": "make bench", "ran": ["load", "search"]}
    record_sources(full)
    partial = {"date": "d2", "commit": "c2", "command": "make bench ARGS='--only search'"}
    partial["ran"] = ["search"]
    record_sources(partial, full)
    assert partial["sources"] == {
        "load": {"date": "d1", "commit": "c1", "command": "make bench"},
        "search": {"date": "d2", "commit": "c2", "command": "make bench ARGS='--only search'"},
    }
    note = _merged_note(partial, {"budget_run_date": "d0", "budget_commit": "c0"})
    assert "load from d1 (commit `c1`" in note
    assert "search from d2 (commit `c2`" in note
    assert "budget from d0 (commit `c0`" in note
    # A run that re-ran everything needs no note.
    assert _merged_note(full, {}) == ""


def test_the_kerastuner_target_is_its_own_best_and_a_miss_counts_the_budget() -> None:
    kerastuner = [(60.0, 0.30), (300.0, 0.36), (500.0, 0.35)]
    # Ours reached 0.36 at 90 s: both reach the target, ours in 90 s, KerasTuner's best at 300 s.
    outcome = compare([(30.0, 0.31), (90.0, 0.37), (200.0, 0.40)], kerastuner, 600.0)
    assert outcome["kerastuner_target_val_accuracy"] == 0.36
    assert outcome["seconds_to_target"] == {"ours": 90.0, "kerastuner": 300.0}
    assert outcome["kerastuner_time_to_target_ratio"] == 0.3
    # A search that never reaches it is censored at the budget, not left out.
    missed = compare([(30.0, 0.31)], kerastuner, 600.0)
    assert missed["censored"] == {"ours": True, "kerastuner": False}
    assert missed["kerastuner_time_to_target_ratio"] == 2.0
    # A fixed target both may miss.
    fixed = compare([(30.0, 0.31)], kerastuner, 600.0, target=0.5)
    assert fixed["kerastuner_time_to_target_ratio"] == 1.0


def test_the_recipes_compared_are_the_known_good_cnn_with_fields_replaced() -> None:
    import pytest

    from bench.bench_recipes import RECIPES, recipe_config
    from jobs.space import FAST_CNN

    assert recipe_config("fast-cnn") == FAST_CNN
    older = recipe_config("strong-dropout-0.3")
    assert older.dropout == 0.3 and older.augmentation.rotation > 0
    assert older.filters == FAST_CNN.filters
    configs = [recipe_config(name) for name in RECIPES]
    assert all(a != b for i, a in enumerate(configs) for b in configs[i + 1 :])
    with pytest.raises(ValueError, match="fast-cnn"):
        recipe_config("vgg")
