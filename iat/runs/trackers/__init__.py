"""The trackers a run logger sends records to, one module each, registered on import
(``iat.runs.trackers.registry``): adding one is a new module, its line below and its tests.

* ``tensorboard_events``: TensorBoard event files in a training run's directory;
* ``json_lines``: ``metrics.jsonl`` in a training run's directory;
* ``mlflow_runs``: an MLflow run per training run and per evaluation (``--mlflow``).
"""

# isort: off
# Each module registers its tracker on import, in this order: the order records reach them.
from iat.runs.trackers import tensorboard_events, json_lines, mlflow_runs  # noqa: F401

# isort: on
from iat.runs.trackers.registry import (
    TRACKERS,
    Destination,
    Tracker,
    check_trackers,
    evaluation_logger,
    register_tracker,
    run_directory_logger,
    tracker_backends,
)

__all__ = [
    "TRACKERS",
    "Destination",
    "Tracker",
    "check_trackers",
    "evaluation_logger",
    "register_tracker",
    "run_directory_logger",
    "tracker_backends",
]
