"""Run logging: one sink for scalars, evaluation results and the resolved configuration.

``RunLogger`` fans every record out to its backends. A tracker is one more ``Backend``
subclass; nothing else in the project changes. Backends here: TensorBoard event files and
``metrics.jsonl`` (scalars; results too, as JSON lines), ``config.json`` (the resolved
configuration and the run's facts, replayable with ``main.py --config``), and a results file
(``--eval-output``). Only the main process logs; the others get a logger without backends.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from iat.runtime.atomic_io import NoSpaceError, atomic_write_text, is_no_space

CONFIG_FILE = "config.json"
MLFLOW_EXPERIMENT = "imagenet-adversarial-training"
MLFLOW_CHECK_SECONDS = 5.0  # how long a tracking server may take to answer before a run starts
_MLFLOW_FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"
METRICS_FILE = "metrics.jsonl"
_NO_TENSORFLOW = "tensorboard.compat.notf"
_EVENT_FILES = "events.out.tfevents.*"  # TensorBoard's event file names


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
        self._earlier = set(self._logdir.glob(_EVENT_FILES))
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
            for path in set(self._logdir.glob(_EVENT_FILES)) - self._earlier:
                path.unlink(missing_ok=True)


class JsonLinesBackend(Backend):
    """``metrics.jsonl``: one line per record, appended and flushed line by line."""

    def __init__(self, logdir: str | Path) -> None:
        self._file = open(Path(logdir) / METRICS_FILE, "a", buffering=1)  # noqa: SIM115

    def scalars(self, step: int, scalars: dict[str, float], context: dict) -> None:
        self._write({"time": time.time(), "step": step, **context, **scalars})

    def result(self, name: str, record: dict) -> None:
        self._write({"time": time.time(), "phase": name, **record})

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
    """A JSON file of the evaluation records (``--eval-output``), rewritten atomically after
    each: the record itself, or ``{"records": [...]}`` once there are several (a sweep)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: list[dict] = []

    def result(self, name: str, record: dict) -> None:
        self.records.append(record)
        content = record if len(self.records) == 1 else {"records": self.records}
        text = json.dumps(content, indent=2) + "\n"
        try:
            atomic_write_text(self.path, text)
        except OSError as error:  # checked writable at start; the result is never lost
            print(text, end="", flush=True)
            reason = str(error) if isinstance(error, NoSpaceError) else error.strerror
            raise ValueError(
                f"--eval-output: cannot write {self.path} ({reason}); the result is printed above"
            ) from None


class MlflowBackend(Backend):
    """One MLflow run (what NIST's Dioptra tracks with): parameters from the configuration, the
    run's facts as tags, every scalar as a metric at its step, each evaluation's numbers as
    metrics, and the newest checkpoint's path as the tag ``checkpoint``.

    `uri` is a tracking URI or a local folder (``./mlruns``). MLflow 3 keeps its folder store in
    maintenance mode behind an opt-in, which a local folder given here opts into; give a
    ``sqlite:///...`` or ``http://...`` URI (and the full ``mlflow`` package) for a database or
    server. Needs the optional extra: ``pip install -e '.[mlflow]'``."""

    def __init__(self, uri: str, run_name: str, experiment: str = MLFLOW_EXPERIMENT) -> None:
        self.uri = check_mlflow(uri)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(self.uri)
        try:
            found = self._client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id if found else self._client.create_experiment(experiment)
            )
            self.run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
        except MlflowException as e:
            raise ValueError(f"--mlflow: {self.uri}: {str(e).splitlines()[0]}") from None

    def config(self, record: dict) -> None:
        from mlflow.entities import Param, RunTag

        params = [Param(k, _text(v)) for k, v in sorted(record.get("config", {}).items())]
        tags = [RunTag(f"run.{k}", _text(v)) for k, v in sorted(record.get("run", {}).items())]
        self._client.log_batch(self.run_id, params=params, tags=tags)

    def scalars(self, step: int, scalars: dict[str, float], context: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, float(v), now, step) for name, v in scalars.items()]
        self._client.log_batch(self.run_id, metrics=metrics)

    def result(self, name: str, record: dict) -> None:
        numbers = {k: v for k, v in record.items() if isinstance(v, int | float)}
        if "path" in record:  # a checkpoint
            self._client.set_tag(self.run_id, "checkpoint", str(record["path"]))
        self.scalars(int(record.get("step", 0)), {f"{name}/{k}": v for k, v in numbers.items()}, {})

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


def check_mlflow(uri: str, seconds: float = MLFLOW_CHECK_SECONDS) -> str:
    """The tracking URI of --mlflow `uri`, once it is known that a run can be logged there: MLflow
    is installed and, for an http(s) URI, a server answers within `seconds` (MLflow's own client
    retries for minutes). Called before anything is created; a ValueError otherwise."""
    try:
        import mlflow.tracking  # noqa: F401
    except ImportError:
        raise ValueError("--mlflow: MLflow is not installed (pip install -e '.[mlflow]')") from None
    uri = mlflow_uri(uri)
    if uri.startswith(("http://", "https://")):
        query = urllib.parse.urlencode({"experiment_name": MLFLOW_EXPERIMENT})
        probe = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"
        try:
            urllib.request.urlopen(probe, timeout=seconds).close()
        except urllib.error.HTTPError:
            pass  # a server answered (404: no such experiment yet)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"--mlflow: no MLflow tracking server answers at {uri} within {seconds:g} s "
                f"({getattr(e, 'reason', e)})"
            ) from None
    return uri


def mlflow_uri(uri: str) -> str:
    """A tracking URI; a local folder becomes a ``file://`` URI (with MLflow 3's opt-in)."""
    if "://" in uri or uri.startswith("file:"):
        return uri
    os.environ.setdefault(_MLFLOW_FILE_STORE_OPT_IN, "true")
    return Path(uri).resolve().as_uri()


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


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


def run_directory_logger(
    logdir: str | Path,
    enabled: bool = True,
    purge_step: int | None = None,
    mlflow: str | None = None,
) -> RunLogger:
    """TensorBoard, ``metrics.jsonl`` and ``config.json`` in `logdir`, plus an MLflow run when
    `mlflow` (a URI or folder) is given; nothing if not enabled. TensorBoard events at or after
    `purge_step` (a killed run's) are purged."""
    if not enabled:
        return RunLogger()
    Path(logdir).mkdir(parents=True, exist_ok=True)
    backends: list[Backend] = [
        TensorBoardBackend(logdir, purge_step),
        JsonLinesBackend(logdir),
        ConfigFileBackend(logdir),
    ]
    if mlflow is not None:
        backends.append(MlflowBackend(mlflow, run_name=Path(logdir).name))
    return RunLogger(backends)
