"""Evaluation throughput of ``main.py --eval`` on 1 process vs 2 processes (prints one table).

    python bench/eval_scaling.py [--arch ResNet -d 50] [--image-size 64] [--attack-iter 10]

Writes an ImageNet-layout val/ folder of generated images and random weights (nets.save_weights)
to a temporary directory, then times ``main.py --eval`` as
  1 process, --threads 1;   1 process, --threads 2;
  torchrun --standalone --nproc-per-node 2 with OMP_NUM_THREADS=1 and --threads 1 (Gloo).
Each configuration runs on ``--small`` and on ``--images`` images; the throughput is the
difference in images over the difference in wall time, which cancels the fixed start-up cost
(interpreter, imports, process group, model build). The whole-run wall times are shown too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # make the repository's modules importable from bench/

import nets  # noqa: E402

MAIN = REPO / "main.py"
CLASSES = 4
CONFIGS = {  # name: (processes, threads per process)
    "1 process x 1 thread": (1, 1),
    "1 process x 2 threads": (1, 2),
    "2 processes x 1 thread (torchrun, Gloo)": (2, 1),
}


def write_val_split(root: Path, images: int, size: int) -> Path:
    """val/n0000K/*.png: ``images`` random images of ``size`` x ``size`` over CLASSES classes."""
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / "val" / f"n{i % CLASSES:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        assert cv2.imwrite(str(folder / f"img{i:04d}.png"), image)
    return root


def eval_command(args: argparse.Namespace, data: Path, weights: Path, config: str) -> list[str]:
    processes, threads = CONFIGS[config]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    model = ["--num-blocks", *map(str, args.num_blocks)] if args.num_blocks else ["-d", args.depth]
    return [
        *launcher,
        str(MAIN),
        "--eval",
        "--data",
        str(data),
        "--load",
        str(weights),
        "--arch",
        args.arch,
        *map(str, model),
        "--num-classes",
        str(args.num_classes),
        "--image-size",
        str(args.image_size),
        "--batch",
        str(args.batch),
        "--attack-iter",
        str(args.attack_iter),
        "--workers",
        "0",
        "--threads",
        str(threads),
    ]


def wall_seconds(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=REPO, capture_output=True)
    return time.perf_counter() - start


def save_random_weights(args: argparse.Namespace, path: Path) -> Path:
    depth = None if args.num_blocks else args.depth
    model = nets.build_model(
        args.arch, depth=depth, num_blocks=args.num_blocks, num_classes=args.num_classes
    )
    nets.save_weights(model, path)
    return path


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sizes = (args.small, args.images)
        folders = [write_val_split(root / f"n{n}", n, args.image_size + 16) for n in sizes]
        weights = save_random_weights(args, root / "weights.pt")
        print(
            f"{args.arch}, {args.image_size}x{args.image_size}, batch {args.batch} per process, "
            f"PGD-{args.attack_iter}; marginal throughput from {sizes[0]} vs {sizes[1]} images\n"
        )
        print(f"| configuration | wall s ({sizes[0]} img) | wall s ({sizes[1]} img) | img/s | x |")
        print("|---|---:|---:|---:|---:|")
        baseline = None
        for config, (_, threads) in CONFIGS.items():
            times = [
                wall_seconds(eval_command(args, folder, weights, config), threads)
                for folder in folders
            ]
            rate = (sizes[1] - sizes[0]) / (times[1] - times[0])
            baseline = baseline or rate
            print(
                f"| {config} | {times[0]:.1f} | {times[1]:.1f} | {rate:.2f} | "
                f"{rate / baseline:.2f} |",
                flush=True,
            )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="ResNet", choices=nets.available_architectures())
    p.add_argument("-d", "--depth", type=int, default=50)
    p.add_argument("--num-blocks", type=int, nargs=4, help="blocks per group, overrides -d")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--attack-iter", type=int, default=10)
    p.add_argument("--small", type=int, default=32, help="images of the short run")
    p.add_argument("--images", type=int, default=128, help="images of the long run")
    return p.parse_args()


if __name__ == "__main__":
    run(parse_args())
