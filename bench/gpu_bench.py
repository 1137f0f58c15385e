"""The GPU benchmark table: adversarial training's cost on one CUDA device, measured in one run.

    python bench/gpu_bench.py [--arch ResNet-50 ResNet-152 ResNetDenoise-152 \\
        ResNeXtDenoiseAll-101] [--image-size 224] [--max-batch 64] [--iters 10 30]
    python bench/gpu_bench.py --warm-only --arch ResNet-152   # fill the compile cache only
    python bench/gpu_bench.py --profile ResNetDenoise-152      # torch.profiler's top entries
    python bench/gpu_bench.py --arch ResNet-50 --rows rows.jsonl   # also append rows as JSON
    python bench/gpu_bench.py --summarize rows.jsonl           # ratios and projection only
    python bench/gpu_bench.py --arch ResNet-50 --amp bfloat16  # the training step under --amp
    python bench/gpu_bench.py --device cpu --arch ResNet-50 --image-size 32 --max-batch 2 \
        --iters 1 --variants eager-fp32 --warmup 0 --repeats 1   # runs anywhere, FLOPs included

Per architecture, at the largest batch up to --max-batch that fits (halved on out-of-memory):
  T_clean  trainer.train_step with a NoOpAttacker (forward + backward + SGD);
  T_iter   one attack iteration (objective forward + input gradient, attack_mode);
  T_pgdK   trainer.train_step with the PGD-K attacker, for each K of --iters;
  peak     torch.cuda.max_memory_allocated over a PGD-K step (flat in K if the attack frees
           each iteration's graph);
for the attack in eager fp32 and as --use-fp16xla makes it on CUDA (fp16 autocast, loss x128,
torch.compile with CUDA graphs). The training step itself is eager, fp32 or as --amp DTYPE (the
run's --amp: autocast, fp32 weights and loss, fp16 with a GradScaler) makes it, as in
iat/train/trainer.py. "fp32" is what a training run sets on CUDA
(iat.runtime.distributed.select_device): cuDNN convolutions and matrix products may use TF32;
--no-tf32 turns both off. Times are medians of --repeats after --warmup runs
(bench/train_step.py's helpers).

Each step's FLOPs are counted (torch.utils.flop_counter.FlopCounterMode, eager: a clean step,
plus K attack iterations counted through backward() with frozen weights, since the counter
cannot follow the attack's autograd.grad); the table prints the achieved TFLOPS of the largest
K and their share of the device's dense peak (DENSE_PEAKS, each with its source): TF32 (or
fp32 with --no-tf32) and fp16/bf16 tensor cores, for the work is mixed.

Then: the Denoise / plain step ratios, the fast / fp32 ratios, and the GPU-hours the original's
recipe (Feature Denoising Sec 6: 110 epochs of 1.28 M images, PGD-30 for the paper's models)
would take at the measured per-GPU throughput, against the original's 52 h x 128 V100 (ResNet-152)
and 90 h x 128 (ResNetDenoise-152). The projection assumes perfect scaling (no all-reduce cost).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # make the repository's modules importable from bench/

from train_step import (  # noqa: E402  (bench/, the script's folder)
    attacker_for,
    counted_flops,
    iteration_flops,
    iteration_fn,
    machine,
    median_seconds,
    step_fn,
    step_precision,
    synchronize,
)

import nets  # noqa: E402
from adv_model import NoOpAttacker  # noqa: E402
from iat.config import Config  # noqa: E402
from iat.runtime import distributed  # noqa: E402
from iat.train import builders as train_builders  # noqa: E402

NUM_CLASSES = 1000
# compiled-amp: --use-fp16xla on CUDA (fp16, loss x128); compiled-bf16: with --fast-attack-dtype
# bfloat16 (asked for with --variants; bench/gpu_proof.sh measures it on ResNet-152)
VARIANTS = ("eager-fp32", "compiled-amp")
CHOICES = (*VARIANTS, "compiled-bf16")
IMAGES_PER_EPOCH = 1_281_167  # ImageNet-1k train
EPOCHS = 110  # Feature Denoising Sec 6 (ResNet-152 and its Denoise version, PGD-30)
ORIGINAL_GPU_HOURS = {"ResNet-152": 52 * 128, "ResNetDenoise-152": 90 * 128}  # Sec 6, V100s


@dataclass(frozen=True)
class Peak:
    """A GPU's dense (no sparsity) peak TFLOPS, from its maker's datasheet."""

    fp32: float  # plain fp32 (CUDA cores)
    tf32: float  # TF32 tensor cores (what training runs with TF32 on)
    half: float  # fp16 / bf16 tensor cores
    source: str


_H100_SXM = Peak(67.0, 494.7, 989.4, "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column")
# The first name a device's name contains (torch.cuda.get_device_name) gives its peaks; the
# datasheets print sparse figures for the tensor cores, halved here.
DENSE_PEAKS = {
    "H100 PCIe": Peak(51.0, 378.0, 756.5, "NVIDIA H100 datasheet, H100 PCIe column"),
    "H100 NVL": Peak(60.0, 417.5, 835.5, "NVIDIA H100 datasheet, H100 NVL column (per GPU)"),
    "H100": _H100_SXM,
    "H200": Peak(67.0, 494.7, 989.4, "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column"),
    "A100": Peak(19.5, 156.0, 312.0, "NVIDIA A100 Tensor Core GPU datasheet"),
    "L40S": Peak(91.6, 183.0, 362.05, "NVIDIA L40S datasheet"),
    "V100": Peak(15.7, 0.0, 125.0, "NVIDIA Tesla V100 datasheet, SXM2 column (no TF32)"),
}


def dense_peak(name: str) -> Peak | None:
    """The peaks of the device called `name`, or None for a device not in DENSE_PEAKS."""
    return next((peak for key, peak in DENSE_PEAKS.items() if key in name), None)


@dataclass
class Row:
    arch: str
    variant: str
    batch: int
    clean_s: float
    iter_s: float
    first_s: float  # the first PGD step (compilation included)
    pgd_s: dict[int, float]
    peak_gib: dict[int, float]
    step: str = "fp32"  # the training step's precision (--amp)
    clean_flops: float = 0.0  # a clean training step's FLOPs (FlopCounterMode)
    iter_flops: float = 0.0  # one attack iteration's

    def pgd_flops(self, k: int) -> float:
        """A PGD-k training step's FLOPs: the clean step and k attack iterations."""
        return self.clean_flops + k * self.iter_flops


