"""The tracker registry: every sink a run logger sends records to, besides its own files.

A tracker is one module that registers a builder with ``register_tracker``: told where the
logger logs (a ``Destination``: a training run's directory, or an evaluation), the builder
returns its ``Backend``, or None when it does not log there (not asked for by the settings, or
a run-directory tracker for an evaluation). Training (``run_directory_logger``), ``--eval`` and
``--eval --watch`` (``evaluation_logger``) get their backends here, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from iat.runs.logger import Backend, ConfigFileBackend, ResultFileBackend, RunLogger


@dataclass(frozen=True)
class Destination:
    """What a run logger logs: a training run or one evaluation."""

    name: str  # how trackers name it: the run directory's name, or "eval CHECKPOINT"
    settings: Mapping[str, object]  # the resolved configuration's fields (--mlflow among them)
    logdir: Path | None = None  # a training run's directory; None for an evaluation
    # A resumed run: the steps a killed run logged from here on are logged again, so trackers
    # drop (or hide) theirs.
    purge_step: int | None = None


Builder = Callable[[Destination], Backend | None]
Check = Callable[[Mapping[str, object]], None]


@dataclass(frozen=True)
class Tracker:
    """One registered tracker."""

    name: str
    build: Builder  # its backend for a destination; None where it does not log
    # Raises ValueError when the settings ask for it and it cannot log (run before anything is
    # created); None: it always can.
    check: Check | None = None


TRACKERS: dict[str, Tracker] = {}


def register_tracker(name: str, check: Check | None = None) -> Callable[[Builder], Builder]:
    """Decorator adding a backend builder to ``TRACKERS`` under ``name``, with its ``check``."""

    def add(build: Builder) -> Builder:
        if name in TRACKERS:
            raise ValueError(f"tracker {name!r} is registered twice")
        TRACKERS[name] = Tracker(name, build, check)
        return build

    return add


def check_trackers(settings: Mapping[str, object]) -> None:
    """Every tracker the settings ask for can log (ValueError naming the first that cannot)."""
    for tracker in TRACKERS.values():
        if tracker.check is not None:
            tracker.check(settings)


def tracker_backends(destination: Destination) -> list[Backend]:
    """The backends of every registered tracker that logs to `destination`, in registry order."""
    built = (tracker.build(destination) for tracker in TRACKERS.values())
    return [backend for backend in built if backend is not None]


def run_directory_logger(
    logdir: str | Path,
    settings: Mapping[str, object],
    enabled: bool = True,
    purge_step: int | None = None,
) -> RunLogger:
    """A training run's logger: ``config.json`` in `logdir` and every tracker that logs there;
    nothing if not enabled (the processes other than the main one)."""
    if not enabled:
        return RunLogger()
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    destination = Destination(logdir.name, settings, logdir, purge_step)
    return RunLogger([*tracker_backends(destination), ConfigFileBackend(logdir)])


def evaluation_logger(
    name: str,
    settings: Mapping[str, object],
    result_file: str | Path | None = None,
    enabled: bool = True,
) -> RunLogger:
    """An evaluation's logger: its results file when given, then every tracker that logs
    evaluations; nothing if not enabled."""
    if not enabled:
        return RunLogger()
    backends: Sequence[Backend] = [] if result_file is None else [ResultFileBackend(result_file)]
    return RunLogger([*backends, *tracker_backends(Destination(name, settings))])
