"""Cost model of adversarial training, measured: clean step, attack iteration, PGD-K step.

    python bench/train_step.py --arch ResNet ResNetDenoise -d 50 --image-size 64 --batch 16 \\
        --attack-iter 10 --threads 2 [--variants eager-fp32 compiled-amp] [--memory]
    python bench/train_step.py --arch resnet50 convnext_tiny vit_small_patch16_224 \\
        swin_tiny_patch4_window7_224 --image-size 224 --variants eager-fp32 --memory

Every time is a median over ``--repeats`` runs after ``--warmup`` runs, in one process:
  T_clean  trainer.train_step with a NoOpAttacker (forward + backward + optimizer step);
  T_iter   one attack iteration: the attacker's objective forward + the input gradient only,
           under adv_model.attack_mode (BN in inference mode, parameters frozen);
  T_pgd    trainer.train_step with the PGD-K attacker (the real training code path).
Attack variants: eager or torch.compile'd iteration, fp32 or mixed precision (autocast: bf16 on
CPU, fp16 with loss scale 128 on CUDA). "compiled-amp" is --use-fp16xla. The training step itself
(forward, backward, optimizer) is eager, fp32 or as ``--amp DTYPE`` (the run's --amp: autocast, fp32
weights and loss; fp16 with a GradScaler) makes it, in every variant, as in iat/train/trainer.py.
``--memory`` adds the peak RSS of fresh processes running PGD-0/1/K steps (eager fp32), and of
PGD-K with ``--grad-checkpointing`` for the architectures that take it. Each architecture's
forward MACs per image (FlopCounterMode's FLOPs / 2) and their ratio to the first ``--arch``
are printed beside the step times. ``-d`` defaults to 50, or to an architecture's only depth
(``convnext_tiny``: 18).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # make the repository's modules importable from bench/

import nets  # noqa: E402
from adv_model import NoOpAttacker, PGDAttacker, attack_mode  # noqa: E402
from iat.config import Config  # noqa: E402
from iat.data.sources import to_model_input  # noqa: E402
from iat.train import amp, trainer  # noqa: E402
from iat.train import builders as train_builders  # noqa: E402

# Feature Denoising, Sec 6: epsilon 16; training starts 20% of batches from the clean image.
EPSILON = 16.0
PROB_START_FROM_CLEAN = 0.2
LABEL_SMOOTHING = 0.1  # Feature Denoising, Sec 5
NUM_CLASSES = 1000
VARIANTS = {  # name: (autocast, compiled, autocast type; None: the device's, fp16 on CUDA)
    "eager-fp32": (False, False, None),
    "eager-amp": (True, False, None),
    "compiled-fp32": (False, True, None),
    "compiled-amp": (True, True, None),
    "compiled-bf16": (True, True, torch.bfloat16),  # --use-fp16xla --fast-attack-dtype bfloat16
}


@dataclass(frozen=True)
class Row:
    arch: str
    variant: str
    clean_s: float
    iter_s: float
    pgd_s: float
    first_call_s: float  # the first PGD step, compilation included
    flop_ratio: float  # FLOPs of one attack iteration / FLOPs of one clean step
    macs: float  # multiply-accumulates of one image's forward pass


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times cover it (nothing to do on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fn: Callable[[], object], warmup: int, repeats: int, device: torch.device
) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def depth_of(args: argparse.Namespace, arch: str) -> int:
    """-d if given, else the architecture's only depth, else 50."""
    depths = nets.depths_of(arch)
    return args.depth or (depths[0] if len(depths) == 1 else 50)