def parse_arch(word: str) -> tuple[str, int]:
    name, _, depth = word.rpartition("-")
    if name not in nets.available_architectures() or not depth.isdigit():
        raise argparse.ArgumentTypeError(f"{word!r}: expected ARCH-DEPTH, e.g. ResNet-152")
    return name, int(depth)


def build(word: str, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    arch, depth = parse_arch(word)
    model = nets.build_model(arch, depth=depth, num_classes=NUM_CLASSES)
    model = model.to(device, memory_format=torch.channels_last)  # as builders does on CUDA
    return model, train_builders.build_optimizer(model, Config(fake=True))


def batch(size: int, image_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size, image_size, image_size, 3), generator=g)
    labels = torch.randint(0, NUM_CLASSES, (size,), generator=g).to(device)
    images = images.to(torch.uint8)
    pinned = images.pin_memory() if device.type == "cuda" else images
    x = pinned.to(device).permute(0, 3, 1, 2).float()
    return x, labels  # channels-last in memory, as iat.data.sources.to_model_input on CUDA


def fitting_batch(model, optimizer, args: argparse.Namespace) -> int:
    """The largest batch up to --max-batch (halving) whose PGD-1 step fits in memory (on the
    CPU: --max-batch)."""
    size = args.max_batch
    if args.device.type != "cuda":
        return size
    while size >= 1:
        try:
            x, y = batch(size, args.image_size, args.device)
            step_fn(model, optimizer, attacker_for(1, "eager-fp32"), x, y)()
            torch.cuda.synchronize(args.device)
            return size
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            size //= 2
    raise SystemExit("gpu_bench: not even a batch of 1 fits")


