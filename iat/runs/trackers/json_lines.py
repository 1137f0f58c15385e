"""``metrics.jsonl`` in a training run's directory: one JSON line per logged step and per result
(what ``--report`` reads)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from iat.runs.files import METRICS_FILE
from iat.runs.logger import Backend
from iat.runs.trackers.registry import Destination, register_tracker
from iat.runtime.atomic_io import (
    atomic_write_text,
    is_no_space,
    open_no_follow,
    read_regular,
    space_error,
)

# What a killed run's metrics.jsonl is read back up to (a line per logged step, ~300 bytes).
MAX_METRICS_BYTES = 1 << 30


class JsonLinesBackend(Backend):
    """``metrics.jsonl``: one line per record, appended and flushed line by line (never
    through a symbolic link out of the run directory)."""

    def __init__(self, logdir: str | Path) -> None:
        self.path = Path(logdir) / METRICS_FILE
        self._file = open_no_follow(self.path, "a", buffering=1, encoding="utf-8")

    def scalars(self, step: int, scalars: dict[str, float], context: dict) -> None:
        self._write({"time": time.time(), "step": step, **context, **scalars})

    def result(self, name: str, record: dict) -> None:
        self._write({"time": time.time(), "phase": name, **record})

    def _write(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as error:
            if is_no_space(error):
                raise space_error(self.path, error) from None
            raise

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as error:
            if is_no_space(error):
                raise space_error(self.path, error) from None
            raise


def forget_records_after(logdir: str | Path, step: int) -> None:
    """Rewrite ``metrics.jsonl`` (atomically) without the records of steps after `step`: those a
    killed run logged after its last checkpoint, which the resumed run logs again. A line torn
    by the kill is dropped too; records without a step (results) are kept."""
    path = Path(logdir) / METRICS_FILE
    if not path.exists() and not path.is_symlink():
        return
    lines = read_regular(path, MAX_METRICS_BYTES).decode().splitlines(keepends=True)
    kept = [line for line in lines if _step_at_most(line, step)]
    if kept != lines:
        atomic_write_text(path, "".join(kept))


def _step_at_most(line: str, step: int) -> bool:
    if not line.endswith("\n"):
        return False  # the last line, cut short by a kill
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return not isinstance(record, dict) or record.get("step", step) <= step


@register_tracker("json-lines")
def json_lines(destination: Destination) -> Backend | None:
    """A training run's ``metrics.jsonl``, less a killed run's steps from ``purge_step`` on;
    evaluations write none."""
    if destination.logdir is None:
        return None
    if destination.purge_step is not None:
        forget_records_after(destination.logdir, destination.purge_step - 1)
    return JsonLinesBackend(destination.logdir)
