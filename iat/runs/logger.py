"""Run logging: one sink for scalars, evaluation results and the resolved configuration.

``RunLogger`` fans every record out to its backends: the run directory's ``config.json``
(the resolved configuration and the run's facts, replayable with ``main.py --config``), a
results file (``--eval-output``), and the registered trackers (``iat.runs.trackers``:
TensorBoard, ``metrics.jsonl``, MLflow), which ``iat.runs.trackers.registry`` puts behind it.
Only the main process logs; the others get a logger without backends.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from iat.runs.files import CONFIG_FILE
from iat.runtime.atomic_io import NoSpaceError, atomic_write_text, is_no_space


class Backend:
    """A destination for run records; each method may be left as a no-op."""

    def scalars(self, step: int, scalars: dict[str, float], context: dict) -> None:
        """Numbers at global `step`; `context` (epoch, phase, ...) describes them."""

    def result(self, name: str, record: dict) -> None:
        """A finished evaluation (a JSON-able record)."""

    def config(self, record: dict) -> None:
        """The resolved configuration and the run's facts, once at start."""

    def flush(self) -> None:
        """Put what was logged so far on disk (before a checkpoint: a run killed after it
        resumes from that checkpoint and must find every step up to it)."""

    def close(self) -> None:
        """Flush and release."""

    def abandon(self) -> None:
        """After ``close``: the disk filled up before this launch saved a checkpoint, so what
        it logged here is logged again by the relaunch; drop files that only this launch made
        (each failing relaunch would add one more)."""


class ConfigFileBackend(Backend):
    """``config.json`` in the run directory, written atomically."""

    def __init__(self, logdir: str | Path) -> None:
        self.path = Path(logdir) / CONFIG_FILE

    def config(self, record: dict) -> None:
        atomic_write_text(self.path, json.dumps(record, indent=2, sort_keys=True) + "\n")


class ResultFileBackend(Backend):
    """A JSON file of the evaluation records (``--eval-output``), rewritten atomically after
    each: the record itself, or ``{"records": [...]}`` once there are several (a sweep). A
    ``masking_checks`` record completes the record before it (its checks run after it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: list[dict] = []

    def result(self, name: str, record: dict) -> None:
        if name == "masking_checks" and self.records:  # the checks of the record just written
            self.records[-1] = {**self.records[-1], **record}
        else:
            self.records.append(record)
        content = self.records[0] if len(self.records) == 1 else {"records": self.records}
        text = json.dumps(content, indent=2) + "\n"
        try:
            atomic_write_text(self.path, text)
        except OSError as error:  # checked writable at start; the result is never lost
            print(text, end="", flush=True)
            reason = str(error) if isinstance(error, NoSpaceError) else error.strerror
            raise ValueError(
                f"--eval-output: cannot write {self.path} ({reason}); the result is printed above"
            ) from None


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

    def flush(self) -> None:
        for backend in self.backends:
            backend.flush()

    def close(self) -> None:
        backends, self.backends = self.backends, []
        for backend in backends:
            backend.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        backends = self.backends
        self.close()
        if is_no_space(exc):
            for backend in backends:
                backend.abandon()
