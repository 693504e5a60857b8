"""Faults the reliability tests inject into trial processes; none of this is in the product.

`faulty_ray(faults)` starts the test's local Ray with `install` as the workers' setup hook (Ray's
`worker_process_setup_hook`) and the faults in the workers' environment. In each trial process,
`install` wraps two names `jobs.trial.train_trial` looks up when it runs: `plan_of` (to learn
which plan this process trains) and `EpochLoop` (to fail inside the real epoch loop). So the
trial that runs is the one users run, and the fault is real: the backend's out-of-memory error
(TensorFlow's `ResourceExhaustedError`, JAX's RESOURCE_EXHAUSTED) out of an epoch, or the
process exiting with 137 right after an epoch's checkpoint was reported.

Faults map plan names to a spec:
- `{"oom_at_epoch": k, "above_micro_batch": m}`: epoch k raises an OOM while the micro-batch is
  above m (once halved to m or below, it trains).
- `{"kill_at_epoch": k, "kill_marker": path}`: after epoch k is checkpointed, write this
  process's pid to `path` and exit 137; only while `path` does not exist (so only once).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FAULTS_ENV = "FER_TEST_FAULTS"
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@contextmanager
def faulty_ray(faults: dict[str, dict[str, Any]], num_cpus: int = 2) -> Iterator[None]:
    """A Ray of this test only whose trial processes run with `faults`; shut down after."""
    import ray

    from jobs.search import TRIAL_ENV

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={
            "env_vars": {
                **TRIAL_ENV,
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
                FAULTS_ENV: json.dumps(faults),
            },
            "worker_process_setup_hook": "fault_hooks.install",
        },
    )
    try:
        yield
    finally:
        ray.shutdown()


def install() -> None:
    """Ray worker setup hook: wrap the trial's epoch loop with the faults of FER_TEST_FAULTS."""
    faults = json.loads(os.environ.get(FAULTS_ENV) or "{}")
    if not faults:
        return
    import jobs.trial as trial

    current: dict[str, Any] = {}
    real_plan_of = trial.plan_of

    def plan_of(config: dict[str, Any]) -> dict[str, Any]:
        current.clear()
        current.update(faults.get(config["plan"], {}))
        return real_plan_of(config)

    trial.plan_of = plan_of
    trial.EpochLoop = faulty_epoch_loop(current)


def out_of_memory_error(message: str) -> Exception:
    """The error the Keras backend raises when the device is out of memory: TensorFlow's
    ResourceExhaustedError, or JAX's runtime error with status RESOURCE_EXHAUSTED."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return jax.errors.JaxRuntimeError(f"RESOURCE_EXHAUSTED: Out of memory; {message}")
    import tensorflow as tf

    return tf.errors.ResourceExhaustedError(None, None, message)


def faulty_epoch_loop(spec: dict[str, Any]) -> type:
    """`jobs.training.EpochLoop` failing as `spec` says (read when each epoch runs)."""
    from jobs.training import EpochLoop

    class FaultyEpochLoop(EpochLoop):
        def _one_epoch(self, epoch: int) -> Any:
            micro = self.state.micro_batch_size
            if epoch != int(spec.get("oom_at_epoch", -1)) or micro <= int(
                spec.get("above_micro_batch", 0)
            ):
                return super()._one_epoch(epoch)
            import keras

            class RaiseAfterOneBatch(keras.callbacks.Callback):
                # Mid-epoch, as a real OOM: one batch has already changed the weights.
                def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                    if batch >= 1:
                        raise out_of_memory_error(
                            f"injected OOM at epoch {epoch}, micro-batch {micro}"
                        )

            model = self.model
            fit = model.fit
            model.fit = lambda *a, callbacks=(), **k: fit(
                *a, callbacks=[*callbacks, RaiseAfterOneBatch()], **k
            )
            try:
                return super()._one_epoch(epoch)
            finally:
                del model.fit

        def run(self, on_epoch_end: Any) -> Any:
            def then_die(metrics: dict[str, Any], directory: Path) -> None:
                on_epoch_end(metrics, directory)  # the epoch's checkpoint is reported first
                marker = spec.get("kill_marker")
                if (
                    metrics["epoch"] == int(spec.get("kill_at_epoch", -1))
                    and marker
                    and not Path(marker).exists()
                ):
                    Path(marker).write_text(str(os.getpid()))
                    os._exit(137)

            return super().run(then_die)

    return FaultyEpochLoop
