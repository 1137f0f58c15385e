"""`python main.py --demo`: the whole pipeline in a few minutes on a laptop CPU.

Writes the digits set that ships inside scikit-learn as an ImageNet-layout folder (upscaled,
BGR), trains a tiny registered ResNet on it twice through the same code path as ImageNet runs —
once with PGD in the loop, once on clean images — evaluates both clean and under PGD, writes a
black-box prediction file, and prints a summary table. The adversarially trained model should
keep far more accuracy under attack than the clean one.
"""

from __future__ import annotations

import dataclasses
import json
import time
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
EVAL_ATTACK_ITER = 10
STANDARD_EVAL_ITER = 100  # the strong ensemble's iterations (the table's last attack column)


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


def demo_config(data: Path, logdir: Path, attack_iter: int, nprocs: int) -> Config:
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
        epochs=6,
        base_lr=0.2,
        warmup_epochs=0.0,
        lr_decay_epochs=(4,),
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


# The table's columns: (heading, attack iterations, --attack-target, --attack). The paper's
# metric (targeted PGD toward a random wrong class) never stands alone: untargeted PGD and the
# strong ensemble stand beside it.
COLUMNS = (
    ("clean", 0, "random", "clean"),
    (f"PGD-{EVAL_ATTACK_ITER} rand-target", EVAL_ATTACK_ITER, "random", "pgd"),
    (f"PGD-{EVAL_ATTACK_ITER} untargeted", EVAL_ATTACK_ITER, "none", "pgd"),
    # The standard evaluation the demo can afford: the worst case of APGD-CE, APGD-T and
    # targeted PGD per example at 100 iterations (at 10 it overstated robust accuracy by up to
    # 6.9 points against ART's AutoAttack; at 100 it is within 0.3 points of it).
    (f"strong-{STANDARD_EVAL_ITER}", STANDARD_EVAL_ITER, "random", "strong"),
)


def column_points(cfg: Config, checkpoint: Path) -> list[tuple[str, Config]]:
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
        for heading, k, target, name in COLUMNS
    ]


def evaluate_columns(cfg: Config, model: torch.nn.Module, checkpoint: Path) -> list[EvalResult]:
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
        for heading, point in column_points(cfg, checkpoint)
    ]


def column_legend(cfg: Config, checkpoint: Path) -> str:
    """Each column's heading and the threat model it stands for, as ``--eval`` names it."""
    points = column_points(cfg, checkpoint)
    return "\n".join(f"{heading}: {threat_model(point)}" for heading, point in points)


def _train_rank(env: distributed.DistEnv, cfg: Config, threads: int) -> None:
    """One process of the demo's data-parallel training (started by distributed.spawn)."""
    distributed.set_threads(threads)
    device = torch.device("cpu")
    with distributed.process_group(env, device, timeout_s=300):
        run_training(cfg, env, device)


def train_and_evaluate(cfg: Config, nprocs: int) -> tuple[list[EvalResult], float | None]:
    """Train on `nprocs` processes (Gloo), then evaluate the final checkpoint here; the
    training's wall time (None when a finished model was reused)."""
    done = latest_checkpoint(cfg.logdir)
    seconds = None
    if done is not None and done.name == checkpoint_path(cfg.logdir, cfg.epochs).name:
        print(f"reusing the trained model {done} (delete {cfg.logdir} to train it again)")
        saved = saved_results(Path(cfg.logdir) / EVAL_FILE, done)
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
    results = evaluate_columns(cfg, model, checkpoint)
    save_results(Path(cfg.logdir) / EVAL_FILE, checkpoint, results)
    return results, seconds


EVAL_FILE = "demo-eval.json"  # the table's row of a trained model, reused by the next --demo


def _key(checkpoint: Path) -> dict:
    """What the saved row belongs to: the columns and this very checkpoint file."""
    stat = checkpoint.stat()
    return {
        "columns": [list(c) for c in COLUMNS],
        "checkpoint": [checkpoint.name, stat.st_size, stat.st_mtime_ns],
    }


def save_results(path: Path, checkpoint: Path, results: list[EvalResult]) -> None:
    record = {**_key(checkpoint), "results": [r.as_dict() for r in results]}
    atomic_write_text(path, json.dumps(record) + "\n")


def saved_results(path: Path, checkpoint: Path) -> list[EvalResult] | None:
    """The saved row when it is this checkpoint's under these columns, else None."""
    try:
        record = json.loads(path.read_text())
        if {k: record[k] for k in ("columns", "checkpoint")} != _key(checkpoint):
            return None
        fields = [f.name for f in dataclasses.fields(EvalResult)]
        return [EvalResult(**{k: r[k] for k in fields}) for r in record["results"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unreadable: evaluate again


def summary_table(rows: list[tuple[str, list[EvalResult], float | None]]) -> str:
    """Accuracy (1 - top-1 error) of each model under each column's threat model, and the
    wall time its training took (training only, evaluation excluded)."""
    headings = [column[0] for column in COLUMNS]
    widths = [max(10, len(heading) + 2) for heading in headings]
    head = f"{'model':<28}" + "".join(f"{h:>{w}}" for h, w in zip(headings, widths, strict=True))
    head += f"{'train s':>10}"
    lines = [head, "-" * len(head)]
    for name, results, seconds in rows:
        cells = "".join(f"{1 - r.top1_error:>{w}.3f}" for r, w in zip(results, widths, strict=True))
        took = "reused" if seconds is None else f"{seconds:.0f}"
        lines.append(f"{name:<28}{cells}{took:>10}")
    return "\n".join(lines)


def run_demo(logdir: str) -> int:
    start = time.perf_counter()
    root = Path(logdir)
    data = root / "digits"
    if (data / "train").is_dir():
        print(f"reusing the digit images in {data}")
    else:
        n_train, n_val = write_digits_folder(data)
        print(f"wrote {n_train} train / {n_val} val digit images to {data}")
    cpus = usable_cpus()
    distributed.set_threads(cpus)  # this process evaluates while the training processes are gone
    nprocs = 2 if cpus >= 2 else 1
    print(f"training on {nprocs} process(es) of {cpus} usable CPUs, Gloo")
    rows = []
    for name, folder, k, method in MODELS:
        cfg = dataclasses.replace(demo_config(data, root / folder, k, nprocs), adv_method=method)
        print(f"training {name} ...")
        rows.append((name, *train_and_evaluate(cfg, nprocs)))
    adv_logdir = root / f"attack-iter{ATTACK_ITER}"
    adv_cfg = demo_config(data, adv_logdir, ATTACK_ITER, nprocs)
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
    print()
    print(
        f"digits, accuracy on {rows[0][1][0].images} held-out images, L-inf epsilon {EPSILON:g} "
        f"pixels (of 255), {time.perf_counter() - start:.0f} s"
    )
    print(summary_table(rows))
    print(column_legend(adv_cfg, adv_checkpoint))
    (_, adversarial, _), (_, standard, _) = rows[:2]
    attacked = zip(adversarial[1:], standard[1:], strict=True)
    robust_gain = all(adv.top1_error < std.top1_error for adv, std in attacked)
    print("adversarial training helps under attack:", "yes" if robust_gain else "NO")
    return 0
