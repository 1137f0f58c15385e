"""Run logging's trackers (iat.runs.trackers) and the run directory's file names (iat.runs.files):
every command logs to the registered trackers, and one module spells every file name."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from conftest import REPO
from test_attack_registry import run_python
from test_usability import TINY, short_run

from iat.runs import files
from main import main

NEW_TRACKER = '''
"""A new tracker in one module: every record as a JSON line in ./recorded.jsonl."""
import json

from iat.runs.logger import Backend
from iat.runs.trackers import register_tracker


class Recorder(Backend):
    def __init__(self, name):
        self.name = name
        self.file = open("recorded.jsonl", "a")

    def scalars(self, step, scalars, context):
        self._write("scalars", sorted(scalars))

    def result(self, name, record):
        self._write("result", name)

    def _write(self, kind, what):
        self.file.write(json.dumps({"run": self.name, kind: what}) + "\\n")

    def close(self):
        self.file.close()


@register_tracker("recorder")
def recorder(destination):
    return Recorder(destination.name)
'''


def test_a_new_tracker_is_one_module_and_its_registration(tiny_imagenet, tmp_path):
    """Measured: a tracker module from outside the repository, imported once, receives a real
    run's scalars and results and an evaluation's result, with no other file changed."""
    (tmp_path / "recorder.py").write_text(NEW_TRACKER)
    run = tmp_path / "run"
    train = [*short_run(tiny_imagenet, run, "--log-every", "1"), "--threads", "1"]
    evaluate = ["--eval", "--load", str(run / "checkpoint-epoch0001.pt"), "--data",
                str(tiny_imagenet), *TINY, "--image-size", "32", "--workers", "0",
                "--attack-iter", "0", "--threads", "1"]  # fmt: skip
    done = run_python(
        f"""
        import recorder
        from main import main
        assert main({train!r}) == 0
        assert main({evaluate!r}) == 0
        """,
        tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "recorded.jsonl").read_text().splitlines()]
    scalars = [line["scalars"] for line in lines if line["run"] == "run" and "scalars" in line]
    assert scalars and "train/loss" in scalars[0]
    assert {"run": "run", "result": "checkpoint"} in lines
    assert lines[-1] == {"run": "eval checkpoint-epoch0001.pt", "result": "eval"}


def test_watch_logs_each_checkpoint_evaluation_to_mlflow(tiny_imagenet, tmp_path):
    """--eval --watch --mlflow: one MLflow run per checkpoint, as --eval's (read back with
    MLflow's own client from a local file store)."""
    from mlflow.tracking import MlflowClient

    from iat.runs.trackers.mlflow_runs import MLFLOW_EXPERIMENT, mlflow_uri

    run, store = tmp_path / "run", tmp_path / "mlruns"
    assert main(short_run(tiny_imagenet, run, "--epochs", "2")) == 0
    uri = f"file://{store}"
    assert main(["--eval", "--watch", str(run), "--data", str(tiny_imagenet), "--image-size",
                 "32", "--workers", "0", "--attack-iter", "0", "--num-examples", "5",
                 "--watch-timeout", "60", "--mlflow", uri]) == 0  # fmt: skip
    client = MlflowClient(mlflow_uri(uri))
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {f"eval checkpoint-epoch{epoch:04d}.pt" for epoch in (1, 2)}
    for found in runs.values():
        assert found.info.status == "FINISHED"
        assert found.data.metrics["eval/images"] == 5
        assert found.data.params["watch"] == str(run)


def _spelled(path: Path, names: list[str]) -> list[str]:
    """`names` in `path`'s string literals that are not prose (a path has no space) and not a
    docstring."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    return [
        f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if id(node) not in docstrings and " " not in node.value
        if any(name in node.value for name in names)
    ]


def test_the_run_directory_file_names_are_spelled_only_in_iat_runs_files():
    names = [files.CONFIG_FILE, files.METRICS_FILE, files.LAST_LINK, files.BEST_LINK,
             files.BEST_RECORD, files.checkpoint_path("", 0).name[:-len("0000.pt")],
             files.EVENT_FILES.rstrip("*"), files.LAST_SHARDED_LINK,
             files.SHARDED_STATE_FILE]  # fmt: skip
    sources = [*(REPO / "iat").rglob("*.py"), REPO / "main.py", REPO / "adv_model.py"]
    owner = REPO / "iat" / "runs" / "files.py"
    found = [hit for path in sources if path != owner for hit in _spelled(path, names)]
    assert found == []


def test_checkpoint_names_and_their_epochs_round_trip(tmp_path):
    path = files.checkpoint_path(tmp_path, 12)
    assert path == tmp_path / "checkpoint-epoch0012.pt"
    assert files.checkpoint_epoch(path) == 12
    for other in (files.LAST_LINK, files.BEST_LINK, path.name + files.SET_ASIDE_SUFFIX):
        assert files.checkpoint_epoch(tmp_path / other) is None
    assert files.watch_result_path(tmp_path, path, "pgd-0a") == (
        tmp_path / files.RESULTS_FOLDER / "checkpoint-epoch0012.pgd-0a.json"
    )
