"""Scaling adversarial training to many GPUs: data-parallel (DDP) and sharded (FSDP2), fitted
to what this machine measures, projected to a GPU cluster.

    python bench/scaling.py [--part ddp|sharded|all] [--processes 2 3] [--repeats 10]
    python bench/scaling.py --part sharded --gpus 64 128 256 512 1024 --mfu 0.4 ...

DDP (``--part ddp``):
1. Measures Gloo's all-reduce of fp32 gradients (4 KB to 16 MB) among P processes of this
   machine (``iat.runtime.distributed.spawn``, the demo's launcher) and fits the ring model
       T(S, P) = 2 (P - 1) alpha + 2 (P - 1) / P * S / B
   (P - 1 reduce-scatter and P - 1 all-gather steps of S / P bytes each; alpha: latency per step,
   B: bandwidth), printing measured against fitted times (bench/collectives.py).
2. Projects one training step on N GPUs: the measured single-GPU step (bench/RESULTS.md,
   section 7: one H200, 224x224, batch 64 per GPU) plus the all-reduce of the model's gradients
   with --latency-us and --bandwidth-gbs (defaults: 200 Gb/s InfiniBand per GPU), with no overlap
   of the all-reduce and the backward pass (DDP overlaps them, so the efficiency is a lower
   bound). Weak scaling, as the original (batch 32 per GPU on 128 GPUs, Feature Denoising Sec 5).

Sharded (``--part sharded``, bench/sharded_scaling.py): ViT-L/16, ViT-H/14 and ViT-g/14 under
FSDP2 with PGD-k in the loop: collective volume with and without resharding during the attack,
memory per GPU, projected step time on 64-1,024 GPUs; the formulas (bench/sharding_model.py)
checked here against FSDP2 on 2 Gloo processes, torch's FLOP counter and its saved tensors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # make the repository's modules importable from bench/

import sharded_scaling as sharded  # noqa: E402  (bench/, the script's folder)
from collectives import fit, measure, ring_seconds  # noqa: E402

import nets  # noqa: E402

# One H200, batch 64 at 224x224, step times in ms (bench/RESULTS.md, section 7, GPU table).
MEASURED_STEPS = {
    ("ResNet-152", "PGD-30 fast"): 487,
    ("ResNet-152", "PGD-30 fp32"): 1677,
    ("ResNetDenoise-152", "PGD-30 fast"): 1817,
    ("ResNeXtDenoiseAll-101", "PGD-30 fast"): 1575,
    ("ResNet-152", "clean"): 54,
}
ARCHS = {"ResNet-152": ("ResNet", 152), "ResNetDenoise-152": ("ResNetDenoise", 152),
         "ResNeXtDenoiseAll-101": ("ResNeXtDenoiseAll", 101)}  # fmt: skip
GPUS = (8, 32, 128, 512)


def parameter_bytes() -> dict[str, int]:
    sizes = {}
    for name, (arch, depth) in ARCHS.items():
        model = nets.build_model(arch, depth=depth, num_classes=1000)
        sizes[name] = 4 * sum(p.numel() for p in model.parameters())
    return sizes


def ddp_part(args: argparse.Namespace) -> None:
    """Section 1 of the docstring: the all-reduce fitted here, DDP projected."""
    measured = {n: measure(n, args.repeats) for n in args.processes}
    alpha, bandwidth = fit(measured)
    fitted = f"alpha {alpha * 1e6:.0f} us, B {bandwidth / 1e9:.2f} GB/s"
    print(f"Gloo all-reduce on this machine: {fitted} (ring model, least squares, relative)\n")
    print("| processes | fp32 elements | MB | measured ms | model ms | model / measured |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, times in measured.items():
        for size, seconds in times.items():
            model = ring_seconds(4 * size, n, alpha, bandwidth)
            print(f"| {n} | {size:,} | {4 * size / 1e6:.3g} | {seconds * 1e3:.2f} | "
                  f"{model * 1e3:.2f} | {model / seconds:.2f} |")  # fmt: skip

    alpha_c, bandwidth_c = args.latency_us * 1e-6, args.bandwidth_gbs * 1e9
    sizes = parameter_bytes()
    header = " | ".join(f"N={n}: all-reduce ms, efficiency" for n in GPUS)
    print(f"\nProjection: alpha {args.latency_us:g} us, B {args.bandwidth_gbs:g} GB/s per GPU, "
          "no overlap with the backward pass (a lower bound on efficiency)\n")  # fmt: skip
    print(f"| model | step | grad MB | step ms (1 GPU) | {header} | img/s at N={GPUS[-1]} |")
    print("|---|---|---:|---:|" + "---:|" * (len(GPUS) + 1))
    for (model, step), step_ms in MEASURED_STEPS.items():
        size = sizes[model]
        cells, efficiency = [], 1.0
        for n in GPUS:
            comm_ms = ring_seconds(size, n, alpha_c, bandwidth_c) * 1e3
            efficiency = step_ms / (step_ms + comm_ms)
            cells.append(f"{comm_ms:.0f}, {efficiency:.3f}")
        images = GPUS[-1] * 64 * 1e3 / step_ms * efficiency
        print(f"| {model} | {step} | {size / 1e6:.0f} | {step_ms} | {' | '.join(cells)} | "
              f"{images:,.0f} |")  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.part in ("ddp", "all"):
        ddp_part(args)
    if args.part in ("sharded", "all"):
        sharded.report(args)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices=("ddp", "sharded", "all"), default="all")
    p.add_argument("--processes", type=int, nargs="+", default=[2, 3])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--bandwidth-gbs", type=float, default=25.0, help="GB/s per GPU, projection")
    p.add_argument("--latency-us", type=float, default=10.0, help="per ring step, projection")
    sharded.add_arguments(p)
    args = p.parse_args()
    sharded.check_arguments(p, args)
    return args


if __name__ == "__main__":
    main()
