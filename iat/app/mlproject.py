"""Dioptra's entry points as an MLflow project: the commands of the repository's ``MLproject``
(``mlflow run . -e ENTRY --env-manager local``), each ``python -m iat.app.mlproject ENTRY ...``.

NIST's Dioptra ran each step of an experiment as an entry point of an MLflow project (its
``tensorflow-mnist-classifier`` and ``tensorflow-imagenet-resnet50`` examples) and passed
datasets between steps as run artifacts: ``fgm`` uploads its adversarial images as a tarball
(``adv_tar_name``, holding the folder ``adv_data_dir``), ``spatial_smoothing``,
``jpeg_compression`` and ``gaussian_augmentation`` read a dataset tarball of an earlier run
(``dataset_run_id``, ``dataset_tar_name``, ``dataset_name``) and upload the transformed set
(``def_tar_name``, ``def_data_dir``), and ``infer`` scores the model on a run's tarball
(``run_id``). The same entry points and parameter names here; each runs ``iat`` with the
equivalent flags (printed, and kept as the run's ``iat.*`` tags) and logs to the run MLflow
started (``MLFLOW_RUN_ID``; a new run when started by hand):

* metrics: ``accuracy`` and ``top5_accuracy`` (fractions, Dioptra's convention), ``images``,
  and ``attack_success_rate`` for an attack; ``train`` also logs every training scalar at its
  step under iat's own names (``train/loss``, ``train/top1_error``, ...);
* artifacts: ``eval/`` (iat's ``--eval-output`` record and its per-image lines), the dataset
  tarball, and for ``train`` the model: ``model/`` (the last checkpoint and its ``config.json``).

Dioptra names a model by registry name and version; here a model is the ``model/`` artifact of a
``train`` run, named by that run's id (``model_run_id``). Pixel values are 0-255 (``eps``,
``gaussian_augmentation_sigma``), as everywhere in iat.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from iat.app import cli
from iat.data.layouts import create_reader, read_image_bgr
from iat.defenses.transforms import build_transforms
from iat.eval.evaluate import AdversarialExport, image_results_path
from iat.runs.files import CONFIG_FILE, METRICS_FILE
from iat.runs.state import latest_checkpoint

MODEL_ARTIFACT = "model"  # a train run's checkpoint and config.json
EVAL_ARTIFACT = "eval"  # iat's --eval-output record and per-image lines
EVAL_FILE = "eval.json"
METRIC_BATCH = 1000  # MLflow's limit on metrics per log_batch call
# The flags --eval entry points always pass: a fresh evaluation, nothing resumed or kept.
FRESH_EVAL = ["--eval-state", "none"]


class IatFailed(Exception):
    """iat exited non-zero (it printed why)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def run_iat(tag: str, argv: list[str]) -> None:
    """``iat ARGV`` in this process, printed first and kept as the run's tag ``iat.TAG``."""
    import mlflow

    command = f"iat {shlex.join(argv)}"
    print(command, flush=True)
    mlflow.set_tag(f"iat.{tag}", command)
    status = cli.main(argv)
    if status:
        raise IatFailed(status)


# --- artifacts --------------------------------------------------------------------------------
def download(run_id: str, artifact: str, dst: Path, what: str) -> Path:
    """Artifact `artifact` of run `run_id` (parameter `what` named it), downloaded under `dst`;
    a ValueError names the run and what it does hold."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        held = [f.path for f in client.list_artifacts(run_id)]
    except MlflowException as e:
        raise ValueError(f"{what} {run_id}: {str(e).strip().splitlines()[0]}") from None
    if artifact not in held:
        raise ValueError(
            f"{what} {run_id}: the run has no artifact {artifact!r} (it has: "
            f"{', '.join(held) or 'none'})"
        )
    return Path(client.download_artifacts(run_id, artifact, str(dst)))


def extract(tarball: Path, dst: Path) -> None:
    """Unpack `tarball` under `dst`: regular files and folders only, all inside `dst`."""
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            inside = (dst / member.name).resolve().is_relative_to(dst.resolve())
            if not (member.isfile() or member.isdir()) or not inside:
                raise ValueError(
                    f"{tarball.name}: member {member.name!r} is not a plain file inside it"
                )
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+: the checks above, and more
            tar.extractall(dst, filter="data")
        else:
            tar.extractall(dst)


def dataset_folder(run_id: str, tar_name: str, folder: str, work: Path, what: str) -> Path:
    """The folder `folder` of run `run_id`'s dataset tarball `tar_name`, unpacked under `work`."""
    unpacked = work / "dataset"
    unpacked.mkdir()
    extract(download(run_id, tar_name, work, what), unpacked)
    root = unpacked / folder
    if not root.is_dir():
        found = ", ".join(sorted(p.name for p in unpacked.iterdir())) or "nothing"
        raise ValueError(f"{what} {run_id}: {tar_name} holds no folder {folder!r} ({found})")
    return root


