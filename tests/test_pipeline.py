"""The main job's closing lines: what a user reads last."""

from __future__ import annotations

import dataclasses

from jobs.search import SearchResult
from pipeline import closing_lines


def test_closing_lines_name_the_champion_its_accuracy_the_report_and_how_to_serve() -> None:
    result = SearchResult(
        parent_run_id="p1",
        best_run_id="b1",
        best_val_accuracy=0.652,
        tune_path="tune",
        champion_run_id="e1",
        wall_seconds=3600,
        strategy="exploit: one cnn-fast model takes 63.0 min of a slot",
    )
    viz = {"accuracy": 0.661, "split": "PublicTest", "split_size": 3589}
    text = closing_lines(result, registered=True, viz=viz)
    assert "run e1, an ensemble of trials (0.661 on 3589 PublicTest rows" in text
    assert "best trial val_accuracy 0.652" in text
    assert "mlflow artifacts download -r e1 -a report.html" in text
    assert "make ui" in text and "make serve" in text
    assert "Strategy:  exploit: one cnn-fast model takes 63.0 min" in text
    quiet = closing_lines(result, registered=False, viz=None)
    assert "Report:" not in quiet and "make serve" not in quiet
    single = dataclasses.replace(result, champion_run_id=None)
    assert "run b1, the best trial" in closing_lines(single, registered=True, viz=None)


def test_closing_lines_of_a_search_that_trained_nothing() -> None:
    result = SearchResult("p1", None, None, "tune", wall_seconds=60)
    assert "no trained model" in closing_lines(result, registered=True, viz=None)
