"""One epoch of each cheap adversarial-training mode, relative to clean training, in one run.

    python bench/cheap_training.py --arch ResNet -d 50 --image-size 64 --batch 16 \\
        --steps 4 --rounds 3 --threads 2

An "epoch" here is ``--steps`` loaded batches (the same for every mode, so the ratios are those
of a real epoch of any length): each mode's training attacker comes from
``train_builders.build_training_attacker`` and each update is ``trainer.train_step``, as a run does.

  clean     --adv-method clean
  PGD-10    the original's recipe at 10 iterations: random target, eps 16, step 16/10,
            20% of batches from the clean image (Feature Denoising Sec 5)
  PGD-2     the same at 2 iterations (step 8)
  FGSM-RS   --adv-method fgsmrs_16: one step of 1.25 eps from a random start (Wong et al. 2020)
  free m=M  --free-replays M: each batch replayed M times, one backward pass each (Shafahi et
            al. 2019, Alg. 1); the recipe divides the epochs by M, so the same training costs
            1/M of its data epochs (column "per recipe")

The modes are timed round-robin, ``--rounds`` times, and each figure is the median: a machine
whose load changes during the run skews every mode alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # make the repository's modules importable from bench/

import nets  # noqa: E402
from adv_model import FreeAttacker  # noqa: E402
from iat import builders  # noqa: E402
from iat.config import Config  # noqa: E402
from iat.data.sources import to_model_input  # noqa: E402
from iat.train import builders as train_builders  # noqa: E402
from iat.train import trainer  # noqa: E402

NUM_CLASSES = 1000
EPSILON = 16  # Feature Denoising Sec 6
LABEL_SMOOTHING = 0.1  # Feature Denoising Sec 5


@dataclasses.dataclass(frozen=True, eq=False)
class Mode:
    name: str
    flags: dict  # Config fields of the mode
    replays: int = 1  # updates per loaded batch (free training)


def modes(free_replays: int) -> list[Mode]:
    return [
        Mode("clean", {"adv_method": "clean"}),
        Mode("PGD-10", {"attack_iter": 10, "attack_epsilon": EPSILON}),
        Mode("PGD-2", {"attack_iter": 2, "attack_epsilon": EPSILON}),
        Mode("FGSM-RS", {"adv_method": f"fgsmrs_{EPSILON}"}),
        Mode(
            f"free m={free_replays}",
            {"attack_epsilon": EPSILON, "attack_iter": 1, "free_replays": free_replays},
            free_replays,
        ),
    ]


def batches(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``--steps`` uint8 batches made model input as the training loop does."""
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.image_size, args.image_size, 3)
    out = []
    for _ in range(args.steps):
        images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g)
        out.append((to_model_input(images, torch.device("cpu")), labels))
    return out


def epoch_fn(args: argparse.Namespace, mode: Mode, data):
    """A function that trains one epoch of `mode` over `data` (its own model and optimizer)."""
    torch.manual_seed(0)
    model = nets.build_model(args.arch, depth=args.depth, num_classes=NUM_CLASSES)
    cfg = Config(fake=True, **mode.flags)
    optimizer = train_builders.build_optimizer(model, cfg)
    attacker = train_builders.build_training_attacker(
        cfg,
        num_classes=NUM_CLASSES,
        precision=builders.attack_precision(False, torch.device("cpu")),
        generator=torch.Generator().manual_seed(0),
    )
    loss = trainer.LossSettings(LABEL_SMOOTHING)
    model.train()

    def epoch() -> None:
        for batch in data:
            for _ in range(mode.replays):
                trainer.train_step(model, model, attacker, optimizer, [batch], loss)
                if isinstance(attacker, FreeAttacker):
                    attacker.advance()

    return epoch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ResNet")
    p.add_argument("-d", "--depth", type=int, default=50)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="loaded batches per epoch")
    p.add_argument("--rounds", type=int, default=3, help="round-robin repetitions (median)")
    p.add_argument("--free-replays", type=int, default=4)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = batches(args)
    runs = {mode: epoch_fn(args, mode, data) for mode in modes(args.free_replays)}
    for mode, epoch in runs.items():  # warm-up: one epoch each (allocator, caches)
        epoch()
        print(f"  warmed up {mode.name}", file=sys.stderr, flush=True)
    times: dict[Mode, list[float]] = {mode: [] for mode in runs}
    for r in range(args.rounds):
        for mode, epoch in runs.items():
            start = time.perf_counter()
            epoch()
            times[mode].append(time.perf_counter() - start)
        print(f"  round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    print_table(args, {mode: statistics.median(t) for mode, t in times.items()})


def print_table(args: argparse.Namespace, seconds: dict[Mode, float]) -> None:
    clean = next(s for mode, s in seconds.items() if mode.name == "clean")
    print(
        f"{args.arch}-{args.depth}, {args.image_size}x{args.image_size}, batch {args.batch}, "
        f"{args.steps} batches per epoch, {args.threads} threads, eager fp32, "
        f"median of {args.rounds} rounds; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}"
    )
    print("| mode | s / epoch | x clean, per data epoch | x clean, per recipe |")
    print("|---|---:|---:|---:|")
    for mode, s in seconds.items():
        print(f"| {mode.name} | {s:.2f} | {s / clean:.2f} | {s / clean / mode.replays:.2f} |")


if __name__ == "__main__":
    main()
