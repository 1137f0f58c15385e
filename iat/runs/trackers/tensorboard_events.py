"""TensorBoard event files in a training run's directory (``tensorboard --logdir train_log``)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

from iat.runs.files import EVENT_FILES
from iat.runs.logger import Backend
from iat.runs.trackers.registry import Destination, register_tracker

_NO_TENSORFLOW = "tensorboard.compat.notf"


def _tensorboard_without_tensorflow() -> None:
    """TensorBoard's event writer needs no TensorFlow but imports it when it is installed (the
    ``convert`` extra): seconds and a page of log lines in every process. A module named
    ``tensorboard.compat.notf`` is TensorBoard's own switch (its ``no_tensorflow`` build
    target) to use its bundled stub instead."""
    sys.modules.setdefault(_NO_TENSORFLOW, types.ModuleType(_NO_TENSORFLOW))


class TensorBoardBackend(Backend):
    """Event files; ``purge_step`` hides the events a killed run wrote at or after that step
    (TensorBoard's own mechanism), so that a resumed run's steps are not shown twice."""

    def __init__(self, logdir: str | Path, purge_step: int | None = None) -> None:
        _tensorboard_without_tensorflow()
        from torch.utils.tensorboard import SummaryWriter

        self._logdir = Path(logdir)
        self._earlier = set(self._logdir.glob(EVENT_FILES))
        self._checkpointed = False
        self._writer = SummaryWriter(log_dir=str(logdir), purge_step=purge_step)

    def scalars(self, step: int, scalars: dict[str, float], context: dict) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)

    def flush(self) -> None:
        # The writer buffers events (with TensorFlow installed, until its own periodic flush).
        self._writer.flush()

    def result(self, name: str, record: dict) -> None:
        self._checkpointed |= name == "checkpoint"

    def close(self) -> None:
        self._writer.close()

    def abandon(self) -> None:
        if not self._checkpointed:
            for path in set(self._logdir.glob(EVENT_FILES)) - self._earlier:
                path.unlink(missing_ok=True)


@register_tracker("tensorboard")
def tensorboard_events(destination: Destination) -> Backend | None:
    """A training run's event files; evaluations have none."""
    if destination.logdir is None:
        return None
    return TensorBoardBackend(destination.logdir, destination.purge_step)
