"""The MLproject's Dioptra entry points against a local folder store on the demo's digits (16
px). The chain train -> fgm -> infer runs as ``mlflow run . -e ENTRY --env-manager local``
subprocesses, passing the model and FGM's adversarial set (a tarball artifact) by run id; the
notebook (examples/dioptra_workflow.ipynb, executed by a kernel) runs fgm -> jpeg_compression ->
infer through ``mlflow.projects.run``; the other dataset defenses and AutoAttack run in this
process, each as the command MLflow computes from the MLproject for it. Every logged number is
recomputed here from the downloaded model and images."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import nets
from iat.app.demo import write_digits_folder
from iat.data.augment import eval_transform
from iat.data.layouts import list_split

mlflow = pytest.importorskip("mlflow")
from mlflow.projects import _project_spec  # noqa: E402  (what `mlflow run` computes commands with)
from mlflow.tracking import MlflowClient  # noqa: E402

from iat.app import mlproject  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE, EPS, WIDTH = 16, 32.0, 16
TINY = "--workers 0 --steps-per-epoch 8"  # iat_args: 2 epochs of 8 batches of 32


def mlflow_run(env: dict, entry: str, **params: object) -> str:
    """``mlflow run`` of entry point `entry` of this repository: the run's id."""
    flags = [f"{key}={value}" for key, value in params.items()]
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry,
               "--env-manager", "local", *[x for f in flags for x in ("-P", f)]]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"Run \(ID '([0-9a-f]+)'\) succeeded", done.stderr).group(1)


def entry_command(entry: str, **params: object) -> list[str]:
    """The arguments of ``python -m iat.app.mlproject`` that ``mlflow run -e ENTRY -P ...``
    runs, as MLflow computes them from the MLproject (defaults and types applied)."""
    spec = _project_spec.load_project(str(REPO)).get_entry_point(entry)
    command = shlex.split(spec.compute_command({k: str(v) for k, v in params.items()}, None))
    assert command[:3] == ["python", "-m", "iat.app.mlproject"]
    return command[3:]


def run_in_process(entry: str, **params: object) -> str:
    """Entry point `entry` run here (a run of its own, as by hand): the run's id."""
    assert mlproject.main(entry_command(entry, **params)) == 0
    return mlflow.last_active_run().info.run_id


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A folder store, the digits, and the train and fgm runs every test reads."""
    root = tmp_path_factory.mktemp("mlproject")
    write_digits_folder(root / "digits", image_size=SIZE)
    store = (root / "mlruns").as_uri()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true",
           "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    digits = root / "digits"
    train = mlflow_run(env, "train", data_dir=digits, image_size=SIZE, epochs=2, iat_args=TINY)
    fgm = mlflow_run(env, "fgm", model_run_id=train, data_dir=digits, eps=EPS, iat_args=TINY)
    with pytest.MonkeyPatch.context() as patch:  # this process uses the folder store too
        patch.setenv("MLFLOW_TRACKING_URI", store)
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(store)
        model = load_model(client, train, root / "model")
        yield {"env": env, "root": root, "digits": digits, "client": client, "train": train,
               "model": model, "fgm": fgm}  # fmt: skip


def load_model(client: MlflowClient, run_id: str, dst: Path) -> torch.nn.Module:
    """The train run's logged checkpoint in the architecture it was trained with."""
    folder = Path(client.download_artifacts(run_id, "model", str(dst)))
    (checkpoint,) = folder.glob("checkpoint-epoch*.pt")
    model = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=WIDTH, num_classes=10)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    return model.eval()


