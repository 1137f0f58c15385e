"""The recipes scaled down to the demo's digits (prints one table, README "Recipes").

    python bench/recipes_digits.py [--out recipes_digits] [--epochs 6] [--lr-scale 1]
        [--epsilon 32]

Every recipe trains the demo's network (ResNet, one block per group, width 16) on the demo's
digits (32x32) for the same epochs, total batch 64 and L-inf epsilon (the demo's 32 pixels by
default); each keeps its
own optimizer, schedule (warm-ups scaled by epochs / the recipe's epochs), augmentation, mixing,
attack iterations and EMA. Evaluated on the 360 held-out digits: clean, and `strong` (the worst
case of APGD-CE, APGD-T and targeted PGD, 100 iterations), of the weights the recipe evaluates
(the moving average where it keeps one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # make ``iat`` importable when run as a script

from iat.app.cli import main  # noqa: E402
from iat.app.demo import EPSILON as DEMO_EPSILON  # noqa: E402
from iat.app.demo import write_digits_folder  # noqa: E402
from iat.recipes.presets import RECIPES  # noqa: E402

NETWORK = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "16"]
DATA = ["--loader", "local", "--workers", "0", "--image-size", "32", "--batch", "64"]


def recipe_flags(name: str, epochs: int, lr_scale: float, eps: float) -> list[str]:
    """The recipe at the digits' budget: epsilon `eps`, its iterations, warm-ups scaled; its
    base LR times `lr_scale` (the original's untouched)."""
    if name == "iat":  # the demo's scaling of the original (iat.app.demo.demo_config)
        return ["--attack-iter", "3", "--attack-epsilon", f"{eps:g}", "--attack-step-size",
                f"{eps / 4:g}", "--base-lr", "0.2", "--warmup-epochs", "0",
                "--lr-decay-epochs", str(epochs * 2 // 3), "--train-augment", "none"]  # fmt: skip
    settings = RECIPES[name].settings
    scale = epochs / settings["epochs"]
    flags = ["--recipe", name, "--warmup-epochs", f"{settings['warmup_epochs'] * scale:g}"]
    flags += ["--base-lr", f"{settings['base_lr'] * lr_scale:g}"]
    if name == "revisiting-at":  # PGD-2, steps of epsilon
        return [*flags, "--adv-method", f"pgd_{eps:g}_{eps:g}_2"]
    return [*flags, "--attack-epsilon", f"{eps:g}", "--attack-step-size",
            f"{2 * eps / 3:g}", "--step-warmup-epochs", "1"]  # fmt: skip  # ARES: 8/3 at 4


def evaluate(
    checkpoint: Path, data: Path, out: Path, attack: list[str], ema: bool, eps: float
) -> float:
    flags = ["--eval", "--load", str(checkpoint), "--data", str(data), *DATA, *attack,
             "--attack-epsilon", f"{eps:g}", "--masking-checks", "0",
             "--eval-output", str(out), "--eval-state", "none"]  # fmt: skip
    assert main([*flags, *(["--eval-ema"] if ema else [])]) == 0
    return 1.0 - json.loads(out.read_text())["top1_error"]


def main_bench() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="recipes_digits", help="folder for the data and the runs")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--recipes", nargs="+", default=["iat", "revisiting-at", "ares"])
    p.add_argument("--lr-scale", type=float, default=1.0, help="the recipes' base LR times this")
    p.add_argument("--epsilon", type=float, default=DEMO_EPSILON, help="L-inf, pixel units")
    a = p.parse_args()
    out = Path(a.out)
    data = out / "digits"
    if not data.exists():
        write_digits_folder(data)
    rows = []
    for name in a.recipes:
        logdir = out / f"{name}-lr{a.lr_scale:g}-eps{a.epsilon:g}"
        start = time.perf_counter()
        flags = ["--data", str(data), "--logdir", str(logdir), *NETWORK, *DATA]
        flags += [
            "--epochs",
            str(a.epochs),
            "--train-eval",
            "none",
            *recipe_flags(name, a.epochs, a.lr_scale, a.epsilon),
        ]
        assert main(flags) == 0
        seconds = time.perf_counter() - start
        checkpoint = logdir / f"checkpoint-epoch{a.epochs:04d}.pt"
        ema = RECIPES[name].settings.get("moving_average_decay", -1) > 0
        clean = evaluate(
            checkpoint, data, logdir / "clean.json", ["--attack-iter", "0"], ema, a.epsilon
        )
        strong = ["--attack", "strong", "--attack-iter", "100"]
        robust = evaluate(checkpoint, data, logdir / "strong.json", strong, ema, a.epsilon)
        rows.append((name, clean, robust, seconds))
    print(f"\ndigits, {a.epochs} epochs, batch 64, L-inf epsilon {a.epsilon:g} pixels, 360 images, "
          f"recipes' LR x {a.lr_scale:g}")  # fmt: skip
    print(f"{'recipe':16s} {'clean':>7s} {'strong-100':>11s} {'train s':>8s}")
    for name, clean, robust, seconds in rows:
        print(f"{name:16s} {clean:7.3f} {robust:11.3f} {seconds:8.0f}")


if __name__ == "__main__":
    main_bench()