def peak_gib(fn, device: torch.device) -> float:
    """Peak CUDA memory of `fn`; NaN elsewhere."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def measure(word: str, args: argparse.Namespace) -> list[Row]:
    model, optimizer = build(word, args.device)
    size = fitting_batch(model, optimizer, args)
    x, y = batch(size, args.image_size, args.device)
    precision = step_precision(args.amp)
    clean_step = step_fn(model, optimizer, NoOpAttacker(), x, y, precision)
    clean_flops = counted_flops(step_fn(model, optimizer, NoOpAttacker(), x, y))
    iter_flops = iteration_flops(model, x, y)
    clean = median_seconds(clean_step, args.warmup, args.repeats, args.device)
    rows = []
    for variant in args.variants:
        start = time.perf_counter()
        step_fn(model, optimizer, attacker_for(1, variant), x, y, precision)()
        synchronize(args.device)
        first = time.perf_counter() - start
        iteration = median_seconds(
            iteration_fn(model, attacker_for(1, variant), x, y),
            args.warmup,
            args.repeats,
            args.device,
        )
        pgd, peak = {}, {}
        for k in args.iters:
            step = step_fn(model, optimizer, attacker_for(k, variant), x, y, precision)
            peak[k] = peak_gib(step, args.device)
            pgd[k] = median_seconds(step, 0, args.repeats, args.device)
        step = args.amp or "fp32"
        rows.append(
            Row(
                word,
                variant,
                size,
                clean,
                iteration,
                first,
                pgd,
                peak,
                step,
                clean_flops,
                iter_flops,
            )
        )
        print(f"  measured {word} {variant}", file=sys.stderr, flush=True)
    return rows


def print_rows(rows: list[Row], iters: list[int], peak: Peak | None, tf32: bool = True) -> None:
    k = max(iters)
    for r in rows:
        pgd = " | ".join(f"{r.pgd_s[k] * 1e3:.0f}" for k in iters)
        rate = " | ".join(f"{r.batch / r.pgd_s[k]:.0f}" for k in iters)
        memory = " | ".join(f"{r.peak_gib[k]:.1f}" for k in iters)
        tflops = r.pgd_flops(k) / r.pgd_s[k] / 1e12
        print(
            f"| {r.arch} | {r.variant} | {r.step} | {r.batch} | {r.clean_s * 1e3:.0f} | "
            f"{r.iter_s * 1e3:.1f} | {pgd} | {r.batch / r.clean_s:.0f} | {rate} | {memory} | "
            f"{r.first_s:.1f} | {r.pgd_flops(k) / r.batch / 1e9:.1f} | {tflops:.3g} | "
            f"{peak_shares(tflops, peak, tf32)} |",
            flush=True,
        )


def peak_shares(tflops: float, peak: Peak | None, tf32: bool) -> str:
    """The share of the device's dense TF32 (fp32 without TF32) and 16-bit peaks."""
    if peak is None:
        return "- | -"
    wide = peak.tf32 if tf32 and peak.tf32 else peak.fp32
    return f"{100 * tflops / wide:.1f} % | {100 * tflops / peak.half:.1f} %"


def print_header(iters: list[int], tf32: bool = True) -> None:
    k = max(iters)
    pgd = " | ".join(f"T_pgd{k} ms" for k in iters)
    rate = " | ".join(f"PGD-{k} img/s" for k in iters)
    memory = " | ".join(f"peak GiB PGD-{k}" for k in iters)
    wide = "TF32" if tf32 else "fp32"
    print(
        f"| model | attack | step | batch | T_clean ms | T_iter ms | {pgd} | clean img/s | "
        f"{rate} | {memory} | first PGD step s | GFLOP/image PGD-{k} | TFLOPS PGD-{k} | "
        f"% dense {wide} peak | % dense fp16/bf16 peak |"
    )
    print("|---|---|---|---:|---:|---:|" + "---:|" * (3 * len(iters) + 6), flush=True)


def print_ratios(rows: list[Row], iters: list[int]) -> None:
    by = {(r.arch, r.variant): r for r in rows}
    print(
        "\n| model | fast attack | T_iter fp32 / fast | T_pgd fp32 / fast (per K) "
        "| peak PGD-max / PGD-min (fp32) |"
    )
    print("|---|---|---:|---:|---:|")
    for arch in dict.fromkeys(r.arch for r in rows):
        slow = by.get((arch, "eager-fp32"))
        for variant in ("compiled-amp", "compiled-bf16"):
            fast = by.get((arch, variant))
            if slow is None or fast is None:
                continue
            per_k = ", ".join(f"{k}: {slow.pgd_s[k] / fast.pgd_s[k]:.2f}" for k in iters)
            flat = max(slow.peak_gib.values()) / min(slow.peak_gib.values())
            print(
                f"| {arch} | {variant} | {slow.iter_s / fast.iter_s:.2f} | {per_k} | {flat:.3f} |"
            )
    pairs = [("ResNetDenoise-152", "ResNet-152"), ("ResNeXtDenoiseAll-101", "ResNet-152")]
    print("\n| models | attack | clean step ratio | PGD step ratio (per K) |")
    print("|---|---|---:|---:|")
    for left, right in pairs:
        for variant in VARIANTS:
            a, b = by.get((left, variant)), by.get((right, variant))
            if a is None or b is None:
                continue
            # per image: the two may run at different batch sizes
            per_k = ", ".join(
                f"{k}: {(a.pgd_s[k] / a.batch) / (b.pgd_s[k] / b.batch):.2f}" for k in iters
            )
            clean = (a.clean_s / a.batch) / (b.clean_s / b.batch)
            print(f"| {left} / {right} | {variant} | {clean:.2f} | {per_k} |")


