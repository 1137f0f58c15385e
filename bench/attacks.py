"""The cost of each evaluation attacker per image, relative to PGD-10, measured in one run.

    python bench/attacks.py [--arch ResNet --num-blocks 1 1 1 1 --width 32] [--image-size 64]
        [--batch 16] [--attack-iter 10] [--epsilon 16 0] [--threads 2] [--repeats 3]

Same model (random weights), same batch, same process. The labels are the model's own clean
predictions, so that every example starts correctly classified (APGD and `strong` skip the
misclassified ones). Two figures per attacker:
  time     median over --repeats calls of ``attacker.attack`` (after one warm-up call), per image;
  passes   images through the model (forward passes, each with its input gradient or not),
           per image: the machine-independent part of the cost.
Both relative to PGD-10 (``PGDAttacker(10, eps, eps / 10, target="random")``). Attacks that
stop on broken examples (restarts, APGD-T's targets, ``strong``'s members) cost what the
model's robustness leaves them: epsilon 0 breaks nothing and gives their upper bound.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # make the repository's modules importable from bench/

import nets  # noqa: E402
from adv_model import Attacker, AttackSettings, PGDAttacker, create_attacker  # noqa: E402

NUM_CLASSES = 1000
REFERENCE = "pgd-10"
L2_SCALE = 40.0  # L2 radius per unit of L-inf radius on 3x64x64 (sqrt(d) ~ 110; a milder ball)
L1_SCALE = 2000.0


class PassCounter(nn.Module):
    """Counts the images that go through ``inner`` (the sum of the batch sizes of its calls)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.inner(x)


def attackers(k: int, eps: float) -> dict[str, Attacker]:
    """The registry's attackers at iterations `k` and radius `eps` (L-inf; L2 and L1 scaled)."""

    def make(name: str, scale: float = 1.0, **options) -> Attacker:
        radius = eps * scale
        settings = AttackSettings(k, radius, radius / k, num_classes=NUM_CLASSES, **options)
        return create_attacker(name, settings)

    return {
        REFERENCE: PGDAttacker(10, eps, eps / 10, target="random"),
        f"pgd-{k} untargeted": make("pgd", target=None),
        f"pgd-{k} untargeted cw": make("pgd", target=None, loss="cw"),
        f"pgd-{k} L2": make("pgd", target=None, norm="2", scale=L2_SCALE),
        f"pgd-{k} random target x3 restarts": make("pgd", restarts=3),
        "fgm L-inf": make("fgm", target=None),
        "fgm L2": make("fgm", target=None, norm="2", scale=L2_SCALE),
        "fgm L1": make("fgm", target=None, norm="1", scale=L1_SCALE),
        "fgm-minimal (eps_step 1)": make("fgm-minimal", target=None),
        f"apgd-ce-{k}": make("apgd-ce"),
        f"apgd-ce-{k} L2": make("apgd-ce", norm="2", scale=L2_SCALE),
        f"apgd-t-{k} (9 targets)": make("apgd-t"),
        f"strong-{k}": make("strong"),
        f"apgd-dlr-{k}": make("apgd-dlr"),
        f"fab-t-{k} (9 targets)": make("fab-t"),
        "square (1000 queries)": make("square", queries=1000),
        f"autoattack-{k} (5000 queries)": make("autoattack"),
    }


def measure(
    attacker: Attacker, model: PassCounter, images: torch.Tensor, labels: torch.Tensor, repeats: int
) -> tuple[float, float]:
    """(median seconds per image, images through the model per image) of ``attacker``."""
    times = []
    device = images.device
    for r in range(repeats + 1):
        model.images = 0
        start = time.perf_counter()
        attacker.attack(model, images, labels, generator=torch.Generator(device).manual_seed(r))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the time covers the queued GPU work
        if r:  # the first call warms up
            times.append(time.perf_counter() - start)
    batch = images.shape[0]
    return statistics.median(times) / batch, model.images / batch


def build(args: argparse.Namespace) -> tuple[PassCounter, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    depth = None if args.num_blocks else args.depth
    model = nets.build_model(
        args.arch,
        depth=depth,
        num_blocks=args.num_blocks,
        num_classes=NUM_CLASSES,
        width=args.width,
    ).eval()
    if args.device.type == "cuda":  # the layout iat.builders gives a model on CUDA
        model = model.to(args.device, memory_format=torch.channels_last)
    shape = (args.batch, 3, args.image_size, args.image_size)
    images = torch.rand(shape, device=args.device) * 255
    with torch.no_grad():
        labels = model(images).argmax(dim=1)
    return PassCounter(model), images, labels


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ResNet")
    p.add_argument("-d", "--depth", type=int, default=50)
    p.add_argument("--num-blocks", type=int, nargs=4, default=[1, 1, 1, 1])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--attack-iter", type=int, default=10)
    p.add_argument("--epsilon", type=float, nargs="+", default=[16.0, 0.0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", type=torch.device, default=torch.device("cpu"), help="or cuda")
    p.add_argument("--only", nargs="+", help="just these attackers (and the PGD-10 reference)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, images, labels = build(args)
    print(
        f"{device_name(args.device)}, torch "
        f"{torch.__version__}; {args.arch} blocks {args.num_blocks} width {args.width}, "
        f"{args.image_size}x{args.image_size}, batch {args.batch}, median of {args.repeats}"
    )
    for eps in args.epsilon:
        rows = {
            name: measure(attacker, model, images, labels, args.repeats)
            for name, attacker in attackers(args.attack_iter, eps).items()
            if not args.only or name == REFERENCE or name in args.only
        }
        ref_time, ref_passes = rows[REFERENCE]
        print(f"\nL-inf epsilon {eps:g} (L2 {eps * L2_SCALE:g}, L1 {eps * L1_SCALE:g})")
        print(f"| attacker | ms/image | time / {REFERENCE} | passes/image | passes / {REFERENCE} |")
        print("|---|---:|---:|---:|---:|")
        for name, (seconds, passes) in rows.items():
            print(
                f"| {name} | {seconds * 1e3:.2f} | {seconds / ref_time:.2f} | {passes:.1f} | "
                f"{passes / ref_passes:.2f} |"
            )


if __name__ == "__main__":
    main()
