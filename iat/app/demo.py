"""`python main.py --demo`: the whole pipeline in a few minutes on a laptop CPU
(``--demo --quick``: the same code path and table at a fraction of the compute).

Writes the digits set that ships inside scikit-learn as an ImageNet-layout folder (upscaled,
BGR), trains a tiny registered ResNet on it twice through the same code path as ImageNet runs —
once with PGD in the loop, once on clean images — evaluates both clean and under PGD, writes a
black-box prediction file, and prints a summary table. The adversarially trained model should
keep far more accuracy under attack than the clean one. Each model's row is printed as soon as
it is evaluated, after an estimate of the whole run's time measured on this machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

import nets
from iat.app.predict import run_predict
from iat.builders import build_model
from iat.config import Config, eval_attack
from iat.data.layouts import list_split
from iat.eval.evaluate import evaluate_attack
from iat.eval.metrics import EvalResult
from iat.eval.summary import threat_model
from iat.runs.files import checkpoint_path
from iat.runs.state import latest_checkpoint
from iat.runtime import distributed
from iat.runtime.atomic_io import atomic_write_text
from iat.runtime.cpus import usable_cpus
from iat.train.trainer import run_training

IMAGE_SIZE = 32
VAL_EVERY = 5  # every 5th image of the set goes to val/
EPSILON = 32.0  # pixel units; digits are high-contrast, so a larger ball than ImageNet's 16
ATTACK_ITER = 3
TOTAL_BATCH = 64


@dataclass(frozen=True)
class DemoScale:
    """How much compute the demo spends: training epochs and the evaluation's attacks."""

    name: str  # the subfolder of --logdir its models go to ("" for the full demo)
    epochs: int
    lr_decay_epochs: tuple[int, ...]
    eval_iter: int  # the PGD columns' iterations
    strong_iter: int  # the strong ensemble's iterations (the table's last attack column)
    strong_targets: int  # APGD-T's target classes in the strong ensemble


FULL = DemoScale(
    "", epochs=6, lr_decay_epochs=(4,), eval_iter=10, strong_iter=100, strong_targets=9
)
# --demo --quick (the test suite's demo): fewer epochs, a weaker strong ensemble; same table.
QUICK = DemoScale(
    "quick", epochs=4, lr_decay_epochs=(3,), eval_iter=10, strong_iter=20, strong_targets=3
)


