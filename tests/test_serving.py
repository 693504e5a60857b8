"""The champion answers over HTTP as `make serve` runs it: raw pixels in, 7 probabilities out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port, wait_for_http

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
@pytest.mark.parametrize("champion", ["single", "ensemble"])
def test_mlflow_models_serve_answers_a_request_of_raw_pixels(champion: str, tmp_path: Path) -> None:
    import keras
    import mlflow
    from mlflow.tracking import MlflowClient

    from jobs.search.register import register_champion
    from jobs.tracking.models import log_keras_model
    from model.configs import CNNConfig, build_model
    from model.ensemble import build_ensemble

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)  # the module global wins over the variable: an earlier test's
    try:
        client = MlflowClient(uri)
        experiment = client.create_experiment("serve", (tmp_path / "artifacts").as_uri())
        run_id = client.create_run(experiment).info.run_id
        model = build_model(CNNConfig(filters=(4,), dense_units=(8,)))
        if champion == "ensemble":
            # Two members, one with flip averaging: the search's ensemble as one Keras model.
            other = build_model(CNNConfig(filters=(2,), dense_units=(8,)))
            model = build_ensemble([model, other], (0.6, 0.4), flip=True)
        model.save(tmp_path / "best.keras")
        register_champion(client, log_keras_model(run_id, tmp_path / "best.keras"), run_id)
        images = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 1)).astype("float32")
        expected = model.predict(images, verbose=0)
        keras.backend.clear_session()
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        mlflow.set_tracking_uri(None)

    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    # What `make serve` runs.
    command = [
        f"{bin_dir}/mlflow",
        "models",
        "serve",
        "-m",
        "models:/fer2013-expression@champion",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, log, 240)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    probabilities = np.asarray(answer["predictions"], dtype=np.float32)
    assert probabilities.shape == (2, 7)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert np.allclose(probabilities, expected, atol=1e-5)