def log_tarball(folder: Path, tar_name: str, arcname: str, work: Path) -> None:
    """`folder` uploaded as the tarball artifact `tar_name`, its files under `arcname`/."""
    import mlflow

    path = work / tar_name
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    mlflow.log_artifact(str(path))


def model_checkpoint(model_run_id: str, work: Path) -> Path:
    """The checkpoint of train run `model_run_id` (its ``model/`` artifact), downloaded."""
    folder = download(model_run_id, MODEL_ARTIFACT, work / "model-run", "--model-run-id")
    found = sorted(folder.glob("*.pt"))
    if len(found) != 1:
        raise ValueError(f"--model-run-id {model_run_id}: {MODEL_ARTIFACT}/ holds no checkpoint")
    return found[0]


# --- metrics ----------------------------------------------------------------------------------
def eval_metrics(record: dict) -> dict[str, float]:
    """An ``--eval-output`` record's numbers as the run's metrics: accuracies (1 - error)."""
    metrics = {
        "accuracy": 1.0 - record["top1_error"],
        "top5_accuracy": 1.0 - record["top5_error"],
        "images": float(record["images"]),
    }
    if "attack_success_rate" in record:
        metrics["attack_success_rate"] = record["attack_success_rate"]
    return metrics


def log_eval(eval_output: Path) -> dict[str, float]:
    """The evaluation's metrics and files logged to the run; the metrics."""
    import mlflow

    metrics = eval_metrics(json.loads(eval_output.read_text()))
    mlflow.log_metrics(metrics)
    mlflow.log_artifact(str(eval_output), EVAL_ARTIFACT)
    mlflow.log_artifact(str(image_results_path(eval_output)), EVAL_ARTIFACT)
    print(", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
    return metrics


def log_training_scalars(logdir: Path) -> None:
    """Every scalar of the run's ``metrics.jsonl`` at its step (iat's names)."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    metrics = []
    for line in (logdir / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        if record.get("phase") != "train":
            continue
        stamp, step = int(record["time"] * 1000), int(record["step"])
        metrics += [
            Metric(key, float(value), stamp, step)
            for key, value in record.items()
            if "/" in key and isinstance(value, int | float)
        ]
    client, run_id = MlflowClient(), mlflow.active_run().info.run_id
    for i in range(0, len(metrics), METRIC_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + METRIC_BATCH])


# --- entry points -----------------------------------------------------------------------------
def train(ns: argparse.Namespace, work: Path) -> None:
    """Train on ``data_dir/train``, log the model, then score it clean on ``data_dir/split``."""
    import mlflow

    logdir = work / "run"
    model = ["--arch", ns.model_architecture, "--width", str(ns.width)]
    if ns.num_blocks:
        model += ["--num-blocks", *ns.num_blocks.split(",")]
    run_iat(
        "train",
        [
            *["--data", ns.data_dir, "--loader", "local", "--image-size", str(ns.image_size)],
            *["--train-augment", "none", "--batch", str(ns.batch_size), *model],
            *["--epochs", str(ns.epochs), "--base-lr", str(ns.learning_rate)],
            *["--lr-schedule", "cosine", "--warmup-epochs", str(ns.warmup_epochs)],
            *["--attack-iter", str(ns.attack_iter), "--attack-epsilon", str(ns.attack_epsilon)],
            *["--train-eval", "none", "--seed", str(ns.seed), "--logdir", str(logdir)],
            *shlex.split(ns.iat_args),
        ],
    )
    log_training_scalars(logdir)
    checkpoint = latest_checkpoint(logdir)
    mlflow.log_artifact(str(checkpoint), MODEL_ARTIFACT)
    mlflow.log_artifact(str(logdir / CONFIG_FILE), MODEL_ARTIFACT)
    if ns.split:
        eval_output = work / EVAL_FILE
        run_iat(
            "eval",
            [
                *["--eval", "--load", str(checkpoint), "--data", ns.data_dir, "--split", ns.split],
                *["--attack", "clean", "--batch", str(ns.batch_size), "--seed", str(ns.seed)],
                *["--eval-output", str(eval_output), *FRESH_EVAL, *shlex.split(ns.iat_args)],
            ],
        )
        log_eval(eval_output)


def attack(name: str) -> Callable[[argparse.Namespace, Path], None]:
    """The entry point attacking ``data_dir/split`` with iat's `name`: the adversarial images
    uploaded as the tarball ``adv_tar_name`` (folder ``adv_data_dir``), the model's accuracy
    on them logged."""

    def run(ns: argparse.Namespace, work: Path) -> None:
        checkpoint = model_checkpoint(ns.model_run_id, work)
        adversarial, eval_output = work / ns.adv_data_dir, work / EVAL_FILE
        chosen = "fgm-minimal" if name == "fgm" and ns.minimal else name
        flags = ["--attack", chosen, "--attack-epsilon", str(ns.eps), "--norm", ns.norm]
        if name == "fgm":
            flags += ["--eps-step", str(ns.eps_step), "--attack-target", ns.attack_target]
        else:
            flags += ["--queries", str(ns.queries), "--masking-checks", str(ns.masking_checks)]
        if ns.num_examples:
            flags += ["--num-examples", str(ns.num_examples)]
        run_iat(
            "eval",
            [
                *["--eval", "--load", str(checkpoint), "--data", ns.data_dir, "--split", ns.split],
                *flags,
                *["--batch", str(ns.batch_size), "--seed", str(ns.seed)],
                *["--export-adversarial", str(adversarial), "--eval-output", str(eval_output)],
                *FRESH_EVAL,
                *shlex.split(ns.iat_args),
            ],
        )
        log_eval(eval_output)
        log_tarball(adversarial, ns.adv_tar_name, ns.adv_data_dir, work)

    return run


def infer(ns: argparse.Namespace, work: Path) -> None:
    """The model's accuracy on run ``run_id``'s dataset tarball ``adv_tar_name``, clean."""
    checkpoint = model_checkpoint(ns.model_run_id, work)
    folder = dataset_folder(ns.run_id, ns.adv_tar_name, ns.adv_data_dir, work, "--run-id")
    eval_output = work / EVAL_FILE
    run_iat(
        "eval",
        [
            *["--eval", "--load", str(checkpoint), "--data", str(folder), "--split", "."],
            *["--attack", "clean", "--batch", str(ns.batch_size), "--seed", str(ns.seed)],
            *["--eval-output", str(eval_output), *FRESH_EVAL, *shlex.split(ns.iat_args)],
        ],
    )
    log_eval(eval_output)


def transform_images(source: Path, out: Path, spec: str, seed: int) -> dict[str, float]:
    """Every image of the labelled folder `source` (an export's ``labels.txt``, or class
    folders) through iat's ``--defense`` transforms `spec`, written as PNGs at the same relative
    paths under `out` with the labels; the mean L-inf and L2 distance of the written images
    to the originals (pixel units) and the image count."""
    samples = create_reader(source, "auto").samples(".")
    export = AdversarialExport(out, samples, source)
    transforms = build_transforms(spec, torch.Generator().manual_seed(seed))
    linf = l2 = 0.0
    for index, (path, _) in enumerate(samples):
        image = torch.from_numpy(read_image_bgr(path)).permute(2, 0, 1)[None].float()
        x = image
        for transform in transforms:
            x = transform(x)
        export.write(x, torch.tensor([index]))
        change = x.round().clamp(0, 255) - image
        linf += float(change.abs().max())
        l2 += float(change.norm())
    export.write_labels()
    n = len(samples)
    return {"images": float(n), "l_infinity_norm": linf / n, "l_2_norm": l2 / n}


def defense(
    option: str, spec: Callable[[float], str]
) -> Callable[[argparse.Namespace, Path], None]:
    """The entry point applying iat's input transform ``spec(value of option)`` to run
    ``dataset_run_id``'s dataset and uploading the result as ``def_tar_name``."""

    def run(ns: argparse.Namespace, work: Path) -> None:
        import mlflow

        value = spec(getattr(ns, option))
        try:
            build_transforms(value)
        except ValueError as e:
            raise ValueError(f"--{option.replace('_', '-')}: {e}") from None
        source = dataset_folder(
            ns.dataset_run_id, ns.dataset_tar_name, ns.dataset_name, work, "--dataset-run-id"
        )
        out = work / "defended" / ns.def_data_dir
        mlflow.set_tag("iat.defense", value)
        print(f"--defense {value} applied to the images of {ns.dataset_tar_name}", flush=True)
        metrics = transform_images(source, out, value, ns.seed)
        mlflow.log_metrics(metrics)
        print(", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
        log_tarball(out, ns.def_tar_name, ns.def_data_dir, work)

    return run


# --- command line -----------------------------------------------------------------------------
def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iat-args", default="", help="more iat flags, appended (override)")


def _model_and_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-run-id", required=True, help="a train run's id")
    parser.add_argument("--data-dir", required=True, help="iat --data")
    parser.add_argument("--split", default="val", help="iat --split (.: the folder itself)")
    parser.add_argument("--eps", type=float, default=16.0, help="pixel units (0-255)")
    parser.add_argument("--norm", choices=("inf", "2", "1"), default="inf")
    parser.add_argument("--num-examples", type=int, default=0, help="the first N (0: all)")
    parser.add_argument("--adv-data-dir", default="adv_testing")


def _dataset(parser: argparse.ArgumentParser, def_tar_name: str) -> None:
    parser.add_argument("--dataset-run-id", required=True)
    parser.add_argument("--dataset-tar-name", default="testing_adversarial_fgm.tar.gz")
    parser.add_argument("--dataset-name", default="adv_testing", help="its folder")
    parser.add_argument("--def-tar-name", default=def_tar_name)
    parser.add_argument("--def-data-dir", default="adv_testing")
    parser.add_argument("--seed", type=int, default=0)


def _truth(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"true or false, not {value!r}")
    return value.lower() == "true"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m iat.app.mlproject",
        description="Dioptra's entry points (MLproject): iat runs logged to the MLflow run.",
    )
    entries = parser.add_subparsers(dest="entry", required=True)

    p = entries.add_parser("train", help="train a model; its checkpoint is the run's model/")
    p.add_argument("--data-dir", required=True, help="iat --data (train/ and --split)")
    p.add_argument("--split", default="val", help="scored clean after training ('': none)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--model-architecture", default="ResNet")
    p.add_argument("--num-blocks", default="1,1,1,1", help="e.g. 1,1,1,1 ('': by depth)")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=0.2, help="iat --base-lr")
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--attack-iter", type=int, default=0, help="PGD in training (0: clean)")
    p.add_argument("--attack-epsilon", type=float, default=16.0)
    _common(p)
    p.set_defaults(run=train)

    p = entries.add_parser("fgm", help="FGM's adversarial set as a tarball")
    _model_and_data(p)
    p.add_argument("--eps-step", type=float, default=1.0, help="--minimal's increment")
    p.add_argument("--minimal", type=_truth, default=False, help="the smallest eps that fools")
    p.add_argument("--attack-target", choices=("none", "random", "least_likely"), default="none")
    p.add_argument("--adv-tar-name", default="testing_adversarial_fgm.tar.gz")
    _common(p)
    p.set_defaults(run=attack("fgm"))

    p = entries.add_parser("autoattack", help="AutoAttack's adversarial set as a tarball")
    _model_and_data(p)
    p.add_argument("--queries", type=int, default=5000, help="Square's queries per image")
    p.add_argument("--masking-checks", type=int, default=20)
    p.add_argument("--adv-tar-name", default="testing_adversarial_autoattack.tar.gz")
    _common(p)
    p.set_defaults(run=attack("autoattack"))

    p = entries.add_parser("infer", help="the model's accuracy on a run's dataset tarball")
    p.add_argument("--run-id", required=True, help="the run whose dataset is scored")
    p.add_argument("--model-run-id", required=True, help="a train run's id")
    p.add_argument("--adv-tar-name", default="testing_adversarial_fgm.tar.gz")
    p.add_argument("--adv-data-dir", default="adv_testing")
    _common(p)
    p.set_defaults(run=infer)

    p = entries.add_parser("spatial_smoothing", help="a median-smoothed copy of a dataset")
    _dataset(p, "spatial_smoothing_dataset.tar.gz")
    p.add_argument("--spatial-smoothing-window-size", type=int, default=3)
    p.set_defaults(run=defense("spatial_smoothing_window_size", lambda k: f"median:{k}"))

    p = entries.add_parser("jpeg_compression", help="a JPEG-compressed copy of a dataset")
    _dataset(p, "jpeg_compression_dataset.tar.gz")
    p.add_argument("--jpeg-compression-quality", type=int, default=50)
    p.set_defaults(run=defense("jpeg_compression_quality", lambda q: f"jpeg:{q}"))

    p = entries.add_parser("gaussian_augmentation", help="a copy of a dataset with noise added")
    _dataset(p, "gaussian_augmentation_dataset.tar.gz")
    p.add_argument("--gaussian-augmentation-sigma", type=float, default=8.0, help="pixels")
    p.set_defaults(run=defense("gaussian_augmentation_sigma", lambda s: f"noise:{s:g}"))
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    import mlflow
    from mlflow.exceptions import MlflowException

    from iat.runs.trackers.mlflow_runs import allow_folder_store

    allow_folder_store(mlflow.get_tracking_uri())  # as --mlflow does
    try:
        with mlflow.start_run(), tempfile.TemporaryDirectory(prefix="iat-mlproject-") as work:
            ns.run(ns, Path(work))
    except IatFailed as e:
        return e.status
    except (ValueError, MlflowException) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