def write_digits_folder(root: Path, image_size: int = IMAGE_SIZE) -> tuple[int, int]:
    """train/digitK/*.png and val/digitK/*.png (plus a flat unlabeled/ copy of val/).

    Returns the number of train and val images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = [0, 0]
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        grey = (img * (255.0 / 16.0)).astype(np.float32)
        big = cv2.resize(grey, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
        bgr = cv2.cvtColor(np.clip(big, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
        split = "val" if i % VAL_EVERY == 0 else "train"
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:04d}.png"), bgr)
        if split == "val":
            (root / "unlabeled").mkdir(exist_ok=True)
            cv2.imwrite(str(root / "unlabeled" / f"{i:04d}.png"), bgr)
        counts[split == "val"] += 1
    return counts[0], counts[1]


def demo_config(
    data: Path, logdir: Path, attack_iter: int, nprocs: int, scale: DemoScale = FULL
) -> Config:
    return Config(
        data=str(data),
        loader="local",
        workers=0,
        image_size=IMAGE_SIZE,
        train_augment="none",
        batch=TOTAL_BATCH // nprocs,
        arch="ResNet",
        num_blocks=(1, 1, 1, 1),
        width=16,
        attack_iter=attack_iter,
        attack_epsilon=EPSILON,
        attack_step_size=EPSILON / 4,
        epochs=scale.epochs,
        base_lr=0.2,
        warmup_epochs=0.0,
        lr_decay_epochs=scale.lr_decay_epochs,
        apgd_targets=scale.strong_targets,
        train_eval="none",
        logdir=str(logdir),
        log_every=10,
    )


# The table's rows: (name, run folder, --attack-iter, --adv-method). FGSM with a random start
# ("Fast is better than free", Wong et al. 2020) is what to pick when compute is short.
MODELS = (
    (f"adversarial (PGD-{ATTACK_ITER})", f"attack-iter{ATTACK_ITER}", ATTACK_ITER, None),
    ("clean (--attack-iter 0)", "attack-iter0", 0, None),
    (f"cheap (FGSM-RS, eps {EPSILON:g})", "fgsmrs", 1, f"fgsmrs_{EPSILON:g}"),
)


def columns(scale: DemoScale) -> tuple[tuple[str, int, str, str], ...]:
    """The table's columns: (heading, attack iterations, --attack-target, --attack). The paper's
    metric (targeted PGD toward a random wrong class) never stands alone: untargeted PGD and the
    strong ensemble stand beside it."""
    k = scale.eval_iter
    return (
        ("clean", 0, "random", "clean"),
        (f"PGD-{k} rand-target", k, "random", "pgd"),
        (f"PGD-{k} untargeted", k, "none", "pgd"),
        # The standard evaluation the demo can afford: the worst case of APGD-CE, APGD-T and
        # targeted PGD per example at 100 iterations (at 10 it overstated robust accuracy by up
        # to 6.9 points against ART's AutoAttack; at 100 it is within 0.3 points of it).
        (f"strong-{scale.strong_iter}", scale.strong_iter, "random", "strong"),
    )


def column_points(
    cfg: Config, checkpoint: Path, scale: DemoScale = FULL
) -> list[tuple[str, Config]]:
    """Each of the table's columns: its heading and the ``--eval`` configuration it stands for
    (of `checkpoint`)."""
    return [
        (
            heading,
            dataclasses.replace(
                cfg,
                mode="eval",
                load=str(checkpoint),
                attack=name,
                attack_iter=k,
                attack_target=target,
            ),
        )
        for heading, k, target, name in columns(scale)
    ]


def evaluate_columns(
    cfg: Config, model: torch.nn.Module, checkpoint: Path, scale: DemoScale = FULL
) -> list[EvalResult]:
    """The model's accuracy under each of the table's threat models."""
    val = list_split(cfg.data, "val", cfg.data_layout)[0]
    return [
        evaluate_attack(
            model,
            point,
            val,
            attack_iter=point.attack_iter,
            num_classes=10,
            device=torch.device("cpu"),
            desc=heading,
            name=eval_attack(point),
        )
        for heading, point in column_points(cfg, checkpoint, scale)
    ]


def column_legend(cfg: Config, checkpoint: Path, scale: DemoScale = FULL) -> str:
    """Each column's heading and the threat model it stands for, as ``--eval`` names it."""
    points = column_points(cfg, checkpoint, scale)
    return "\n".join(f"{heading}: {threat_model(point)}" for heading, point in points)


def _train_rank(env: distributed.DistEnv, cfg: Config, threads: int) -> None:
    """One process of the demo's data-parallel training (started by distributed.spawn)."""
    distributed.set_threads(threads)
    device = torch.device("cpu")
    with distributed.process_group(env, device, timeout_s=300):
        run_training(cfg, env, device)


def train_and_evaluate(
    cfg: Config, nprocs: int, scale: DemoScale = FULL
) -> tuple[list[EvalResult], float | None]:
    """Train on `nprocs` processes (Gloo), then evaluate the final checkpoint here; the
    training's wall time (None when a finished model was reused)."""
    done = latest_checkpoint(cfg.logdir)
    seconds = None
    if done is not None and done.name == checkpoint_path(cfg.logdir, cfg.epochs).name:
        print(f"reusing the trained model {done} (delete {cfg.logdir} to train it again)")
        saved = saved_results(Path(cfg.logdir) / EVAL_FILE, done, scale)
        if saved is not None:
            print(f"reusing its evaluation {Path(cfg.logdir) / EVAL_FILE}")
            return saved, None
    else:
        began = time.perf_counter()
        if nprocs > 1:
            distributed.spawn(_train_rank, nprocs, (cfg, 1))
        else:
            run_training(cfg, distributed.detect(), torch.device("cpu"))
        seconds = time.perf_counter() - began
    checkpoint = latest_checkpoint(cfg.logdir)
    model = build_model(cfg, 10, torch.device("cpu"), nets.read_weights(checkpoint))
    results = evaluate_columns(cfg, model, checkpoint, scale)
    save_results(Path(cfg.logdir) / EVAL_FILE, checkpoint, results, scale)
    return results, seconds


