"""The baseline a user would write instead: load, build, `model.fit` for N epochs, nothing else.

Prints one JSON line: total seconds and seconds without the data load (what is compared).
With `--start-after FILE` the clock starts once FILE exists (the paired benchmark starts both
sides together).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

STARTED = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", required=True, help="model config JSON")
    parser.add_argument(
        "--pipeline",
        choices=("arrays", "batches"),
        default="arrays",
        help="arrays: fit(x, y) as users write it; batches: model/batches.py, as our trials do",
    )
    parser.add_argument("--start-after", type=Path, help="wait for this file, then start")
    args = parser.parse_args()
    started = STARTED
    if args.start_after is not None:
        while not args.start_after.exists():
            time.sleep(0.05)
        started = time.perf_counter()

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(min(2, args.threads))
    import keras

    from model.configs import build_model, config_from_dict
    from model.data import load_fer2013
    from model.preprocessing import pixel_statistics

    load_started = time.perf_counter()
    dataset = load_fer2013(args.data)
    if args.fraction < 1:
        dataset = dataset.subset(args.fraction, 2017)
    x_train, y_train = dataset.split("Training")
    x_val, y_val = dataset.split("PublicTest")
    stats = pixel_statistics(x_train)
    x_train, x_val = x_train.astype("float32"), x_val.astype("float32")
    load_seconds = time.perf_counter() - load_started

    keras.utils.set_random_seed(2017)
    model = build_model(config_from_dict(json.loads(args.model)), stats=stats)
    model.compile(
        optimizer=keras.optimizers.Adam(0.001),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    if args.pipeline == "arrays":
        model.fit(
            x_train,
            y_train,
            batch_size=64,
            epochs=args.epochs,
            validation_data=(x_val, y_val),
            verbose=0,
        )
    else:  # the input pipeline our trials use, without the rest of our machinery
        from model.batches import array_batches

        model.fit(
            array_batches(x_train, y_train, 64, shuffle_seed=2017),
            epochs=args.epochs,
            validation_data=array_batches(x_val, y_val, 64),
            shuffle=False,
            verbose=0,
        )
    total = time.perf_counter() - started
    print(json.dumps({"seconds": total, "seconds_without_data_load": total - load_seconds}))


if __name__ == "__main__":
    main()
