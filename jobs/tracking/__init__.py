"""Everything the search writes to MLflow, from the Tune driver (the only writer).

- `queue`: ordered writes that survive a tracking-server outage.
- `models`: the Keras flavour with its signature; the data as MLflow datasets.
- `trials`: the Tune callback writing one child run per trial.
- `refusals`: refused proposals as child runs (the searcher's `on_refusal`).
- `reconcile`: what Tune leaves to close after a phase (budget stops, restored searches).
- `parent`: the search's parent run (open, resume, settings, children).
"""

from jobs.tracking.models import dataset_inputs, fer_signature, keras_file_inputs, log_keras_model
from jobs.tracking.queue import (
    TrackingQueue,
    TrackingUnavailable,
    drain_seconds,
    quick_failing_client_env,
)
from jobs.tracking.trials import EPOCH_METRICS, TAG_STOP_REASON, MLflowTrialLogger

__all__ = [
    "EPOCH_METRICS",
    "TAG_STOP_REASON",
    "MLflowTrialLogger",
    "TrackingQueue",
    "TrackingUnavailable",
    "dataset_inputs",
    "drain_seconds",
    "fer_signature",
    "keras_file_inputs",
    "log_keras_model",
    "quick_failing_client_env",
]
