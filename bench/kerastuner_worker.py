"""KerasTuner Hyperband over our search space (run by bench_kerastuner in a subprocess).

Appends every epoch's `{"time": epoch seconds, "val_accuracy": ...}` to `--history` (one JSON
object a line, flushed at once: the benchmark stops this process at its budget).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--max-epochs", type=int, default=9)
    parser.add_argument("--directory", required=True)
    parser.add_argument("--history", required=True)
    args = parser.parse_args()

    import keras
    import keras_tuner as kt

    from jobs.space import AUGMENTATIONS, SPACE
    from model.cnn import CNNConfig
    from model.configs import build_model
    from model.data import load_fer2013
    from model.dnn import DNNConfig
    from model.preprocessing import pixel_statistics

    dataset = load_fer2013(args.data).subset(args.fraction, 2017)
    x_train, y_train = dataset.split("Training")
    x_val, y_val = dataset.split("PublicTest")
    stats = pixel_statistics(x_train)
    x_train, x_val = x_train.astype("float32"), x_val.astype("float32")
    history = Path(args.history)

    def build(hp: Any) -> keras.Model:
        family = hp.Choice("family", ["cnn", "dnn"])
        cnn, dnn, training = SPACE["cnn"], SPACE["dnn"], SPACE["training"]
        if family == "cnn":
            blocks = hp.Choice("blocks", cnn["blocks"])
            base = hp.Choice("base_filters", cnn["base_filters"])
            config: Any = CNNConfig(
                filters=tuple(min(base * 2**i, 512) for i in range(blocks)),
                convs_per_block=hp.Choice("convs_per_block", cnn["convs_per_block"]),
                kernel_size=hp.Choice("kernel_size", cnn["kernel_size"]),
                pooling=hp.Choice("pooling", cnn["pooling"]),
                batch_norm=hp.Boolean("batch_norm"),
                dropout=hp.Float("dropout", *cnn["dropout"]),
                dense_units=tuple(
                    json.loads(
                        hp.Choice("dense_units", [json.dumps(u) for u in cnn["dense_units"]])
                    )
                ),
                normalization=hp.Choice("normalization", cnn["normalization"]),
                augmentation=AUGMENTATIONS[hp.Choice("augmentation", cnn["augmentation"])],
            )
        else:
            depth = hp.Choice("depth", dnn["depth"])
            width = hp.Choice("width", dnn["width"])
            config = DNNConfig(
                hidden_units=tuple(max(64, width // 2**i) for i in range(depth)),
                dropout=hp.Float("dnn_dropout", *dnn["dropout"]),
                batch_norm=hp.Boolean("dnn_batch_norm"),
                normalization="standardize",
            )
        model = build_model(config, stats=stats)
        rate = hp.Float("learning_rate", *training["learning_rate"], sampling="log")
        optimizer = hp.Choice("optimizer", training["optimizer"])
        optimizers = {
            "adam": keras.optimizers.Adam(rate),
            "adamw": keras.optimizers.AdamW(rate, weight_decay=1e-4),
            "sgd": keras.optimizers.SGD(rate, momentum=0.9, nesterov=True),
        }
        model.compile(
            optimizer=optimizers[optimizer],
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        return model

    class Watch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            value = float((logs or {}).get("val_accuracy", 0.0))
            with history.open("a") as out:
                out.write(json.dumps({"time": time.time(), "val_accuracy": value}) + "\n")

    class SizedHyperband(kt.Hyperband):
        def run_trial(self, trial: Any, *fit_args: Any, **fit_kwargs: Any) -> Any:
            fit_kwargs["batch_size"] = trial.hyperparameters.Choice(
                "batch_size", SPACE["training"]["batch_size"]
            )
            return super().run_trial(trial, *fit_args, **fit_kwargs)

    tuner = SizedHyperband(
        build,
        objective="val_accuracy",
        max_epochs=args.max_epochs,
        factor=3,
        seed=2017,
        directory=args.directory,
        project_name="fer",
        overwrite=True,
    )
    tuner.search(x_train, y_train, validation_data=(x_val, y_val), callbacks=[Watch()], verbose=0)


if __name__ == "__main__":
    main()
