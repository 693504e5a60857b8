"""The search's last step: an ensemble of its finished trials, and which model is champion.

Every finished trial logged its best epoch's validation probabilities (`predictions/val.npz`,
plain and mirrored). The validation rows are split into two fixed stratified halves: members
and weights are chosen on `select` (model/ensemble.py), every accuracy stated is on `report`.
The ensemble becomes one Keras model in a child run (`fer.role=ensemble`); it is champion when
it beats the best single model (chosen on `select`) on `report`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.ensemble import (
    Halves,
    Selection,
    accuracy,
    greedy_selection,
    log_loss,
    split_halves,
    with_flip,
)
from schema import run as layout
from schema.ensemble import EnsembleConfig, EnsembleMember
from schema.ensemble import ReportTable as LoggedTable

log = logging.getLogger("jobs.search")

ROLE_ENSEMBLE = layout.ENSEMBLE
ENSEMBLE_RUN_NAME = layout.ENSEMBLE
# The built model must reproduce the weighted mean of its members' logged probabilities.
REPRODUCTION_TOLERANCE = 1e-3
# Rows timed for the ensemble's prediction cost (after one warm-up batch).
TIMED_ROWS = 512
FINISHED_STATUSES = layout.TRAINED_STATUSES


@dataclass(frozen=True)
class Candidate:
    run_id: str
    name: str
    family: str
    predictions: layout.Predictions

    def probabilities(self, flip: bool, rows: np.ndarray) -> np.ndarray:
        """This trial's probabilities on `rows`, flip-averaged when `flip`."""
        p = self.predictions
        return with_flip(p.probabilities, p.probabilities_flipped, flip)[rows]


@dataclass
class ReportTable:
    """Accuracies on the `report` half: what the search says about its champion."""

    best_single: float
    best_single_flip: float
    ensemble: float
    ensemble_flip: float
    members: dict[str, float] = field(default_factory=dict)  # each member, plain

    @property
    def gain_points(self) -> float:
        """Ensemble + flip over the best single model, in accuracy points."""
        return 100.0 * (self.ensemble_flip - self.best_single)


@dataclass
class Choice:
    """What selection on `select` chose, and how it does on `report`."""

    halves: Halves
    best_single: int  # index into the candidates
    plain: Selection
    flipped: Selection
    chosen: Selection  # the one of plain / flipped with the lower log loss on `select`
    table: ReportTable


@dataclass
class EnsembleOutcome:
    run_id: str
    model_uri: str
    choice: Choice
    candidates: list[Candidate]

    @property
    def beats_best_single(self) -> bool:
        table = self.choice.table
        chosen = table.ensemble_flip if self.choice.chosen.flip else table.ensemble
        return chosen > table.best_single

    def reason(self) -> str:
        table = self.choice.table
        chosen = table.ensemble_flip if self.choice.chosen.flip else table.ensemble
        single = self.candidates[self.choice.best_single].name
        verdict = "beats" if self.beats_best_single else "does not beat"
        return (
            f"the ensemble ({self.describe()}) {verdict} the best single model {single} on the "
            f"report half of the validation rows: {chosen:.4f} vs {table.best_single:.4f} "
            f"({len(self.choice.halves.report)} rows, not used to choose either)"
        )

    def describe(self) -> str:
        chosen = self.choice.chosen
        parts = [
            f"{self.candidates[m].name} x{w:.2f}"
            for m, w in zip(chosen.members, chosen.weights, strict=True)
        ]
        return ", ".join(parts) + (" with flip averaging" if chosen.flip else "")