def build(args: argparse.Namespace, arch: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    depth = None if args.num_blocks else depth_of(args, arch)
    model = nets.build_model(
        arch,
        depth=depth,
        num_blocks=args.num_blocks,
        num_classes=NUM_CLASSES,
        width=args.width,
        grad_checkpointing=args.grad_checkpointing,
    )
    if args.channels_last_model:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(args.device)
    return model, train_builders.build_optimizer(model, Config(fake=True))


def batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 NHWC batch turned into model input exactly as the training loop does."""
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.image_size, args.image_size, 3)
    images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g).to(args.device)
    x = to_model_input(images, args.device)
    return (x.to(memory_format=torch.channels_last) if args.channels_last_input else x), labels


def attacker_for(num_iter: int, variant: str) -> PGDAttacker:
    autocast, compiled, dtype = VARIANTS[variant]
    return PGDAttacker(
        num_iter,
        EPSILON,
        1.0,
        prob_start_from_clean=PROB_START_FROM_CLEAN,
        num_classes=NUM_CLASSES,
        autocast=autocast,
        compiled=compiled,
        autocast_dtype=dtype,
    )


def step_fn(
    model, optimizer, attack, x, y, precision: amp.TrainingPrecision = amp.FP32
) -> Callable[[], object]:
    """One training step; under `precision` (--amp) with fp16's loss scaler where it needs one."""
    model.train()
    loss = trainer.LossSettings(LABEL_SMOOTHING)
    scaler = amp.build_scaler(precision, x.device) if precision.scaled else None
    return lambda: trainer.train_step(
        model, model, attack, optimizer, [(x, y)], loss, precision, scaler
    )


def step_precision(name: str | None) -> amp.TrainingPrecision:
    """--amp DTYPE's training-step precision, as given (no device fallback: this measures it)."""
    if name is None:
        return amp.FP32
    return amp.TrainingPrecision(getattr(torch, name), f"{name} autocast (--amp)")


def iteration_fn(model: torch.nn.Module, attack: PGDAttacker, x, y) -> Callable[[], object]:
    """One attack iteration as PGDAttacker runs it: objective forward + input gradient."""
    objective = attack.objective(x.device)

    def run() -> torch.Tensor:
        with torch.enable_grad(), attack_mode(model):
            adv = x.detach().requires_grad_(True)
            return torch.autograd.grad(objective(model, adv, y), adv)[0]

    return run


def counted_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def iteration_flop_ratio(model, optimizer, x, y) -> float:
    """FLOPs of an attack iteration over those of a clean step: about 2/3 when the iteration
    skips the weight-gradient convolutions (forward 1 + input gradient 1 vs 1 + 2), about 1
    if it did not. (FlopCounterMode cannot follow autograd.grad, hence backward() here.)"""
    clean = counted_flops(step_fn(model, optimizer, NoOpAttacker(), x, y))
    return iteration_flops(model, x, y) / clean


def iteration_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one attack iteration: the objective's forward and its input gradient, counted
    through backward() with the weights frozen (attack_mode), as FlopCounterMode cannot follow
    the attack's autograd.grad."""
    objective = attacker_for(1, "eager-fp32").objective(x.device)

    def iteration() -> None:
        with torch.enable_grad(), attack_mode(model):
            objective(model, x.detach().requires_grad_(True), y).backward()

    return counted_flops(iteration)


def forward_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates of one image's forward pass (eval mode)."""
    model.eval()
    with torch.no_grad():
        macs = counted_flops(lambda: model(x)) / 2 / x.shape[0]
    model.train()
    return macs


def measure(args: argparse.Namespace, arch: str) -> list[Row]:
    model, optimizer = build(args, arch)
    x, y = batch(args)
    flop_ratio = iteration_flop_ratio(model, optimizer, x, y)
    macs = forward_macs(model, x)
    precision = step_precision(args.amp)
    clean = median_seconds(
        step_fn(model, optimizer, NoOpAttacker(), x, y, precision),
        args.warmup,
        args.repeats,
        args.device,
    )
    rows = []
    for variant in args.variants:
        attack = attacker_for(args.attack_iter, variant)
        pgd_step = step_fn(model, optimizer, attack, x, y, precision)
        start = time.perf_counter()
        pgd_step()
        synchronize(args.device)
        first = time.perf_counter() - start
        iteration = median_seconds(
            iteration_fn(model, attack, x, y), args.warmup, args.repeats, args.device
        )
        pgd = median_seconds(pgd_step, args.warmup, args.repeats, args.device)
        rows.append(Row(arch, variant, clean, iteration, pgd, first, flop_ratio, macs))
        print(f"  measured {arch} {variant}", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[Row], k: int, batch_size: int) -> None:
    print(
        f"| arch | attack | T_clean ms | T_iter ms | T_iter/T_clean | FLOPs iter/clean | "
        f"T_pgd{k} ms | "
        f"T_pgd/(T_clean+{k}T_iter) | PGD-{k} img/s | clean img/s | first step s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        overhead = r.pgd_s / (r.clean_s + k * r.iter_s)
        print(
            f"| {r.arch} | {r.variant} | {r.clean_s * 1e3:.0f} | {r.iter_s * 1e3:.0f} | "
            f"{r.iter_s / r.clean_s:.3f} | {r.flop_ratio:.3f} | {r.pgd_s * 1e3:.0f} | "
            f"{overhead:.3f} | "
            f"{batch_size / r.pgd_s:.1f} | {batch_size / r.clean_s:.1f} | {r.first_call_s:.1f} |"
        )


def print_speedups(rows: list[Row], base_variant: str = "eager-fp32") -> None:
    """Each attack variant's iteration and PGD step relative to eager fp32, per architecture."""
    base = {r.arch: r for r in rows if r.variant == base_variant}
    others = [r for r in rows if r.variant != base_variant and r.arch in base]
    if not others:
        return
    print(f"\n| arch | attack | T_iter / {base_variant} | T_pgd / {base_variant} |")
    print("|---|---|---:|---:|")
    for r in others:
        b = base[r.arch]
        print(f"| {r.arch} | {r.variant} | {r.iter_s / b.iter_s:.3f} | {r.pgd_s / b.pgd_s:.3f} |")


def print_relative(rows: list[Row], base_arch: str) -> None:
    """Each architecture's MACs, attack iteration and steps relative to `base_arch`'s, per
    attack variant."""
    base = {r.variant: r for r in rows if r.arch == base_arch}
    others = [r for r in rows if r.variant in base]
    print(
        f"\n| arch | attack | GMACs / image | MACs / {base_arch} | attack iteration / {base_arch} "
        f"| clean step / {base_arch} | PGD step / {base_arch} |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in others:
        b = base[r.variant]
        print(
            f"| {r.arch} | {r.variant} | {r.macs / 1e9:.3f} | {r.macs / b.macs:.3f} | "
            f"{r.iter_s / b.iter_s:.3f} | {r.clean_s / b.clean_s:.3f} | {r.pgd_s / b.pgd_s:.3f} |"
        )


def peak_rss_mib(
    args: argparse.Namespace, arch: str, num_iter: int, checkpointed: bool = False
) -> float:
    """Peak RSS of a fresh process running two PGD-``num_iter`` training steps (eager fp32)."""
    command = [
        sys.executable,
        __file__,
        "--rss-probe",
        str(num_iter),
        "--arch",
        arch,
        *forwarded_flags(args, arch),
        *(["--grad-checkpointing"] if checkpointed else []),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def forwarded_flags(args: argparse.Namespace, arch: str) -> list[str]:
    flags = ["--image-size", str(args.image_size), "--batch", str(args.batch)]
    flags += ["--threads", str(args.threads), "--width", str(args.width)]
    flags += ["-d", str(depth_of(args, arch))]
    if args.num_blocks:
        flags += ["--num-blocks", *map(str, args.num_blocks)]
    if args.channels_last_input:
        flags.append("--channels-last-input")
    if args.channels_last_model:
        flags.append("--channels-last-model")
    return flags


def rss_probe(args: argparse.Namespace, num_iter: int) -> None:
    model, optimizer = build(args, args.arch[0])
    x, y = batch(args)
    attack = NoOpAttacker() if num_iter == 0 else attacker_for(num_iter, "eager-fp32")
    step = step_fn(model, optimizer, attack, x, y)
    step()
    step()
    print(peak_rss_of_this_process_mib())


def peak_rss_of_this_process_mib() -> float:
    """VmHWM, the peak RSS of this process image (ru_maxrss is not used: after fork + exec it
    starts from the parent's RSS at the fork)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 1024


def print_memory(args: argparse.Namespace) -> None:
    k = args.attack_iter
    print(
        f"\n| arch | peak RSS MiB, clean | PGD-1 | PGD-{k} | PGD-{k} / PGD-1 "
        f"| PGD-{k} --grad-checkpointing |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for arch in args.arch:
        clean, one, many = (peak_rss_mib(args, arch, n) for n in (0, 1, k))
        takes = "grad_checkpointing" in nets.options_of(arch) and not args.grad_checkpointing
        checkpointed = f"{peak_rss_mib(args, arch, k, True):.0f}" if takes else "-"
        print(
            f"| {arch} | {clean:.0f} | {one:.0f} | {many:.0f} | {many / one:.3f} | {checkpointed} |"
        )


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["ResNet"], choices=nets.available_architectures())
    p.add_argument("-d", "--depth", type=int, help="default: 50, or the arch's only depth")
    p.add_argument("--num-blocks", type=int, nargs="+", help="blocks per group, overrides -d")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--attack-iter", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--device", type=torch.device, default=torch.device("cpu"), help="cpu, cuda, cuda:1 ..."
    )
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--channels-last-input", action="store_true", help="channels-last input")
    p.add_argument("--channels-last-model", action="store_true", help="channels-last weights")
    p.add_argument("--memory", action="store_true", help="add the peak-RSS table")
    p.add_argument(
        "--amp", choices=("bfloat16", "float16"), help="the training step under autocast (--amp)"
    )
    p.add_argument("--rss-probe", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_probe is not None:
        rss_probe(args, args.rss_probe)
        return
    print(f"{machine()}; batch {args.batch}, {args.image_size}x{args.image_size}, ", end="")
    print(f"PGD-{args.attack_iter}, training step {step_precision(args.amp).description}, ", end="")
    print(f"median of {args.repeats} after {args.warmup} warm-up\n")
    rows = [row for arch in args.arch for row in measure(args, arch)]
    print_table(rows, args.attack_iter, args.batch)
    print_relative(rows, args.arch[0])
    print_speedups(rows)
    if args.memory:
        print_memory(args)


if __name__ == "__main__":
    main()
