"""One source of truth: MLproject, the CLIs and conda.yaml agree with the settings and pins."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from jobs.settings import PrepareSettings, SearchSettings, TrainSettings, add_arguments

ROOT = Path(__file__).resolve().parent.parent


def mlproject() -> dict:
    return yaml.safe_load((ROOT / "MLproject").read_text())


def _same(mlproject_default: object, field_default: object) -> bool:
    if isinstance(field_default, bool):
        return str(mlproject_default).lower() == str(field_default).lower()
    if isinstance(field_default, int | float):
        return float(mlproject_default) == float(field_default)
    return str(mlproject_default) == str(field_default)


@pytest.mark.parametrize(
    ("entry_point", "settings_class"),
    [
        ("main", SearchSettings),
        ("search", SearchSettings),
        ("train", TrainSettings),
        ("prepare", PrepareSettings),
    ],
)
def test_mlproject_defaults_match_settings(entry_point: str, settings_class: type) -> None:
    parameters = mlproject()["entry_points"][entry_point]["parameters"]
    command = mlproject()["entry_points"][entry_point]["command"]
    exposed = {f.name: f.default for f in fields(settings_class) if f.name in parameters}
    assert set(parameters) <= {f.name for f in fields(settings_class)}, "unknown parameter"
    for name, default in exposed.items():
        assert _same(parameters[name]["default"], default), (entry_point, name)
        assert "{" + name + "}" in command, f"{entry_point}: {name} not passed to the command"
        assert "--" + name.replace("_", "-") in command


def test_search_entry_points_expose_the_issue_parameters() -> None:
    required = {
        "data",
        "families",
        "num_samples",
        "max_epochs",
        "time_budget_min",
        "data_fraction",
        "seed",
        "storage",
        "resume",
        "remember",
    }
    for entry_point in ("main", "search"):
        assert required <= set(mlproject()["entry_points"][entry_point]["parameters"])


def test_viz_entry_point_matches_viz_settings() -> None:
    viz_settings = pytest.importorskip("viz.settings")
    parameters = mlproject()["entry_points"]["viz"]["parameters"]
    defaults = {f.name: f.default for f in fields(viz_settings.VizSettings)}
    for name, spec in parameters.items():
        assert name in defaults, f"viz parameter {name} not in VizSettings"
        assert _same(spec["default"], defaults[name]), name


def test_cli_defaults_come_from_settings() -> None:
    for settings_class in (SearchSettings, TrainSettings, PrepareSettings):
        parser = argparse.ArgumentParser()
        add_arguments(parser, settings_class)
        parsed = vars(parser.parse_args([]))
        assert parsed == {f.name: f.default for f in fields(settings_class)}


def test_cli_parses_mlproject_style_values() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, SearchSettings)
    parsed = parser.parse_args(
        ["--resume", "true", "--num-samples", "4", "--data-fraction", "0.03"]
    )
    assert parsed.resume is True and parsed.num_samples == 4 and parsed.data_fraction == 0.03
    with pytest.raises(SystemExit):
        parser.parse_args(["--resume", "maybe"])


def test_conda_env_uses_the_same_pins_as_requirements() -> None:
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    pins = [
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert sorted(pip_section) == sorted(pins)
    assert all("==" in pin for pin in pins), "every runtime requirement is pinned"
    assert mlproject()["conda_env"] == "conda.yaml"


def test_a_single_training_run_can_be_time_boxed_and_start_from_the_known_good_cnn() -> None:
    from jobs.settings import TrainSettings
    from jobs.space import FAST_CNN
    from jobs.train import resolve_model_config, training_config

    settings = TrainSettings(preset="cnn-fast", time_budget_min=2.5, lr_schedule="cosine")

    assert training_config(settings).time_budget_s == 150.0
    assert training_config(TrainSettings()).time_budget_s == 0.0  # no limit by default
    assert resolve_model_config("cnn", settings.preset, "") == FAST_CNN
    with pytest.raises(ValueError, match="time_budget_min: expected >= 0, got -1"):
        TrainSettings(time_budget_min=-1)
