"""Two speed-ups of the attack, each with and without: speed and sameness.

    python bench/attack_speedups.py --change bn-folding --variants eager-fp32 eager-amp
    python bench/attack_speedups.py --change channels-last-pool --variants eager-fp32 eager-amp

(ResNet-50, 64x64, batch 16, PGD-10, 2 threads by default.) The changes:
  bn-folding          each ConvBN's inference-mode BatchNorm folded into its convolution by
                      ``attack_mode`` (off: ``ConvBN.fold_batchnorm`` replaced by a no-op);
  channels-last-pool  the stem max-pool computed in channels-last on the CPU (off: PyTorch's
                      NCHW kernel, ``F.max_pool2d``, as before).

In one process, alternating call by call so that machine drift hits both sides alike:
  T_iter  one attack iteration (objective forward + input gradient, under ``attack_mode``),
  T_pgd   ``trainer.train_step`` with PGD-K (the training code path),
each with the change on (the default) and off (in this process only). Medians over ``--repeats``
calls after ``--warmup``. Also printed: the cost of one fold of every ConvBN (once per attack),
and PGD-K's outcome with and without the change (same seeds): the share of pixels that differ,
the attack's loss and its success rate.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # make the repository's modules importable from bench/
    sys.path.insert(0, str(REPO / "bench"))

import train_step  # noqa: E402

from nets.layers import ConvBN, MaxPool2dSame, _pad_hw  # noqa: E402


def nchw_max_pool(self: MaxPool2dSame, x: torch.Tensor) -> torch.Tensor:
    """MaxPool2dSame as before channels-last-pool: PyTorch's kernel on the NCHW tensor."""
    top, bottom, left, right = _pad_hw(x, self.kernel, self.stride, 1)
    x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
    return F.max_pool2d(x, self.kernel, self.stride)


OFF = {  # change: (class, method, its replacement when off)
    "bn-folding": (ConvBN, "fold_batchnorm", lambda self, low_precision=None: None),
    "channels-last-pool": (MaxPool2dSame, "forward", nchw_max_pool),
}


@contextlib.contextmanager
def changed(change: str, on: bool) -> Iterator[None]:
    """The attack with `change` (the default) or without it."""
    if on:
        yield
        return
    cls, name, replacement = OFF[change]
    kept = cls.__dict__[name]
    setattr(cls, name, replacement)
    try:
        yield
    finally:
        setattr(cls, name, kept)


def alternating_medians(
    fn: Callable[[], object], warmup: int, repeats: int, change: str
) -> dict[bool, tuple[float, float]]:
    """{change on/off: (median s, min s)} of `fn`, the two sides called in turn."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for k in range(warmup + repeats):
        for on in (True, False):
            with changed(change, on):
                start = time.perf_counter()
                fn()
                seconds = time.perf_counter() - start
            if k >= warmup:
                times[on].append(seconds)
    return {on: (statistics.median(t), min(t)) for on, t in times.items()}


def fold_seconds(model: torch.nn.Module, repeats: int = 5) -> float:
    """Median cost of folding every ConvBN once (what entering ``attack_mode`` adds)."""
    convs = [m for m in model.modules() if isinstance(m, ConvBN)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for m in convs:
            m.fold_batchnorm()
        times.append(time.perf_counter() - start)
        for m in convs:
            m.unfold_batchnorm()
    return statistics.median(times)


def pgd_outcome(model, variant: str, num_iter: int, x, y, change: str, on: bool):
    """PGD-K's images (seeded) and, on them, the attack's loss (cross-entropy toward its
    targets) and success rate, in the model's eval mode."""
    attacker = train_step.attacker_for(num_iter, variant)
    attacker.generator = torch.Generator().manual_seed(0)
    with changed(change, on):
        adv, targets = attacker.attack(model, x, y)
    model.eval()
    with torch.no_grad():
        logits = model(adv)
    model.train()
    loss = F.cross_entropy(logits, targets).item()
    return adv, loss, (logits.argmax(1) == targets).float().mean().item()


def sameness(model, variant: str, num_iter: int, x, y, change: str) -> tuple[float, str, str]:
    """PGD-K with `change` on vs off, same seeds: (fraction of pixels that differ, the attack's
    loss on / off, its success rate on / off). A sign-gradient step turns a rounding-level
    change of a near-zero gradient into a whole step, so single pixels part; the attack's
    outcome is what must not change."""
    on, loss_on, success_on = pgd_outcome(model, variant, num_iter, x, y, change, True)
    off, loss_off, success_off = pgd_outcome(model, variant, num_iter, x, y, change, False)
    share = (on != off).float().mean().item()
    return share, f"{loss_on:.4f} / {loss_off:.4f}", f"{success_on:.3f} / {success_off:.3f}"


def run(args: argparse.Namespace, arch: str) -> None:
    model, optimizer = train_step.build(args, arch)
    x, y = train_step.batch(args)
    print(f"{arch}: one fold of every ConvBN {1000 * fold_seconds(model):.1f} ms")
    print("| arch | attack | T_iter ms on / off | ratio | T_pgd ms on / off | ratio |"
          " PGD pixels differing | attack loss on / off | attack success on / off |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant in args.variants:
        attack = train_step.attacker_for(1, variant)
        it = alternating_medians(
            train_step.iteration_fn(model, attack, x, y), args.warmup, args.repeats, args.change
        )
        pgd_attack = train_step.attacker_for(args.attack_iter, variant)
        step = train_step.step_fn(model, optimizer, pgd_attack, x, y)
        pgd = alternating_medians(step, 1, args.step_repeats, args.change)
        share, loss, success = sameness(model, variant, args.attack_iter, x, y, args.change)
        print(
            f"| {arch} | {variant} | {1000 * it[True][0]:.0f} / {1000 * it[False][0]:.0f} | "
            f"{it[True][0] / it[False][0]:.3f} | {1000 * pgd[True][0]:.0f} / "
            f"{1000 * pgd[False][0]:.0f} | {pgd[True][0] / pgd[False][0]:.3f} | "
            f"{share:.3f} | {loss} | {success} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--change", choices=list(OFF), default="bn-folding")
    parser.add_argument("--arch", nargs="+", default=["ResNet"])
    parser.add_argument("-d", "--depth", type=int, default=50)
    parser.add_argument("--num-blocks", type=int, nargs="+", default=None)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--attack-iter", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9, help="attack iterations timed")
    parser.add_argument("--step-repeats", type=int, default=5, help="PGD-K steps timed")
    parser.add_argument(
        "--variants", nargs="+", default=["eager-fp32", "eager-amp"], choices=train_step.VARIANTS
    )
    args = parser.parse_args()
    args.device = torch.device("cpu")
    args.grad_checkpointing = args.channels_last_model = args.channels_last_input = False
    torch.set_num_threads(args.threads)
    print(f"{train_step.machine()}; change: {args.change}")
    for arch in args.arch:
        run(args, arch)


if __name__ == "__main__":
    main()