def print_projection(rows: list[Row], k: int = 30) -> None:
    print(
        f"\nProjected GPU-hours of the original's recipe ({EPOCHS} epochs x {IMAGES_PER_EPOCH:,} "
        f"images, PGD-{k}) at the measured per-GPU PGD-{k} throughput, perfect scaling:"
    )
    print("\n| model | attack | img/s per GPU | GPU-hours | original (128 V100) | ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if k not in r.pgd_s:
            continue
        rate = r.batch / r.pgd_s[k]
        hours = EPOCHS * IMAGES_PER_EPOCH / rate / 3600
        original = ORIGINAL_GPU_HOURS.get(r.arch)
        theirs = f"{original:,}" if original else "-"
        ratio = f"{hours / original:.2f}" if original else "-"
        print(f"| {r.arch} | {r.variant} | {rate:.0f} | {hours:,.0f} | {theirs} | {ratio} |")


def profile(word: str, args: argparse.Namespace) -> None:
    """torch.profiler's top entries (self CUDA time) of one PGD-10 step, fp32 and fast."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, optimizer = build(word, args.device)
    x, y = batch(args.max_batch, args.image_size, args.device)
    for variant in args.variants:
        step = step_fn(model, optimizer, attacker_for(10, variant), x, y)
        step()
        step()
        torch.cuda.synchronize(args.device)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(args.device)
        print(f"\n### {word}, PGD-10 training step, attack {variant}, batch {args.max_batch}\n")
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.top)
        print("```\n" + table + "\n```", flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--arch",
        nargs="+",
        type=str,
        default=["ResNet-50", "ResNet-152", "ResNetDenoise-152", "ResNeXtDenoiseAll-101"],
    )
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--iters", type=int, nargs="+", default=[10, 30])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=CHOICES)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", type=torch.device, default=torch.device("cuda", 0))
    p.add_argument("--no-header", action="store_true", help="rows only (to append to a table)")
    p.add_argument("--rows", type=Path, help="append each measured row to this JSON-lines file")
    p.add_argument("--summarize", type=Path, help="print the ratio tables of a --rows file")
    p.add_argument("--no-tf32", action="store_true", help="plain fp32 products and convolutions")
    p.add_argument(
        "--amp", choices=("bfloat16", "float16"), help="the training step under autocast (--amp)"
    )
    p.add_argument("--warm-only", action="store_true", help="compile the fast attack, no timing")
    p.add_argument("--profile", metavar="ARCH-DEPTH", help="profile one model instead")
    p.add_argument("--top", type=int, default=15, help="--profile: rows of the table")
    args = p.parse_args()
    for word in args.arch + ([args.profile] if args.profile else []):
        try:
            parse_arch(word)
        except argparse.ArgumentTypeError as e:
            p.error(str(e))
    return args


def read_rows(path: Path) -> list[Row]:
    rows = []
    for line in path.read_text().splitlines():
        fields = json.loads(line)
        for key in ("pgd_s", "peak_gib"):  # JSON object keys are strings
            fields[key] = {int(k): v for k, v in fields[key].items()}
        rows.append(Row(**fields))
    return rows


def main() -> None:
    args = parse_args()
    if args.summarize:
        rows = read_rows(args.summarize)
        iters = sorted(set.intersection(*(set(r.pgd_s) for r in rows)))
        print_ratios(rows, iters)
        print_projection(rows, max(iters))
        return
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; nothing measured (--device cpu measures the CPU)")
        return
    if args.device.type == "cuda" and args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
    elif args.device.type == "cuda":
        distributed.select_device(distributed.detect())  # the training run's CUDA settings (TF32)
    if args.profile:
        profile(args.profile, args)
        return
    if args.warm_only:
        for word in args.arch:
            model, optimizer = build(word, args.device)
            x, y = batch(args.max_batch, args.image_size, args.device)
            step_fn(model, optimizer, attacker_for(1, "compiled-amp"), x, y)()
            torch.cuda.synchronize(args.device)
            print(f"gpu_bench: compiled the fast attack of {word}", flush=True)
        return
    cuda = args.device.type == "cuda"
    name = torch.cuda.get_device_name(args.device) if cuda else machine()
    peak = dense_peak(name) if cuda else None
    tf32 = not args.no_tf32
    if not args.no_header:
        source = f"dense peaks: {peak.source}" if peak else "no dense peak known for this device"
        where = (
            f"{name}, torch {torch.__version__}, TF32 {'on' if tf32 else 'off'}" if cuda else name
        )
        print(
            f"{where}; {args.image_size}x{args.image_size}, median of "
            f"{args.repeats} after {args.warmup} warm-up; {source}\n"
        )
        print_header(args.iters, tf32)
    rows = []
    for word in args.arch:
        measured = measure(word, args)
        print_rows(measured, args.iters, peak, tf32)
        if args.rows:
            with args.rows.open("a") as f:
                f.writelines(json.dumps(dataclasses.asdict(r)) + "\n" for r in measured)
        rows += measured
    if len(args.arch) > 1:  # one model per process (gpu_proof.sh): --summarize at the end
        print_ratios(rows, args.iters)
        print_projection(rows, max(args.iters))


if __name__ == "__main__":
    main()
