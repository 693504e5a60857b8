"""Builders shared by the viz tests: tiny models, a tiny FER2013 CSV, an MLflow search.

Not a test module (no `test_` prefix); the viz test files import it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CLASSES = 7
USAGES = {"Training": 6, "PublicTest": 4, "PrivateTest": 2}  # rows per class and usage


def write_fer_csv(path: Path, seed: int = 0) -> Path:
    """A fer2013-format CSV (emotion,pixels,Usage) with a few rows per class and usage.

    Each class gets a bright blob in its own place so a tiny model can learn something.
    """
    rng = np.random.default_rng(seed)
    lines = ["emotion,pixels,Usage"]
    for usage, per_class in USAGES.items():
        for label in range(CLASSES):
            for _ in range(per_class):
                image = rng.integers(0, 120, (48, 48))
                row, col = divmod(label, 3)
                image[6 + 14 * row : 18 + 14 * row, 6 + 14 * col : 18 + 14 * col] += 120
                pixels = " ".join(str(int(v)) for v in np.clip(image, 0, 255).ravel())
                lines.append(f"{label},{pixels},{usage}")
    path.write_text("\n".join(lines) + "\n")
    return path


def load_csv_arrays(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """images uint8 (N,48,48,1), labels, usage straight from the tiny CSV (for fitting)."""
    rows = path.read_text().strip().splitlines()[1:]
    labels, images, usage = [], [], []
    for line in rows:
        emotion, pixels, use = line.split(",")
        labels.append(int(emotion))
        images.append(np.array(pixels.split(), dtype=np.uint8).reshape(48, 48, 1))
        usage.append(use)
    return np.stack(images), np.array(labels, dtype=np.int64), np.array(usage)


def tiny_cnn(seed: int = 1) -> Any:
    """Rescaling -> Conv2D -> pool -> Conv2D -> pool -> Flatten -> Dense(7, softmax).

    Flatten (not global pooling) keeps where the class blob is, so the model can learn it.
    """
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((48, 48, 1), name="pixels")
    x = keras.layers.Rescaling(1.0 / 255.0, name="normalize_rescale")(inputs)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv_1")(x)
    x = keras.layers.MaxPooling2D(4, name="pool_1")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_2")(x)
    x = keras.layers.MaxPooling2D(4, name="pool_2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="tiny_cnn")


def tiny_dnn(seed: int = 2) -> Any:
    """Rescaling -> Flatten -> Dense -> Dense(7, softmax)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((48, 48, 1), name="pixels")
    x = keras.layers.Rescaling(1.0 / 255.0, name="normalize_rescale")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(16, activation="relu", name="dense_1")(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="tiny_dnn")


