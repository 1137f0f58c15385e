"""MLflow (``--mlflow [URI]``): one MLflow run per training run and per evaluation."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from iat.runs.logger import Backend
from iat.runs.trackers.registry import Destination, register_tracker

MLFLOW_EXPERIMENT = "imagenet-adversarial-training"
MLFLOW_CHECK_SECONDS = 5.0  # how long a tracking server may take to answer before a run starts
_MLFLOW_FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"
SETTING = "mlflow"  # the configuration field (--mlflow): a tracking URI or folder; None: off


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
    """A tracking URI; a local folder becomes a ``file://`` URI. A folder store, named either
    way, gets MLflow 3's opt-in."""
    allow_folder_store(uri)
    if "://" in uri or uri.startswith("file:"):
        return uri
    return Path(uri).resolve().as_uri()


def allow_folder_store(uri: str) -> None:
    """MLflow 3's opt-in to its folder store (in this process and those it starts) when `uri`
    names one (``file:`` or a plain folder), unless the environment already says otherwise."""
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault(_MLFLOW_FILE_STORE_OPT_IN, "true")


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _uri(settings: Mapping[str, object]) -> str | None:
    uri = settings.get(SETTING)
    return None if uri is None else str(uri)


def _check(settings: Mapping[str, object]) -> None:
    uri = _uri(settings)
    if uri is not None:
        check_mlflow(uri)


@register_tracker("mlflow", check=_check)
def mlflow_run(destination: Destination) -> Backend | None:
    """An MLflow run named after the destination, when the settings give --mlflow."""
    uri = _uri(destination.settings)
    return None if uri is None else MlflowBackend(uri, run_name=destination.name)