def predictions(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """Top-1 classes of uint8 NHWC BGR images (the model takes float NCHW, pixel units)."""
    with torch.no_grad():
        return model(torch.from_numpy(images).permute(0, 3, 1, 2).float()).argmax(1).numpy()


def dataset(client: MlflowClient, run_id: str, tar_name: str, dst: Path) -> dict[str, tuple]:
    """A run's dataset tarball: relative path -> (uint8 BGR image, label), from its labels.txt."""
    tarball = client.download_artifacts(run_id, tar_name, str(dst))
    with tarfile.open(tarball) as tar:
        tar.extractall(dst, filter="data")
    folder = dst / "adv_testing"
    lines = [line.split() for line in (folder / "labels.txt").read_text().splitlines()]
    return {name: (cv2.imread(str(folder / name)), int(label)) for name, label in lines}


def accuracy(model: torch.nn.Module, data: dict[str, tuple]) -> float:
    images = np.stack([image for image, _ in data.values()])
    labels = np.array([label for _, label in data.values()])
    return float((predictions(model, images) == labels).mean())


def clean_crops(digits: Path) -> dict[str, tuple]:
    """The val images as the evaluation crops them, by the relative name an export gives them."""
    samples = list_split(digits, "val")[0]
    return {
        Path(path).relative_to(digits / "val").with_suffix(".png").as_posix(): (
            eval_transform(cv2.imread(path), SIZE),
            label,
        )
        for path, label in samples
    }


def test_train_logs_its_model_scalars_and_clean_accuracy(project: dict) -> None:
    client, model = project["client"], project["model"]
    run = client.get_run(project["train"])
    assert run.data.params["epochs"] == "2" and run.info.status == "FINISHED"
    assert "--epochs 2" in run.data.tags["iat.train"]
    losses = client.get_metric_history(project["train"], "train/loss")
    assert sorted(m.step for m in losses)[-1] == 16  # 2 epochs of 8 steps
    clean = clean_crops(project["digits"])
    assert run.data.metrics["images"] == len(clean) == 360
    assert run.data.metrics["accuracy"] == pytest.approx(accuracy(model, clean), abs=1e-12)


def test_fgm_exports_its_set_and_infer_scores_it_by_run_id(project: dict) -> None:
    client, model, root = project["client"], project["model"], project["root"]
    adversarial = dataset(client, project["fgm"], "testing_adversarial_fgm.tar.gz", root / "fgm")
    clean = clean_crops(project["digits"])
    assert adversarial.keys() == clean.keys()
    for name, (image, label) in adversarial.items():  # FGM: every pixel moved by at most eps
        assert label == clean[name][1]
        assert np.abs(image.astype(int) - clean[name][0].astype(int)).max() <= EPS
    fgm = client.get_run(project["fgm"]).data.metrics
    robust = accuracy(model, adversarial)
    assert fgm["accuracy"] == pytest.approx(robust, abs=1e-12)
    assert fgm["attack_success_rate"] == pytest.approx(1 - robust, abs=1e-12)  # untargeted
    assert robust < client.get_run(project["train"]).data.metrics["accuracy"] - 0.2

    infer = mlflow_run(project["env"], "infer", run_id=project["fgm"],
                       model_run_id=project["train"], iat_args="--workers 0")  # fmt: skip
    scored = client.get_run(infer).data.metrics
    assert scored["accuracy"] == pytest.approx(robust, abs=1e-12) and scored["images"] == 360
    record = json.loads(Path(client.download_artifacts(infer, "eval/eval.json")).read_text())
    assert record["split"] == "." and record["attack"] == {"name": "clean"}


def test_defenses_write_the_transformed_set(project: dict) -> None:
    """spatial_smoothing and gaussian_augmentation on the fgm run's set, checked against
    OpenCV's median filter and the noise's statistics (jpeg_compression: the notebook's test)."""
    client, root = project["client"], project["root"]
    source = dataset(client, project["fgm"], "testing_adversarial_fgm.tar.gz", root / "src")
    runs = {
        "spatial_smoothing": {"spatial_smoothing_window_size": 3},
        "gaussian_augmentation": {"gaussian_augmentation_sigma": 8, "seed": 1},
    }
    out = {}
    for entry, params in runs.items():
        run_id = run_in_process(entry, dataset_run_id=project["fgm"], **params)
        out[entry] = dataset(client, run_id, f"{entry}_dataset.tar.gz", root / entry)
        check_distances(client.get_run(run_id).data.metrics, source, out[entry])
    for name, (image, label) in source.items():
        assert out["spatial_smoothing"][name][1] == out["gaussian_augmentation"][name][1] == label
        assert np.array_equal(out["spatial_smoothing"][name][0], cv2.medianBlur(image, 3))
    noise = np.concatenate(
        [
            (out["gaussian_augmentation"][k][0].astype(float) - v[0]).ravel()
            for k, v in source.items()
        ]
    )
    inside = np.concatenate([((v[0] >= 24) & (v[0] <= 231)).ravel() for v in source.values()])
    assert abs(noise[inside].mean()) < 0.1 and noise[inside].std() == pytest.approx(8, rel=0.05)


def check_distances(logged: dict, source: dict, defended: dict) -> None:
    """A defense run's metrics: the image count and the mean L-inf and L2 changes."""
    assert defended.keys() == source.keys() and logged["images"] == len(source)
    changes = [defended[k][0].astype(float) - source[k][0] for k in source]
    linf = np.mean([np.abs(c).max() for c in changes])
    assert logged["l_infinity_norm"] == pytest.approx(linf, rel=1e-9)
    l2 = np.mean([np.linalg.norm(c) for c in changes])
    assert logged["l_2_norm"] == pytest.approx(l2, rel=1e-5)


def test_autoattack_exports_what_it_scored(project: dict) -> None:
    client, model, root = project["client"], project["model"], project["root"]
    run_id = run_in_process("autoattack", model_run_id=project["train"],
                            data_dir=project["digits"], eps=EPS, num_examples=8, queries=20,
                            masking_checks=0,
                            iat_args="--workers 0 --attack-iter 10 --apgd-targets 2")  # fmt: skip
    adversarial = dataset(client, run_id, "testing_adversarial_autoattack.tar.gz", root / "aa")
    clean = clean_crops(project["digits"])
    assert len(adversarial) == 8
    for name, (image, _) in adversarial.items():
        assert np.abs(image.astype(int) - clean[name][0].astype(int)).max() <= EPS
    logged = client.get_run(run_id).data.metrics
    assert logged["accuracy"] == pytest.approx(accuracy(model, adversarial), abs=1e-12)
    assert logged["images"] == 8


def test_a_missing_run_or_artifact_is_one_line(project: dict, capsys) -> None:
    def error(entry: str, **params: object) -> str:
        assert mlproject.main(entry_command(entry, **params)) == 1
        err = capsys.readouterr().err.splitlines()
        assert err[-1].startswith("error: ")
        return err[-1]

    model = project["train"]
    assert error("infer", run_id="0123456789abcdef", model_run_id=model).startswith(
        "error: --run-id 0123456789abcdef: Run '0123456789abcdef' not found"
    )
    line = error("infer", run_id=project["fgm"], model_run_id=model, adv_tar_name="x.tgz")
    assert line.startswith(f"error: --run-id {project['fgm']}: the run has no artifact 'x.tgz'")
    assert "testing_adversarial_fgm.tar.gz" in line
    line = error("infer", run_id=project["fgm"], model_run_id=project["fgm"])
    assert line.startswith(f"error: --model-run-id {project['fgm']}: the run has no artifact")
    line = error("train", data_dir=project["root"] / "model", iat_args="--workers 0")
    assert line.startswith("error: ") and str(project["root"] / "model") in line  # iat's own
    line = error("spatial_smoothing", dataset_run_id=project["fgm"],
                 spatial_smoothing_window_size=4)  # fmt: skip
    assert (
        line
        == "error: --spatial-smoothing-window-size: 'median:4': median needs an odd size, got 4"
    )


def test_every_entry_point_is_dioptras() -> None:
    """Each of Dioptra's entry points is in the MLproject, and each command's flags are the
    module's own (an unknown flag would stop the parser)."""
    declared = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    names = {"train", "infer", "fgm", "autoattack", "spatial_smoothing", "jpeg_compression",
             "gaussian_augmentation"}  # fmt: skip
    assert set(declared) == names
    required = {"train": {"data_dir": "d"}, "infer": {"run_id": "r", "model_run_id": "m"},
                "fgm": {"model_run_id": "m", "data_dir": "d"},
                "autoattack": {"model_run_id": "m", "data_dir": "d"}}  # fmt: skip
    for name in names:
        params = required.get(name, {"dataset_run_id": "r"})
        parsed = vars(mlproject.build_parser().parse_args(entry_command(name, **params)))
        assert parsed["entry"] == name and set(declared[name]["parameters"]) <= set(parsed), name


def test_the_notebook_walks_the_same_workflow(project: dict, monkeypatch) -> None:
    """examples/dioptra_workflow.ipynb executed by a Jupyter kernel at the test's scale (its
    parameters cell overridden to reuse the trained model): fgm, jpeg_compression, and infer on
    both sets; the JPEG set checked against OpenCV's codec, its accuracy recomputed here."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "examples" / "dioptra_workflow.ipynb", as_version=4)
    (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", ())]
    root, client, model = project["root"], project["client"], project["model"]
    parameters.source += (
        f"\nWORK = Path({str(root)!r})\nIMAGE_SIZE = {SIZE}\nIAT_ARGS = {TINY!r}"
        f"\nMODEL_RUN_ID = {project['train']!r}"
        '\nDEFENSES = {"jpeg_compression": {"jpeg_compression_quality": 30}}'
    )
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel and the runs import this iat
    monkeypatch.setenv("PATH", project["env"]["PATH"])
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(REPO / "examples")}},
    ).execute()  # fmt: skip
    printed = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", ()))
    runs = dict(re.findall(r"^(\w+): run ([0-9a-f]+) ", printed, re.MULTILINE))
    infers = re.findall(r"^infer: run ([0-9a-f]+) ", printed, re.MULTILINE)
    assert set(runs) == {"fgm", "jpeg_compression", "infer"} and len(infers) == 2
    source = dataset(client, runs["fgm"], "testing_adversarial_fgm.tar.gz", root / "nb-fgm")
    tar_name = "jpeg_compression_dataset.tar.gz"
    jpeg = dataset(client, runs["jpeg_compression"], tar_name, root / "nb-jpeg")
    check_distances(client.get_run(runs["jpeg_compression"]).data.metrics, source, jpeg)
    quality = [cv2.IMWRITE_JPEG_QUALITY, 30]
    for name, (image, label) in source.items():
        decoded = cv2.imdecode(cv2.imencode(".jpg", image, quality)[1], cv2.IMREAD_COLOR)
        assert np.array_equal(jpeg[name][0], decoded) and jpeg[name][1] == label
    scored = [client.get_run(run_id).data for run_id in infers]
    assert [data.params["run_id"] for data in scored] == [runs["fgm"], runs["jpeg_compression"]]
    assert scored[0].metrics["accuracy"] == pytest.approx(accuracy(model, source), abs=1e-12)
    assert scored[1].metrics["accuracy"] == pytest.approx(accuracy(model, jpeg), abs=1e-12)
    table = {
        name.strip(): float(value)
        for name, value in re.findall(r"^(.+) accuracy ([0-9.]+)$", printed, re.MULTILINE)
    }
    assert table == pytest.approx({
        "clean (val)": client.get_run(project["train"]).data.metrics["accuracy"],
        "FGM eps 32": scored[0].metrics["accuracy"],
        "FGM eps 32, then jpeg_compression": scored[1].metrics["accuracy"],
    }, abs=5e-4)  # fmt: skip