def candidates(client: Any, runs: list[Any], labels: np.ndarray, dst: Path) -> list[Candidate]:
    """The finished trials with a model and predictions for exactly these validation rows."""
    found = []
    for run in runs:
        tags = run.data.tags
        if tags.get(layout.TAG_STATUS) not in FINISHED_STATUSES or layout.TAG_MODEL_URI not in tags:
            continue
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, layout.PREDICTIONS_DIR)}
        if f"{layout.PREDICTIONS_DIR}/{layout.PREDICTIONS_FILE}" not in artifacts:
            continue
        predictions = layout.download_predictions(client, run.info.run_id, dst / run.info.run_id)
        if predictions.labels.shape != labels.shape or not np.array_equal(
            predictions.labels, labels
        ):
            log.warning(
                "ensemble: %s (%s) predicted other validation rows; left out",
                run.info.run_name,
                run.info.run_id,
            )
            continue
        found.append(
            Candidate(
                run.info.run_id, run.info.run_name, tags.get(layout.TAG_FAMILY, ""), predictions
            )
        )
    return found


def choose(found: list[Candidate], labels: np.ndarray, seed: int) -> Choice:
    """Members and weights chosen on `select`; the report table measured on `report`."""
    halves = split_halves(labels, seed)
    sel, rep = halves.select, halves.report

    by_flip = {}
    for flip in (False, True):
        by_flip[flip] = greedy_selection(
            [c.probabilities(flip, sel) for c in found], labels[sel], flip
        )

    def select_loss(selection: Selection) -> float:
        return log_loss(
            selection.combine([c.probabilities(selection.flip, sel) for c in found]), labels[sel]
        )

    chosen = min(by_flip.values(), key=select_loss)
    single_accuracy = [accuracy(c.probabilities(False, sel), labels[sel]) for c in found]
    best_single = int(np.argmax(single_accuracy))

    def report(selection: Selection) -> float:
        mixed = selection.combine([c.probabilities(selection.flip, rep) for c in found])
        return accuracy(mixed, labels[rep])

    top = found[best_single]
    table = ReportTable(
        best_single=accuracy(top.probabilities(False, rep), labels[rep]),
        best_single_flip=accuracy(top.probabilities(True, rep), labels[rep]),
        ensemble=report(by_flip[False]),
        ensemble_flip=report(by_flip[True]),
        members={
            found[m].name: accuracy(found[m].probabilities(False, rep), labels[rep])
            for m in sorted(set(by_flip[False].members) | set(by_flip[True].members))
        },
    )
    return Choice(halves, best_single, by_flip[False], by_flip[True], chosen, table)


def build_and_log(
    client: Any,
    experiment_id: str,
    parent_id: str,
    runs: list[Any],
    x_val: np.ndarray,
    y_val: np.ndarray,
    data_info: dict[str, Any],
    seed: int,
) -> EnsembleOutcome | None:
    """Choose, build, check and log the ensemble; None with fewer than two candidates."""
    with tempfile.TemporaryDirectory(prefix="fer-ensemble-") as tmp:
        work = Path(tmp)
        found = candidates(client, runs, np.asarray(y_val, np.int64), work / "predictions")
        if len(found) < 2:
            log.info("ensemble: %d finished trial(s) with predictions; no ensemble", len(found))
            return None
        choice = choose(found, np.asarray(y_val, np.int64), seed)
        model, seconds_per_image = _build_checked(client, found, choice, x_val, work)
        model_file = work / layout.MODEL_FILE
        model.save(model_file)
        run_id, model_uri = _log_run(
            client,
            experiment_id,
            parent_id,
            found,
            choice,
            model,
            model_file,
            data_info,
            seconds_per_image,
        )
    outcome = EnsembleOutcome(run_id, model_uri, choice, found)
    log.info("ensemble: %s", outcome.reason())
    return outcome


