"""Cost of each denoising operation (Feature Denoising Sec 4.1) in a ResNetDenoise training step.

    python bench/denoise_ops.py -d 50 --image-size 64 --batch 8 --threads 2

For the plain ResNet and for ResNetDenoise with every registered op, in one process: the clean
training step (forward + backward + SGD, ``trainer.train_step`` with a ``NoOpAttacker``) and one
attack iteration (forward + input gradient), the minimum over ``--rounds`` interleaved rounds;
and the FLOPs of the training step as ``torch.utils.flop_counter.FlopCounterMode`` counts them
(convolutions, matrix products and attention: the 1x1 convs and non-local products count, the
mean and median filters themselves do not). "time/FLOPs overhead" divides the extra time over
ResNet by the extra FLOPs over ResNet: 1 means the op costs its share of multiply-accumulates.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # make the repository's modules importable from bench/

from train_step import (  # noqa: E402  (bench/, the script's folder)
    batch,
    counted_flops,
    iteration_fn,
    machine,
    step_fn,
    synchronize,
)

import nets  # noqa: E402
from adv_model import NoOpAttacker, PGDAttacker  # noqa: E402
from iat.config import Config  # noqa: E402
from iat.train import builders as train_builders  # noqa: E402

NUM_CLASSES = 1000


@dataclass(frozen=True)
class Row:
    name: str
    step_s: float
    iter_s: float
    flops: int


@dataclass
class Candidate:
    """One model under measurement: its step and iteration callables and the times so far."""

    name: str
    step: Callable[[], object]
    iteration: Callable[[], object]
    flops: int
    step_times: list[float] = field(default_factory=list)
    iter_times: list[float] = field(default_factory=list)


def build(args: argparse.Namespace, arch: str, op: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    depth = None if args.num_blocks else args.depth
    model = nets.build_model(
        arch,
        depth=depth,
        num_blocks=args.num_blocks,
        num_classes=NUM_CLASSES,
        width=args.width,
        denoise_op=op,
        denoise_window=args.window if op and nets.DENOISE_OPS[op].local else 3,
    )
    if args.device.type == "cuda":  # the layout iat.builders gives a model on CUDA
        model = model.to(memory_format=torch.channels_last)
    return model.to(args.device)


def candidate(args: argparse.Namespace, name: str, model: torch.nn.Module) -> Candidate:
    optimizer = train_builders.build_optimizer(model, Config(fake=True))
    x, y = batch(args)
    step = step_fn(model, optimizer, NoOpAttacker(), x, y)
    attack = PGDAttacker(1, 16.0, 1.0, num_classes=NUM_CLASSES)
    return Candidate(name, step, iteration_fn(model, attack, x, y), counted_flops(step))


def timed(fn: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure(args: argparse.Namespace, candidates: list[Candidate]) -> list[Row]:
    """Round-robin: every round times each model's step and iteration once, so that load from
    other processes on a shared machine hits all models alike; the minimum over rounds is kept
    (interference only ever adds time)."""
    for c in candidates:
        for _ in range(args.warmup):
            c.step()
            c.iteration()
    for round_index in range(args.rounds):
        for c in candidates:
            c.step_times.append(timed(c.step, args.device))
            c.iter_times.append(timed(c.iteration, args.device))
        print(f"  round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
    return [Row(c.name, min(c.step_times), min(c.iter_times), c.flops) for c in candidates]


def print_table(rows: list[Row]) -> None:
    base = rows[0]
    print(
        "| model | step ms | step / ResNet | iter ms | iter / ResNet | GFLOPs step | "
        "FLOPs / ResNet | time/FLOPs overhead |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        extra_flops = r.flops / base.flops - 1
        extra_time = r.step_s / base.step_s - 1
        ratio = f"{extra_time / extra_flops:.1f}" if r is not base else "-"
        print(
            f"| {r.name} | {r.step_s * 1e3:.0f} | {r.step_s / base.step_s:.3f} | "
            f"{r.iter_s * 1e3:.0f} | {r.iter_s / base.iter_s:.3f} | {r.flops / 1e9:.2f} | "
            f"{r.flops / base.flops:.3f} | {ratio} |"
        )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-d", "--depth", type=int, default=50)
    p.add_argument("--num-blocks", type=int, nargs=4, help="blocks per group, overrides -d")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--window", type=int, default=3, help="window of the local ops")
    p.add_argument("--ops", nargs="+", default=nets.available_denoise_ops())
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per model first")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds over all models")
    p.add_argument("--channels-last-input", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    size = f"blocks {args.num_blocks}" if args.num_blocks else f"depth {args.depth}"
    print(f"{machine()}; {size}, batch {args.batch}, {args.image_size}x{args.image_size}, ", end="")
    print(f"window {args.window}, minimum of {args.rounds} interleaved rounds\n")
    candidates = [candidate(args, "ResNet", build(args, "ResNet", None))]
    for op in args.ops:
        model = build(args, "ResNetDenoise", op)
        candidates.append(candidate(args, f"ResNetDenoise {op}", model))
    print_table(measure(args, candidates))


if __name__ == "__main__":
    main()