EVAL_FILE = "demo-eval.json"  # the table's row of a trained model, reused by the next --demo


def _key(checkpoint: Path, scale: DemoScale) -> dict:
    """What the saved row belongs to: the columns and this very checkpoint file."""
    stat = checkpoint.stat()
    return {
        "columns": [list(c) for c in columns(scale)],
        "strong_targets": scale.strong_targets,
        "checkpoint": [checkpoint.name, stat.st_size, stat.st_mtime_ns],
    }


def save_results(
    path: Path, checkpoint: Path, results: list[EvalResult], scale: DemoScale = FULL
) -> None:
    record = {**_key(checkpoint, scale), "results": [r.as_dict() for r in results]}
    atomic_write_text(path, json.dumps(record) + "\n")


def saved_results(path: Path, checkpoint: Path, scale: DemoScale = FULL) -> list[EvalResult] | None:
    """The saved row when it is this checkpoint's under these columns, else None."""
    try:
        record = json.loads(path.read_text())
        if {k: record.get(k) for k in ("columns", "checkpoint", "strong_targets")} != _key(
            checkpoint, scale
        ):
            return None
        fields = [f.name for f in dataclasses.fields(EvalResult)]
        return [EvalResult(**{k: r[k] for k in fields}) for r in record["results"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unreadable: evaluate again


def _widths(scale: DemoScale) -> list[int]:
    return [max(10, len(column[0]) + 2) for column in columns(scale)]


def table_head(scale: DemoScale = FULL) -> str:
    """The table's heading and rule: accuracy (1 - top-1 error) under each column's threat
    model, and the wall time of each model's training (evaluation excluded)."""
    headings = [column[0] for column in columns(scale)]
    head = f"{'model (accuracy)':<28}"
    head += "".join(f"{h:>{w}}" for h, w in zip(headings, _widths(scale), strict=True))
    head += f"{'train s':>10}"
    return f"{head}\n{'-' * len(head)}"


def table_row(
    name: str, results: list[EvalResult], seconds: float | None, scale: DemoScale = FULL
) -> str:
    widths = _widths(scale)
    cells = "".join(f"{1 - r.top1_error:>{w}.3f}" for r, w in zip(results, widths, strict=True))
    took = "reused" if seconds is None else f"{seconds:.0f}"
    return f"{name:<28}{cells}{took:>10}"


def summary_table(
    rows: list[tuple[str, list[EvalResult], float | None]], scale: DemoScale = FULL
) -> str:
    """The heading and every row (`table_head`, `table_row`)."""
    return "\n".join([table_head(scale), *(table_row(*row, scale) for row in rows)])


def _model_passes(k: int, method: str | None) -> int:
    """Forward and backward passes per training image: the attack's iterations and the update."""
    return (1 if method and method.startswith("fgsmrs") else k) + 1


def estimate_seconds(scale: DemoScale, n_train: int, n_val: int, unit_s: float) -> float:
    """The demo's expected wall time: forward and backward passes of a TOTAL_BATCH batch (each
    `unit_s`, as measured here) over the training of every model and the table's columns."""
    batches_train = n_train // TOTAL_BATCH
    batches_val = math.ceil(n_val / TOTAL_BATCH)
    train = sum(
        scale.epochs * batches_train * _model_passes(k, method) for _, _, k, method in MODELS
    )
    per_model = 0
    for _, k, _, name in columns(scale):
        if name == "strong":  # APGD-CE, APGD-T per target and PGD, each k iterations
            k = k * (2 + scale.strong_targets)
        per_model += batches_val * (k + 1)
    return unit_s * (train + len(MODELS) * per_model)


def measure_unit(cfg: Config, nprocs: int, cpus: int, repeats: int = 3) -> float:
    """Seconds of one forward and backward pass of the demo's model over a TOTAL_BATCH batch,
    measured as the training runs it: `nprocs` processes side by side, each with its share of
    the batch and of the `cpus` threads. (One process with every thread over the whole batch
    measured up to 10x slower on a busy 2-core machine, where threads wait on each other.)"""
    model = build_model(cfg, 10, torch.device("cpu"))
    images = torch.rand(TOTAL_BATCH // nprocs, 3, IMAGE_SIZE, IMAGE_SIZE) * 255
    images.requires_grad_(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cpus // nprocs))
    times = []
    try:
        for _ in range(repeats + 1):  # the first pass warms up
            began = time.perf_counter()
            model(images).sum().backward()
            times.append(time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)
    return min(times[1:])


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def run_demo(logdir: str, quick: bool = False) -> int:
    """The demo (``quick``: `QUICK`'s scale, its models in ``logdir/quick``). Its table is
    printed row by row; stopped with Ctrl-C, the rows printed so far stay (exit status 130)."""
    scale = QUICK if quick else FULL
    start = time.perf_counter()
    root = Path(logdir)
    data = root / "digits"
    if (data / "train").is_dir():
        print(f"reusing the digit images in {data}")
    else:
        n_train, n_val = write_digits_folder(data)
        print(f"wrote {n_train} train / {n_val} val digit images to {data}")
    models_root = root / scale.name
    cpus = usable_cpus()
    distributed.set_threads(cpus)  # this process evaluates while the training processes are gone
    nprocs = 2 if cpus >= 2 else 1
    print(f"training on {nprocs} process(es) of {cpus} usable CPUs, Gloo")
    adv_logdir = models_root / f"attack-iter{ATTACK_ITER}"
    adv_cfg = demo_config(data, adv_logdir, ATTACK_ITER, nprocs, scale)
    n_train = len(list_split(adv_cfg.data, "train", adv_cfg.data_layout)[0])
    n_val = len(list_split(adv_cfg.data, "val", adv_cfg.data_layout)[0])
    expected = estimate_seconds(scale, n_train, n_val, measure_unit(adv_cfg, nprocs, cpus))
    print(
        f"expected time: about {_duration(expected)} for {len(MODELS)} models on this machine "
        "if nothing is reused (from measured training passes; Ctrl-C keeps the rows printed)"
    )
    heading = f"digits, accuracy on {n_val} held-out images, L-inf epsilon {EPSILON:g} pixels"
    print(f"\n{heading} (of 255)")
    print(table_head(scale), flush=True)
    rows = []
    try:
        for name, folder, k, method in MODELS:
            cfg = demo_config(data, models_root / folder, k, nprocs, scale)
            cfg = dataclasses.replace(cfg, adv_method=method)
            print(f"  training {name} ...", flush=True)
            rows.append((name, *train_and_evaluate(cfg, nprocs, scale)))
            print(table_row(*rows[-1], scale), flush=True)
    except KeyboardInterrupt:
        print(f"\nstopped after {len(rows)} of {len(MODELS)} models (rows above)", flush=True)
        return 130
    adv_checkpoint = latest_checkpoint(adv_logdir)
    predict_cfg = dataclasses.replace(
        adv_cfg,
        mode="eval_directory",
        num_classes=10,
        eval_directory=str(data / "unlabeled"),
        prediction_file=str(root / "predictions.txt"),
        load=str(adv_checkpoint),
    )
    run_predict(predict_cfg, torch.device("cpu"))
    print(f"\n{heading} (of 255), {time.perf_counter() - start:.0f} s")
    print(summary_table(rows, scale))
    print(column_legend(adv_cfg, adv_checkpoint, scale))
    (_, adversarial, _), (_, standard, _) = rows[:2]
    attacked = zip(adversarial[1:], standard[1:], strict=True)
    robust_gain = all(adv.top1_error < std.top1_error for adv, std in attacked)
    print("adversarial training helps under attack:", "yes" if robust_gain else "NO")
    return 0
