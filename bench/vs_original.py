"""This project's PGD-K training step beside the original release's (TensorFlow 1 + tensorpack),
measured in one run on one machine: ResNet-50, 64x64, batch 16, PGD-10, 2 threads by default.

    python bench/vs_original.py --original /path/orig --original-python /path/venv/bin/python \\
        [--rounds 3] [--warmup 2] [--repeats 5] [--threads 2] [--variants eager-fp32 eager-amp]
    python bench/vs_original.py     # without --original: this project's side only, and says so

Getting the original (its own license; used read-only from its checkout, nothing of it is copied
into this repository) and an environment for it, as checked here with TensorFlow 2.21 (the
``tensorflow-cpu`` wheel, this project's ``convert`` extra) in the system Python:

    git clone https://github.com/facebookresearch/ImageNet-Adversarial-Training /path/orig
    python -m venv --system-site-packages /path/venv        # sees the system's TensorFlow
    /path/venv/bin/pip install tensorpack==0.11
    /path/venv/bin/pip install --no-deps tf-keras==2.21.0   # must match TensorFlow's version

``--no-deps``: tf-keras requires the ``tensorflow`` distribution, which pip does not see in
``tensorflow-cpu`` and would download whole; without a system TensorFlow, install
``tensorflow-cpu==2.21.0`` into the venv first. tf-keras is needed because tensorpack builds its
layers from ``tf.compat.v1.layers``, which Keras 3 lacks; bench/original_step.py sets
``TF_USE_LEGACY_KERAS=1`` for it.

What is timed, per side, as one training step (attack + forward/backward + SGD update) of the
same batch, after ``--warmup`` steps, ``--repeats`` times, each side in a fresh process:
  original   bench/original_step.py, run by ``--original-python``: the original's own
             nets.ResNetModel (-d 50), adv_model.PGDAttacker (epsilon 16, step 1 (raised to
             epsilon/10 = 1.6 by its constructor), prob_start_from_clean 0.2, as its main.py
             trains), its loss (label smoothing 0.1, weight decay 1e-4) and its optimizer
             (momentum 0.9, Nesterov) in a tensorpack SimpleTrainer graph; one ``Session.run``
             of the train op, the BatchNorm updates and the moving summaries; input: its
             ``input``/``label`` placeholders fed a fixed batch of random uint8 BGR pixels and
             random labels; NCHW as the original (its pool0 max-pool in NHWC: TensorFlow's CPU
             MaxPoolGrad has no NCHW), and NHWC; intra- and inter-op threads = --threads; fp32. Its
             first step checks that the attack moved the image by epsilon at most (and at all)
             and that the loss is finite. Shims for TensorFlow 2.21: see original_step.py.
  ours       ``trainer.train_step`` with this project's PGDAttacker as bench/train_step.py runs
             it (its build, batch, attacker_for, step_fn, imported): eager-fp32, and eager-amp
             (the attack under bf16 autocast on a CPU: --use-fp16xla's precision, eager),
             ``torch.set_num_threads(--threads)``.
The sides alternate (original, ours per variant; ``--rounds`` times) so that the machine's drift
hits both. The table gives each side's median over all its timed steps, the range of its
per-round medians, and the speed-up: the original's faster layout's median over the side's
(the original is timed in its own NCHW and in TensorFlow's native NHWC, ``--original-layouts``,
and the faster is the reference, its best case on the machine). Machine: CPU model, its
vector/matrix flags, the load average before and after (a busy machine skews the sides
unequally: in a smoke run beside another benchmark, ours slowed 3.7x and the original 1.1x,
OpenMP's spinning threads suffering more than TensorFlow's thread pool), torch and TensorFlow
versions, threads, OpenMP's wait policy for our side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # make the repository's modules importable from bench/

import torch  # noqa: E402
import train_step  # noqa: E402  (bench/train_step.py: this side is timed with its helpers)

ORIGINAL = "original"
OURS = "ours"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
GET_ORIGINAL = (
    "git clone https://github.com/facebookresearch/ImageNet-Adversarial-Training /path/orig; "
    "python -m venv --system-site-packages /path/venv; "
    "/path/venv/bin/pip install tensorpack==0.11 && "
    "/path/venv/bin/pip install --no-deps tf-keras==2.21.0; then --original /path/orig "
    "--original-python /path/venv/bin/python"
)


@dataclass(frozen=True)
class Run:
    """One fresh process's timed steps (seconds) and what it reported beside them."""

    side: str
    variant: str
    times: list[float]
    info: dict


def step_flags(args: argparse.Namespace) -> list[str]:
    """What both sides' steps are made of: image size, batch, attack iterations, threads."""
    return [
        *("--image-size", str(args.image_size), "--batch", str(args.batch)),
        *("--attack-iter", str(args.attack_iter), "--threads", str(args.threads)),
    ]


def timing_flags(args: argparse.Namespace) -> list[str]:
    return ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]


