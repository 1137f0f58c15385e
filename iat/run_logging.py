"""Run logging: one sink for scalars, evaluation results and the resolved configuration.

``RunLogger`` fans every record out to its backends. A tracker is one more ``Backend``
subclass; nothing else in the project changes. Backends here: TensorBoard event files and
``metrics.jsonl`` (scalars; results too, as JSON lines), ``config.json`` (the resolved
configuration and the run's facts, replayable with ``main.py --config``), and a results file
(``--eval-output``). Only the main process logs; the others get a logger without backends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from iat.atomic_io import atomic_write_text

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


class Backend:
    """A destination for run records; each method may be left as a no-op."""

    def scalars(self, step: int, scalars: dict[str, float], context: dict) -> None:
        """Numbers at global `step`; `context` (epoch, phase, ...) describes them."""

    def result(self, name: str, record: dict) -> None:
        """A finished evaluation (a JSON-able record)."""

    def config(self, record: dict) -> None:
        """The resolved configuration and the run's facts, once at start."""

    def close(self) -> None:
        """Flush and release."""


class TensorBoardBackend(Backend):
    """Event files; ``purge_step`` hides the events a killed run wrote at or after that step
    (TensorBoard's own mechanism), so that a resumed run's steps are not shown twice."""

    def __init__(self, logdir: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(logdir), purge_step=purge_step)

    def scalars(self, step: int, scalars: dict[str, float], context: dict) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        self._writer.close()


class JsonLinesBackend(Backend):
    """``metrics.jsonl``: one line per record, appended and flushed line by line."""

    def __init__(self, logdir: str | Path) -> None:
        self._file = open(Path(logdir) / METRICS_FILE, "a", buffering=1)  # noqa: SIM115

    def scalars(self, step: int, scalars: dict[str, float], context: dict) -> None:
        self._write({"time": time.time(), "step": step, **context, **scalars})

    def result(self, name: str, record: dict) -> None:
        self._write({"time": time.time(), "result": name, **record})

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def forget_records_after(logdir: str | Path, step: int) -> None:
    """Rewrite ``metrics.jsonl`` (atomically) without the records of steps after `step`: those a
    killed run logged after its last checkpoint, which the resumed run logs again. A line torn
    by the kill is dropped too; records without a step (results) are kept."""
    path = Path(logdir) / METRICS_FILE
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
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


class ConfigFileBackend(Backend):
    """``config.json`` in the run directory, written atomically."""

    def __init__(self, logdir: str | Path) -> None:
        self.path = Path(logdir) / CONFIG_FILE

    def config(self, record: dict) -> None:
        atomic_write_text(self.path, json.dumps(record, indent=2, sort_keys=True) + "\n")


class ResultFileBackend(Backend):
    """A JSON file holding the latest evaluation record (``--eval-output``), written atomically."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def result(self, name: str, record: dict) -> None:
        atomic_write_text(self.path, json.dumps(record, indent=2) + "\n")


class RunLogger:
    """Sends each record to every backend; ``with`` closes them."""

    def __init__(self, backends: Sequence[Backend] = ()) -> None:
        self.backends = list(backends)

    def log(self, step: int, scalars: dict[str, float], **context: object) -> None:
        for backend in self.backends:
            backend.scalars(step, scalars, context)

    def log_result(self, name: str, record: dict) -> None:
        for backend in self.backends:
            backend.result(name, record)

    def log_config(self, record: dict) -> None:
        for backend in self.backends:
            backend.config(record)

    def close(self) -> None:
        backends, self.backends = self.backends, []
        for backend in backends:
            backend.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_directory_logger(
    logdir: str | Path, enabled: bool = True, purge_step: int | None = None
) -> RunLogger:
    """TensorBoard, ``metrics.jsonl`` and ``config.json`` in `logdir` (nothing if not enabled);
    TensorBoard events at or after `purge_step` (a killed run's) are purged."""
    if not enabled:
        return RunLogger()
    Path(logdir).mkdir(parents=True, exist_ok=True)
    return RunLogger(
        [
            TensorBoardBackend(logdir, purge_step),
            JsonLinesBackend(logdir),
            ConfigFileBackend(logdir),
        ]
    )
