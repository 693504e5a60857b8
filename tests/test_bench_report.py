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
    # Every recipe trains something else: its model, its training fields or its seed.
    recipes = [(recipe_config(name), RECIPES[name]) for name in RECIPES]
    assert all(
        a[0] != b[0] or a[1].training != b[1].training or a[1].seed_offset != b[1].seed_offset
        for i, a in enumerate(recipes)
        for b in recipes[i + 1 :]
    )
    with pytest.raises(ValueError, match="fast-cnn"):
        recipe_config("vgg")


def test_the_neighbour_recipes_are_the_searchs_first_proposals() -> None:
    from bench.bench_recipes import RECIPES, recipe_config
    from jobs.space import KNOWN_GOOD_CNN, NEIGHBOURS, model_from_params, neighbours

    assert {f"neighbour-{suffix}" for suffix in NEIGHBOURS} <= set(RECIPES)
    for suffix, point in neighbours(KNOWN_GOOD_CNN):
        name = f"neighbour-{suffix}"
        assert recipe_config(name) == model_from_params({**point, "family": "cnn"})
        assert RECIPES[name].training.get("label_smoothing", 0.0) == float(
            point["training.label_smoothing"]
        )
    assert RECIPES["neighbour-smooth"].training == {"label_smoothing": 0.1}


def test_a_pair_of_recipes_is_scored_as_the_searchs_ensemble_gain() -> None:
    import numpy as np
    import pytest

    from bench.bench_recipes import pair_table
    from bench.value_baseline import report_accuracy
    from schema.run import Predictions

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(7), 40)
    right = np.eye(7, dtype=np.float32)[labels]
    wrong = np.eye(7, dtype=np.float32)[(labels + 1) % 7]

    # Two models, each right on a different random 60 % of the rows: together (sure where
    # one is right and the other unsure) they are right more often than either.
    def model(right_rows: np.ndarray) -> Predictions:
        sure = np.where(right_rows[:, None], 0.7 * right + 0.3 / 7, 0.4 * wrong + 0.6 / 7)
        return Predictions(sure, sure, labels, epoch=1)

    a = model(rng.random(labels.size) < 0.6)
    b = model(rng.random(labels.size) < 0.6)
    table = pair_table({"a": a, "b": b, "a-again": a}, seed=2017)
    assert [row["members"] for row in table][0] in (["a", "b"], ["a-again", "b"])
    pair = next(row for row in table if row["members"] == ["a", "b"])
    alone = [report_accuracy(p.probabilities, labels, 2017) for p in (a, b)]
    assert pair["report_members"] == [round(x, 4) for x in alone]
    assert pair["gain_points"] == round(100 * (pair["report_accuracy"] - max(alone)), 2)
    assert pair["gain_points"] > 5
    # A copy of one model gains nothing (its flips are its own here).
    copy = next(row for row in table if row["members"] == ["a", "a-again"])
    assert copy["gain_points"] == 0.0
    with pytest.raises(ValueError, match="other validation rows"):
        pair_table({"a": a, "c": Predictions(a.probabilities, a.probabilities, labels[::-1], 1)}, 1)
    with pytest.raises(ValueError, match="at least 2"):
        pair_table({"a": a}, 2017)


def test_recipes_train_their_own_epochs_and_groups_of_them_score_as_ensembles() -> None:
    import numpy as np
    import pytest

    from bench.bench_recipes import entry, group_table, parse_groups, recipe_config
    from bench.value_baseline import flip_mean, report_accuracy
    from schema.run import Predictions

    assert entry("fast-cnn", 8) == ("fast-cnn", 8)
    assert entry("neighbour-crop@57", 8) == ("neighbour-crop", 57)
    assert recipe_config("neighbour-crop@57") == recipe_config("neighbour-crop")
    with pytest.raises(ValueError, match="name@epochs"):
        entry("fast-cnn@0", 8)
    with pytest.raises(ValueError, match="name@epochs"):
        entry("fast-cnn@many", 8)

    names = ["a@2", "b@1", "c@1"]
    assert parse_groups("a@2; b@1+c@1", names) == [["a@2"], ["b@1", "c@1"]]
    with pytest.raises(ValueError, match="--recipes entries"):
        parse_groups("a@2;b@1+d@1", names)

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(7), 30)
    predictions = {}
    for name in names:
        p = rng.dirichlet(np.ones(7), size=labels.size).astype(np.float32)
        predictions[name] = Predictions(p, p[::-1].copy(), labels, epoch=1)
    rows = group_table(predictions, [["a@2"], ["b@1", "c@1"]], {"a@2": 2, "b@1": 1, "c@1": 1}, 3)
    assert [row["member_epochs"] for row in rows] == [2, 2]
    pair = flip_mean([predictions["b@1"], predictions["c@1"]])
    assert rows[1]["report_accuracy"] == round(report_accuracy(pair, labels, 3), 4)
    assert rows[0]["points_on_first"] == 0.0
    assert rows[1]["points_on_first"] == round(
        100 * (rows[1]["report_accuracy"] - rows[0]["report_accuracy"]), 2
    )
