"""The main job's closing lines: what a user reads last."""

from __future__ import annotations

from types import SimpleNamespace

from pipeline import closing_lines


def test_closing_lines_name_the_champion_its_accuracy_the_report_and_how_to_serve() -> None:
    result = SimpleNamespace(
        wall_seconds=3600, best_run_id="b1", best_val_accuracy=0.652, champion_run_id="e1"
    )
    viz = {"accuracy": 0.661, "split": "PublicTest", "split_size": 3589}
    text = closing_lines(result, registered=True, viz=viz)
    assert "run e1, an ensemble of trials (0.661 on 3589 PublicTest rows" in text
    assert "best trial val_accuracy 0.652" in text
    assert "mlflow artifacts download -r e1 -a report.html" in text
    assert "make ui" in text and "make serve" in text
    quiet = closing_lines(result, registered=False, viz=None)
    assert "Report:" not in quiet and "make serve" not in quiet
    single = SimpleNamespace(**{**vars(result), "champion_run_id": None})
    assert "run b1, the best trial" in closing_lines(single, registered=True, viz=None)


def test_closing_lines_of_a_search_that_trained_nothing() -> None:
    result = SimpleNamespace(
        wall_seconds=60, best_run_id=None, best_val_accuracy=None, champion_run_id=None
    )
    assert "no trained model" in closing_lines(result, registered=True, viz=None)
