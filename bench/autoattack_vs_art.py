"""This project's AutoAttack against an independent one (adversarial-robustness-toolbox's
``AutoAttack``) on the demo's adversarially trained digits model, same images and threat model.

    python main.py --demo --logdir demo_log            # once: the model and its digits folder
    python bench/autoattack_vs_art.py --demo-log demo_log --epsilon 16 32

Prints, per epsilon (pixel units, L-inf): clean accuracy, the robust accuracy of ``--attack
autoattack`` (standard version: APGD-CE, APGD-T, FAB-T, Square 5,000 queries) with each member's
share, ART's AutoAttack with its default members (APGD-CE and APGD-DLR with 5 restarts,
DeepFool, Square 5,000 queries), ``strong`` at 100 iterations, and the seconds each took. The
issue's bar: ours within 1 point of ART's, or lower.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from iat.app.cli import build_parser, config_from_args  # noqa: E402
from iat.attacks import AttackSettings, create_attacker  # noqa: E402
from iat.builders import load_for_inference  # noqa: E402
from iat.data.layouts import create_reader  # noqa: E402

ITERATIONS = 100  # AutoAttack's APGD / FAB iterations (Croce & Hein 2020)
TARGETS = 9
QUERIES = 5000


def load_demo(demo_log: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The demo's adversarially trained model (eval mode) and its held-out digits."""
    run = demo_log / "attack-iter3"  # iat.app.demo.MODELS: the PGD-3 trained model
    checkpoint = sorted(run.glob("checkpoint-epoch*.pt"))[-1]
    data = demo_log / "digits"
    flags = ["--eval", "--load", str(checkpoint), "--data", str(data), "--image-size", "32"]
    cfg = config_from_args(build_parser().parse_args(flags))  # the architecture: the file's
    model, _ = load_for_inference(cfg, torch.device("cpu"))
    model.eval()
    samples = create_reader(data).samples("val")
    images = np.stack([cv2.imread(path, cv2.IMREAD_COLOR) for path, _ in samples])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().contiguous()
    y = torch.tensor([label for _, label in samples])
    return model, x, y


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def ours(model, x, y, name: str, epsilon: float) -> tuple[float, float, dict]:
    settings = AttackSettings(ITERATIONS, epsilon, 1.0, target=None, top_k=TARGETS, queries=QUERIES)
    attacker = create_attacker(name, settings)
    start = time.perf_counter()
    adv, _ = attacker.attack(model, x, y, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    details = attacker.describe_stats(attacker.batch_stats(), len(y))
    return accuracy(model, adv, y), seconds, details


def art_autoattack(model, x, y, epsilon: float) -> tuple[float, float]:
    from art.attacks.evasion import AutoAttack
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(
        model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=int(y.max()) + 1,
        clip_values=(0.0, 255.0),  # the model's own input space: pixel units
    )
    attack = AutoAttack(
        classifier, norm=np.inf, eps=epsilon, eps_step=epsilon / 4, batch_size=len(y)
    )
    start = time.perf_counter()
    adv = attack.generate(x.numpy(), y=y.numpy())
    seconds = time.perf_counter() - start
    delta = np.abs(adv - x.numpy()).max()
    assert delta <= epsilon + 1e-3, f"ART left the ball: {delta}"
    return accuracy(model, torch.from_numpy(adv).float(), y), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-log", type=Path, default=Path("demo_log"))
    parser.add_argument("--epsilon", type=float, nargs="+", default=[16.0, 32.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, help="the first N held-out digits (default: all)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, x, y = load_demo(args.demo_log)
    x, y = x[: args.images], y[: args.images]
    rows = []
    for eps in args.epsilon:
        row = {"epsilon": eps, "images": len(y), "clean": accuracy(model, x, y)}
        row["autoattack"], row["autoattack_s"], details = ours(model, x, y, "autoattack", eps)
        row["autoattack_members"] = details["members"]
        row["strong_100"], row["strong_100_s"], _ = ours(model, x, y, "strong", eps)
        row["art_autoattack"], row["art_autoattack_s"] = art_autoattack(model, x, y, eps)
        rows.append(row)
        print(
            f"L-inf eps={eps:g}, {len(y)} digits: clean {row['clean']:.4f}; robust accuracy "
            f"autoattack {row['autoattack']:.4f} ({row['autoattack_s']:.0f} s), strong-100 "
            f"{row['strong_100']:.4f} ({row['strong_100_s']:.0f} s), ART AutoAttack "
            f"{row['art_autoattack']:.4f} ({row['art_autoattack_s']:.0f} s); ours - ART "
            f"{100 * (row['autoattack'] - row['art_autoattack']):+.1f} points",
            flush=True,
        )
        members = ", ".join(
            f"{name} broke {m['broken']} of {m['attacked']}"
            for name, m in row["autoattack_members"].items()
        )
        print(f"  autoattack members: {members}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
