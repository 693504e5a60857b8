"""Models into MLflow: the Keras flavour with its signature, and the data as MLflow datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from schema import run as layout


def dataset_inputs(data_info: dict[str, Any]) -> list[Any]:
    """The run's training and validation data as MLflow datasets (the UI's Dataset column).

    The digest is the first 24 hex digits of the file's SHA-256 and the context (MLflow keeps
    36 characters); the profile holds the whole hash, the rows, the fraction and the seed.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    sha = data_info["sha256"]
    source = str(data_info["source"])
    inputs = []
    for usage, rows_key in (
        (data_info["train_usage"], "train_rows"),
        (data_info["val_usage"], "val_rows"),
    ):
        context = layout.DATASET_CONTEXTS[usage]
        profile = {
            "usage": usage,
            "rows": data_info.get(rows_key),
            "sha256": sha,
            "data_fraction": data_info["data_fraction"],
            "seed": data_info["seed"],
        }
        dataset = Dataset(
            name=layout.DATASET_NAME,
            digest=f"{sha[:24]}-{context}",
            source_type="s3" if source.startswith("s3://") else "local",
            source=json.dumps({"uri": source}),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


def pip_requirements() -> list[str]:
    import keras
    import tensorflow as tf

    # Given explicitly so MLflow does not spend a subprocess inferring them.
    return [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]


def log_keras_model(run_id: str, model_file: Path) -> str:
    """Log `model_file` as the MLflow Keras flavour (with signature) of `run_id`; return its URI.

    The file is copied into the flavour as it is: loading it only to have MLflow save it
    again cost the driver 1.3 s per trial (BENCHMARKS.md, "Trial overhead").
    """
    import mlflow
    from mlflow.models import Model

    info = Model.log(
        artifact_path=None,
        name=layout.MLFLOW_MODEL_NAME,
        flavor=mlflow.keras,
        model=_SavedKerasFile(model_file),
        run_id=run_id,
        signature=fer_signature(model_file),
        pip_requirements=pip_requirements(),
    )
    return info.model_uri


class _SavedKerasFile:
    """A saved `.keras` file in the place of a Keras model: `mlflow.keras.save_model` only
    calls `save(path)` on the model it is given (the flavour's `data/model.keras`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def save(self, target: str, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"{self.path}: a copied model file takes no save options: {kwargs}")
        shutil.copyfile(self.path, target)


def fer_signature(model_file: Path | None = None) -> Any:
    """The MLflow signature of every model `model.configs` builds: pixels in, 7 probabilities out.

    With `model_file`, its input is checked against that contract first (read from the
    archive's `config.json`, without loading the model).
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    from model.preprocessing import IMAGE_SHAPE, NUM_CLASSES

    if model_file is not None:
        found = keras_file_inputs(Path(model_file))
        expected = [((None, *IMAGE_SHAPE), "float32")]
        if found != expected:
            raise ValueError(
                f"{model_file}: expected one float32 input of shape {expected[0][0]}, found {found}"
            )
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, *IMAGE_SHAPE))]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, NUM_CLASSES))]),
    )


def keras_file_inputs(model_file: Path) -> list[tuple[tuple[int | None, ...], str]]:
    """(shape, dtype) of each input layer of a saved functional `.keras` model."""
    import zipfile

    with zipfile.ZipFile(model_file) as archive:
        config = json.loads(archive.read("config.json"))
    inputs = []
    for layer in config["config"]["layers"]:
        if layer["class_name"] == "InputLayer":
            layer_config = layer["config"]
            inputs.append((tuple(layer_config["batch_shape"]), str(layer_config["dtype"])))
    return inputs