def run_probe(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Runs a probe in a fresh process; its last stdout line is its JSON result."""
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def original_variant(layout: str) -> str:
    return f"fp32 {layout.upper()}"


def original_run(args: argparse.Namespace, layout: str) -> Run:
    command = [args.original_python, str(BENCH / "original_step.py")]
    command += ["--original", str(args.original), "--layout", layout]
    command += [*step_flags(args), *timing_flags(args)]
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1"}
    info = run_probe(command, env)
    return Run(ORIGINAL, original_variant(layout), info.pop("times"), info)


def ours_run(args: argparse.Namespace, variant: str) -> Run:
    command = [sys.executable, __file__, "--ours-probe", variant]
    command += [*step_flags(args), *timing_flags(args)]
    info = run_probe(command)
    # OpenMP reads its wait policy when torch loads, from the environment the probe inherits
    # (this process's, where importing iat may have set it: iat/__init__.py).
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
    return Run(OURS, variant, info.pop("times"), info)


def gemm_rate(dtype: torch.dtype, side: int = 2048, repeats: int = 10) -> float:
    """This machine's matrix-multiply rate in GFLOP/s (median of `repeats` square products of
    `side`, on torch's threads): the ceiling of a step made of convolutions."""
    a, b = torch.randn(side, side).to(dtype), torch.randn(side, side).to(dtype)
    times = []
    for k in range(repeats + 2):
        start = time.perf_counter()
        torch.mm(a, b)
        if k >= 2:
            times.append(time.perf_counter() - start)
    return 2 * side**3 / statistics.median(times) / 1e9


def step_gflop(model, optimizer, x, y, num_iter: int) -> tuple[float, float]:
    """GFLOPs of one PGD-K training step (FlopCounterMode): (the clean step's, the K attack
    iterations', each forward + input gradient; bench/train_step.py's counts)."""
    clean = train_step.counted_flops(
        train_step.step_fn(model, optimizer, train_step.NoOpAttacker(), x, y)
    )
    ratio = train_step.iteration_flop_ratio(model, optimizer, x, y)
    return clean / 1e9, clean * num_iter * ratio / 1e9


def ours_probe(args: argparse.Namespace) -> None:
    """This project's step, timed as bench/train_step.py's T_pgd (with each time kept), and the
    step's FLOPs with this machine's fp32 and bf16 matrix-multiply rates."""
    torch.set_num_threads(args.threads)
    ts_args = train_step.parse_args(["--arch", "ResNet", "-d", "50", *step_flags(args)])
    model, optimizer = train_step.build(ts_args, "ResNet")
    x, y = train_step.batch(ts_args)
    gflop_clean, gflop_attack = step_gflop(model, optimizer, x, y, args.attack_iter)
    attack = train_step.attacker_for(args.attack_iter, args.ours_probe)
    step = train_step.step_fn(model, optimizer, attack, x, y)
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    info = {
        "times": times,
        "first_step": first,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gflop_clean": gflop_clean,
        "gflop_attack": gflop_attack,
        "gemm_fp32": gemm_rate(torch.float32),
        "gemm_bf16": gemm_rate(torch.bfloat16),
    }
    print(json.dumps(info))


def check_original(args: argparse.Namespace) -> str:
    """Fails early, with what to do, unless the checkout and its Python look usable; returns
    the versions of TensorFlow and tensorpack there."""
    missing = [
        n
        for n in ("nets.py", "adv_model.py", "resnet_model.py")
        if not (args.original / n).is_file()
    ]
    if missing:
        raise SystemExit(f"--original {args.original}: no {', '.join(missing)}; {GET_ORIGINAL}")
    code = (
        "import tensorflow as tf, tensorpack, tf_keras; "
        "print(tf.__version__, tensorpack.__version__)"
    )
    out = subprocess.run(
        [args.original_python, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_USE_LEGACY_KERAS": "1"},
    )
    if out.returncode != 0:
        raise SystemExit(
            f"--original-python {args.original_python} cannot import tensorflow, tensorpack "
            f"and tf_keras:\n{out.stderr[-1500:]}\n{GET_ORIGINAL}"
        )
    tf_version, tensorpack_version = out.stdout.split()[-2:]
    return f"TensorFlow {tf_version}, tensorpack {tensorpack_version}"


def cpu_description() -> str:
    """The CPU's model name and which of CPU_FLAGS it has (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    present = " ".join(f for f in CPU_FLAGS if f in flags) or f"none of {', '.join(CPU_FLAGS)}"
    return f"{name}; {os.cpu_count()} CPUs; flags: {present}"


def measure(args: argparse.Namespace) -> list[Run]:
    """``--rounds`` rounds of: the original in each of its layouts (when given), then each of
    our variants."""
    plan = [(ORIGINAL, layout) for layout in args.original_layouts] if args.original else []
    plan += [(OURS, variant) for variant in args.variants]
    runs = []
    for r in range(1, args.rounds + 1):
        for side, variant in plan:
            run = original_run(args, variant) if side == ORIGINAL else ours_run(args, variant)
            runs.append(run)
            median = statistics.median(run.times)
            print(
                f"  round {r}: {side} {variant} median {median:.3f} s "
                f"(first step {run.info['first_step']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    return runs


def print_roofline(runs: list[Run], base_median: float | None) -> None:
    """What the machine allows: the step's FLOPs at the fp32 (bf16) matrix-multiply rate, the
    time that would take and the speed-up over the original it would give."""
    ours = [r for r in runs if r.side == OURS]
    clean, attack = ours[0].info["gflop_clean"], ours[0].info["gflop_attack"]
    gflop = clean + attack
    rates = {k: statistics.median(r.info[k] for r in ours) for k in ("gemm_fp32", "gemm_bf16")}
    times = {
        v: statistics.median(t for r in ours if r.variant == v for t in r.times)
        for v in dict.fromkeys(r.variant for r in ours)
    }
    print(
        f"\nOne step: {gflop:.0f} GFLOP (FlopCounterMode). Matrix-multiply rate here: fp32 "
        f"{rates['gemm_fp32']:.0f}, bf16 {rates['gemm_bf16']:.0f} GFLOP/s (2048x2048, median)."
    )
    for variant, seconds in times.items():
        print(
            f"- ours {variant}: {gflop / seconds:.0f} GFLOP/s, "
            f"{gflop / seconds / rates['gemm_fp32']:.0%} of the fp32 rate"
        )
    floors = {
        "every FLOP at the fp32 rate": gflop / rates["gemm_fp32"],
        "the attack's at the bf16 rate, the rest at fp32 (the fast attack's floor)": (
            attack / rates["gemm_bf16"] + clean / rates["gemm_fp32"]
        ),
    }
    for words, floor in floors.items():
        line = f"- {words}: {floor:.3f} s per step"
        if base_median:
            line += f", {base_median / floor:.2f}x the original's fastest"
        print(line)


def print_table(runs: list[Run]) -> float | None:
    keys = list(dict.fromkeys((r.side, r.variant) for r in runs))
    all_times = {k: [t for r in runs if (r.side, r.variant) == k for t in r.times] for k in keys}
    round_medians = {
        k: [statistics.median(r.times) for r in runs if (r.side, r.variant) == k] for k in keys
    }
    # The reference: the original's faster layout (its best case on this machine).
    originals = [statistics.median(all_times[k]) for k in keys if k[0] == ORIGINAL]
    base_median = min(originals) if originals else None
    print(
        "| side | variant | median step s | range of round medians s | "
        "speed-up over the original's fastest fp32 |"
    )
    print("|---|---|---:|---:|---:|")
    for side, variant in keys:
        median = statistics.median(all_times[(side, variant)])
        low, high = min(round_medians[(side, variant)]), max(round_medians[(side, variant)])
        ratio = f"{base_median / median:.2f}x" if base_median else "-"
        print(f"| {side} | {variant} | {median:.3f} | {low:.3f}-{high:.3f} | {ratio} |")
    return base_median


def print_header(
    args: argparse.Namespace, runs: list[Run], original_versions: str | None, loads: str
) -> None:
    ours = next(r for r in runs if r.side == OURS)
    print(f"{cpu_description()}; 1-minute load average {loads}")
    print(
        f"ours: torch {ours.info['torch']}, {ours.info['threads']} threads, "
        f"OMP_WAIT_POLICY {ours.info['omp_wait_policy']}"
    )
    if original_versions:
        orig = [r for r in runs if r.side == ORIGINAL]
        largest = max(r.info["max_perturbation"] for r in orig)
        losses = ", ".join(f"{r.info['loss']:.3f}" for r in orig)
        print(
            f"original: {original_versions}, oneDNN, intra/inter-op threads "
            f"{orig[0].info['threads']}, layouts {', '.join(args.original_layouts)} (NCHW: "
            f"pool0 in NHWC); first-step check of each of its processes: max |adv - clean| "
            f"{largest:.4f} (epsilon {train_step.EPSILON * 2 / 255:.4f}), losses {losses}"
        )
    else:
        print(
            f"original: not given (--original), this project's side only. To add it: {GET_ORIGINAL}"
        )
    print(
        f"ResNet-50, batch {args.batch}, {args.image_size}x{args.image_size}, "
        f"PGD-{args.attack_iter} training step; {args.rounds} rounds x {args.repeats} steps "
        f"after {args.warmup} warm-up, sides alternating in fresh processes\n"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--original", type=Path, help="checkout of the original release")
    p.add_argument(
        "--original-python", default=sys.executable, help="a Python with tensorflow + tensorpack"
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=["eager-fp32", "eager-amp"],
        choices=list(train_step.VARIANTS),
        help="this project's attack variants",
    )
    p.add_argument(
        "--original-layouts",
        nargs="+",
        choices=("nchw", "nhwc"),
        default=["nchw", "nhwc"],
        help="the original's data formats to time; the faster is the reference",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--attack-iter", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ours-probe", choices=list(train_step.VARIANTS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.ours_probe:
        ours_probe(args)
        return
    original_versions = check_original(args) if args.original else None
    load_before = os.getloadavg()[0]
    runs = measure(args)
    loads = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    print_header(args, runs, original_versions, loads)
    print_roofline(runs, print_table(runs))


if __name__ == "__main__":
    main()