def _build_checked(
    client: Any, found: list[Candidate], choice: Choice, x_val: np.ndarray, work: Path
) -> tuple[Any, float]:
    """The chosen ensemble as one Keras model, checked against the members' logged
    probabilities on the report rows, and its prediction cost in seconds per image."""
    import keras

    from model.batches import array_batches
    from model.ensemble import build_ensemble

    chosen = choice.chosen
    members = []
    for index in chosen.members:
        candidate = found[index]
        files = layout.download_model_files(client, candidate.run_id, work / candidate.run_id)
        expected = files["sha256"].read_text().strip()
        if layout.sha256_file(files["model"]) != expected:
            raise ValueError(
                f"run {candidate.run_id}: {layout.MODEL_DIR}/{layout.MODEL_FILE} does not match "
                f"its {layout.SHA_FILE}"
            )
        members.append(keras.saving.load_model(files["model"], safe_mode=True, compile=False))
    model = build_ensemble(members, chosen.weights, chosen.flip)
    rows = choice.halves.report
    x_report = np.asarray(x_val)[rows]
    warm = min(len(rows), 64)
    model.predict(array_batches(x_report[:warm], None, warm), verbose=0)
    timed = x_report[:TIMED_ROWS]
    started = time.perf_counter()
    model.predict(array_batches(timed, None, 64), verbose=0)
    seconds_per_image = (time.perf_counter() - started) / len(timed)
    predicted = model.predict(array_batches(x_report, None, 64), verbose=0)
    expected = chosen.combine([c.probabilities(chosen.flip, rows) for c in found])
    worst = float(np.max(np.abs(predicted - expected)))
    if worst > REPRODUCTION_TOLERANCE:
        raise ValueError(
            f"ensemble: the built model's probabilities differ from the weighted mean of its "
            f"members' logged ones by up to {worst:.2g} (expected <= {REPRODUCTION_TOLERANCE})"
        )
    return model, seconds_per_image


def _log_run(
    client: Any,
    experiment_id: str,
    parent_id: str,
    found: list[Candidate],
    choice: Choice,
    model: Any,
    model_file: Path,
    data_info: dict[str, Any],
    seconds_per_image: float,
) -> tuple[str, str]:
    from mlflow.entities import Metric, Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from jobs.tracking.models import log_keras_model

    chosen, table = choice.chosen, choice.table
    member_ids = [found[m].run_id for m in chosen.members]
    run = client.create_run(
        experiment_id,
        run_name=ENSEMBLE_RUN_NAME,
        tags={
            MLFLOW_PARENT_RUN_ID: parent_id,
            layout.TAG_ROLE: ROLE_ENSEMBLE,
            layout.TAG_FAMILY: ROLE_ENSEMBLE,
            layout.TAG_MEMBERS: ",".join(member_ids),
        },
    )
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        metrics = {
            "val_report_accuracy": table.ensemble_flip if chosen.flip else table.ensemble,
            "report_best_single_accuracy": table.best_single,
            "report_best_single_flip_accuracy": table.best_single_flip,
            "report_ensemble_accuracy": table.ensemble,
            "report_ensemble_flip_accuracy": table.ensemble_flip,
            "ensemble_gain_points": table.gain_points,
            "predict_ms_per_image": 1000.0 * seconds_per_image,
            **{layout.MEMBER_REPORT_METRIC + name: v for name, v in table.members.items()},
        }
        config = _config(found, choice, data_info, int(model.count_params()))
        params = {
            **config.params(),
            "best_single": found[choice.best_single].name,
            "select_rows": str(len(choice.halves.select)),
            "report_rows": str(len(choice.halves.report)),
            "candidates": str(len(found)),
            "param_count": str(int(model.count_params())),
        }
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in params.items()],
        )
        layout.log_model_files(client, run_id, model_file, config.to_dict())
        model_uri = log_keras_model(run_id, model_file)
        client.set_tag(run_id, layout.TAG_MODEL_URI, model_uri)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id, model_uri


def _config(
    found: list[Candidate], choice: Choice, data_info: dict[str, Any], param_count: int
) -> EnsembleConfig:
    """The ensemble run's config.json: its members and weights, the data, the report table."""
    chosen, table = choice.chosen, choice.table
    return EnsembleConfig(
        members=tuple(
            EnsembleMember(found[m].run_id, found[m].name, found[m].family, float(w))
            for m, w in zip(chosen.members, chosen.weights, strict=True)
        ),
        flip=bool(chosen.flip),
        report_table=LoggedTable(
            best_single=float(table.best_single),
            best_single_flip=float(table.best_single_flip),
            ensemble=float(table.ensemble),
            ensemble_flip=float(table.ensemble_flip),
        ),
        param_count=param_count,
        data=data_info,
    )