def fit_briefly(
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    val: tuple[np.ndarray, np.ndarray],
    epochs: int = 3,
    callbacks: list[Any] | None = None,
) -> Any:
    """Compile and fit a few epochs (fast, large learning rate); returns the Keras History."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model.fit(
        images.astype("float32"),
        labels,
        validation_data=(val[0].astype("float32"), val[1]),
        epochs=epochs,
        batch_size=16,
        shuffle=True,
        verbose=0,
        callbacks=callbacks or [],
    )


@dataclass
class SearchFixture:
    """An MLflow store holding one search parent and its CNN and DNN trials."""

    tracking_uri: str
    experiment_id: str
    experiment_name: str
    parent_id: str
    cnn_run_id: str
    dnn_run_id: str
    csv_path: Path
    data_sha256: str
    cnn_val_accuracy: float
    dnn_val_accuracy: float
    cnn_public_accuracy: float  # the saved CNN on PublicTest, computed from the raw CSV
    dnn_param_count: int


def run_config(family: str, csv_path: Path, sha: str, param_count: int) -> dict[str, Any]:
    """config.json per docs/ARCHITECTURE.md."""
    return {
        "family": family,
        "model": {"family": family},
        "training": {
            "batch_size": 16,
            "micro_batch_size": 16,
            "learning_rate": 0.001,
            "optimizer": "adam",
            "max_epochs": 3,
            "seed": 2017,
        },
        "data": {
            "source": str(csv_path),
            "sha256": sha,
            "data_fraction": 1.0,
            "seed": 2017,
            "train_usage": "Training",
            "val_usage": "PublicTest",
        },
        "param_count": param_count,
    }


def log_trial(
    client: Any,
    experiment_id: str,
    parent_id: str,
    family: str,
    model: Any,
    history: Any,
    csv_path: Path,
    sha: str,
    model_file: Path,
) -> tuple[str, float]:
    """A child trial run as jobs/ writes it (model_file: the best epoch's .keras);
    returns (run_id, best_val_accuracy)."""
    from schema.run import TAG_FAMILY, TAG_ROLE, TAG_STATUS, log_model_files

    run = client.create_run(
        experiment_id,
        tags={
            "mlflow.parentRunId": parent_id,
            TAG_ROLE: "trial",
            TAG_FAMILY: family,
            TAG_STATUS: "finished",
        },
        run_name=f"{family}-trial",
    )
    run_id = run.info.run_id
    count = int(model.count_params())
    client.log_param(run_id, "family", family)
    client.log_param(run_id, "param_count", count)
    for epoch, (acc, val) in enumerate(
        zip(history.history["accuracy"], history.history["val_accuracy"], strict=True), start=1
    ):
        client.log_metric(run_id, "accuracy", float(acc), step=epoch)
        client.log_metric(run_id, "val_accuracy", float(val), step=epoch)
    best = float(max(history.history["val_accuracy"]))
    client.log_metric(run_id, "best_val_accuracy", best)
    log_model_files(client, run_id, model_file, run_config(family, csv_path, sha, count))
    client.set_terminated(run_id)
    return run_id, best


def build_search(root: Path, experiment_name: str = "fer-viz-test") -> SearchFixture:
    """Tracking store, tiny data, two fitted models, a parent search and its two trials."""
    import keras
    from mlflow.tracking import MlflowClient

    from schema.run import TAG_BEST_RUN, TAG_DATA_SHA, TAG_ROLE

    root.mkdir(parents=True, exist_ok=True)
    csv_path = write_fer_csv(root / "fer2013_tiny.csv")
    sha = data_sha256(csv_path)
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(
        experiment_name, artifact_location=(root / "artifacts").as_uri()
    )
    parent = client.create_run(experiment_id, tags={TAG_ROLE: "search"}, run_name="search")
    parent_id = parent.info.run_id
    client.set_tag(parent_id, TAG_DATA_SHA, sha)

    images, labels, usage = load_csv_arrays(csv_path)
    train, public = usage == "Training", usage == "PublicTest"
    val = (images[public], labels[public])
    work = root / "models"
    work.mkdir(exist_ok=True)
    trained = {}
    for family, build, epochs in (("cnn", tiny_cnn, 4), ("dnn", tiny_dnn, 3)):
        model = build()
        # As jobs/ does: the artifact is the best-validation epoch, not the last one.
        best_file = work / f"{family}-best.keras"
        checkpoint = keras.callbacks.ModelCheckpoint(
            best_file, monitor="val_accuracy", mode="max", save_best_only=True
        )
        history = fit_briefly(model, images[train], labels[train], val, epochs, [checkpoint])
        run_id, best = log_trial(
            client, experiment_id, parent_id, family, model, history, csv_path, sha, best_file
        )
        trained[family] = (run_id, best, keras.saving.load_model(best_file, safe_mode=True))
    (cnn_id, cnn_best, cnn), (dnn_id, dnn_best, dnn) = trained["cnn"], trained["dnn"]
    predicted = cnn.predict(images[public].astype("float32"), verbose=0).argmax(axis=1)
    # best_run_id names the CNN even if the DNN's metric is higher: auto selection must
    # follow the tag, so the tests can tell the two rules apart.
    client.set_tag(parent_id, TAG_BEST_RUN, cnn_id)
    client.log_metric(parent_id, "best_val_accuracy", max(cnn_best, dnn_best))
    client.set_terminated(parent_id)
    return SearchFixture(
        tracking_uri=tracking_uri,
        experiment_id=experiment_id,
        experiment_name=experiment_name,
        parent_id=parent_id,
        cnn_run_id=cnn_id,
        dnn_run_id=dnn_id,
        csv_path=csv_path,
        data_sha256=sha,
        cnn_val_accuracy=cnn_best,
        dnn_val_accuracy=dnn_best,
        cnn_public_accuracy=float(np.mean(predicted == labels[public])),
        dnn_param_count=int(dnn.count_params()),
    )


@contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """Temporarily set (or, with None, remove) environment variables."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# One store and one full run_viz per session, shared by the test modules that need them.
_SHARED: dict[str, Any] = {}


def shared_search(factory: Any) -> SearchFixture:
    """build_search once per session (factory: pytest's tmp_path_factory)."""
    if "search" not in _SHARED:
        root = factory.mktemp("viz-search")
        with environ(FER2013_CACHE_DIR=str(root / "cache")):
            _SHARED["search"] = build_search(root)
    return _SHARED["search"]


def shared_viz(factory: Any) -> tuple[dict[str, Any], Path]:
    """One full run_viz with automatic run selection (as `mlflow run -e viz` would do it):
    returns its summary and its `out` folder."""
    if "viz" not in _SHARED:
        from mlflow.tracking import MlflowClient

        from viz.main import run_viz
        from viz.settings import VizSettings

        search = shared_search(factory)
        out = factory.mktemp("viz-out")
        settings = VizSettings(
            data="",  # "" = the source recorded in the run's config.json
            out=str(out),
            filters_per_layer=4,
            ascent_steps=15,
            smooth_samples=3,
            predict_batch_size=64,
        )
        with environ(
            FER2013_CACHE_DIR=str(search.csv_path.parent / "cache"),
            MLFLOW_EXPERIMENT_NAME=search.experiment_name,
            MLFLOW_EXPERIMENT_ID=None,
        ):
            summary = run_viz(settings, MlflowClient(search.tracking_uri))
        _SHARED["viz"] = (summary, out)
    return _SHARED["viz"]


def data_sha256(csv_path: Path) -> str:
    """The hash the loader reports for the tiny CSV (whatever its definition)."""
    from model.data import load_fer2013

    return load_fer2013(csv_path).sha256


def artifact_paths(client: Any, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact path of a run, recursively."""
    found: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            found |= artifact_paths(client, run_id, info.path)
        else:
            found.add(info.path)
    return found


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG", f"{path}: expected a PNG, found {image.format}"
        return image.size


def png_has_content(path: Path, min_colours: int = 16) -> bool:
    """True when the image is not blank: enough distinct colours and some non-white pixels."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    colours = np.unique(rgb.reshape(-1, 3), axis=0).shape[0]
    non_white = float(np.mean(rgb.min(axis=2) < 240))
    return colours >= min_colours and non_white > 0.01


def dnn_plan(name: str, hidden: tuple[int, ...], max_epochs: int = 1) -> Any:
    """A DNN trial plan for `Strategy.fixed(plans)`: batch 32; the hidden sizes set its
    estimated memory."""
    from jobs.plan import TrainingConfig, TrialPlan
    from model.configs import config_to_dict
    from model.dnn import DNNConfig

    training = TrainingConfig(batch_size=32, micro_batch_size=32, max_epochs=max_epochs, seed=7)
    return TrialPlan(name, config_to_dict(DNNConfig(hidden_units=hidden, dropout=0.1)), training)
