"""Data-parallel scaling: a ring all-reduce model, fitted here, projected to a GPU cluster.

    python bench/scaling.py [--processes 2 3] [--repeats 10] [--bandwidth-gbs 25 --latency-us 10]

1. Measures Gloo's all-reduce of fp32 gradients (4 KB to 16 MB) among P processes of this
   machine (``iat.runtime.distributed.spawn``, the demo's launcher) and fits the ring model
       T(S, P) = 2 (P - 1) alpha + 2 (P - 1) / P * S / B
   (P - 1 reduce-scatter and P - 1 all-gather steps of S / P bytes each; alpha: latency per step,
   B: bandwidth), printing measured against fitted times.
2. Projects one training step on N GPUs: the measured single-GPU step (bench/RESULTS.md,
   section 7: one H200, 224x224, batch 64 per GPU) plus the all-reduce of the model's gradients
   with --latency-us and --bandwidth-gbs (defaults: 200 Gb/s InfiniBand per GPU), with no overlap
   of the all-reduce and the backward pass (DDP overlaps them, so the efficiency is a lower
   bound). Weak scaling, as the original (batch 32 per GPU on 128 GPUs, Feature Denoising Sec 5).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # make the repository's modules importable from bench/

import nets  # noqa: E402
from iat.runtime import distributed  # noqa: E402

SIZES = (1_000, 10_000, 100_000, 1_000_000, 4_000_000)  # fp32 elements: 4 KB .. 16 MB
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


def _time_all_reduce(env: distributed.DistEnv, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(env, torch.device("cpu"), timeout_s=120)
    times = {}
    for size in SIZES:
        tensor = torch.ones(size)
        distributed.all_reduce_sum(tensor)  # warm-up: connections, buffers
        samples = []
        for _ in range(repeats):
            distributed.barrier()
            start = time.perf_counter()
            distributed.all_reduce_sum(tensor)
            samples.append(time.perf_counter() - start)
        times[size] = min(samples)  # the least disturbed by other processes of the machine
    slowest = torch.tensor([times[s] for s in SIZES], dtype=torch.float64)
    torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
    if env.rank == 0:
        Path(out).write_text(json.dumps(dict(zip(map(str, SIZES), slowest.tolist(), strict=True))))
    distributed.cleanup()


def measure(processes: int, repeats: int) -> dict[int, float]:
    """Fastest seconds of an all-reduce of each size (the slowest rank's), on ``processes``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.json")
        distributed.spawn(_time_all_reduce, processes, (repeats, out))
        return {int(k): v for k, v in json.loads(Path(out).read_text()).items()}


def ring_terms(size_bytes: float, processes: int) -> tuple[float, float]:
    """The ring model's coefficients of alpha and of 1 / B."""
    return 2 * (processes - 1), 2 * (processes - 1) / processes * size_bytes


def fit(measured: dict[int, dict[int, float]]) -> tuple[float, float]:
    """Least-squares alpha (s) and B (bytes/s) over every (P, size), relative errors weighted."""
    rows, targets = [], []
    for processes, times in measured.items():
        for size, seconds in times.items():
            a, b = ring_terms(4 * size, processes)
            rows.append([a / seconds, b / seconds])
            targets.append(1.0)
    (alpha, inv_bandwidth), *_ = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)
    return float(alpha), float(1 / inv_bandwidth)


def ring_seconds(size_bytes: float, processes: int, alpha: float, bandwidth: float) -> float:
    a, b = ring_terms(size_bytes, processes)
    return a * alpha + b / bandwidth


def parameter_bytes() -> dict[str, int]:
    sizes = {}
    for name, (arch, depth) in ARCHS.items():
        model = nets.build_model(arch, depth=depth, num_classes=1000)
        sizes[name] = 4 * sum(p.numel() for p in model.parameters())
    return sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, nargs="+", default=[2, 3])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--bandwidth-gbs", type=float, default=25.0, help="GB/s per GPU, projection")
    p.add_argument("--latency-us", type=float, default=10.0, help="per ring step, projection")
    args = p.parse_args()

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


if __name__ == "__main__":
    main()
