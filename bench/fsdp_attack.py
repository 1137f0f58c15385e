"""The training attack inside a sharded model, measured: all-gathers, reduce-scatters, their
bytes, time and memory per process for each --fsdp-attack-gather mode (Gloo, 2 processes).

    python bench/fsdp_attack.py [--arch vit_small_patch16_224] [--num-blocks 4] [--width 16] \\
        [--attack-iter 3] [--steps 3] [--image-size 32] [--batch 4]

Launches itself under torchrun on 2 processes of this machine. Each process shards the model
(iat.train.fsdp, FSDP2 over a CPU mesh), counts FSDP's collectives through its custom-collective
hooks (fsdp.count_collectives) over --steps PGD-K training steps, and reports per step: the
all-gathers and their gathered bytes, the reduce-scatters and their bytes, the median step time,
its parameter + optimizer bytes (its shards), the largest unsharded weights it held at once
(``once``: the whole model during the attack; ``per-layer``: the root and one unit), and its
peak RSS (ru_maxrss, which includes Python and torch themselves). Rank 0 prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_small_patch16_224")
    p.add_argument("--num-blocks", type=int, nargs="+", default=[4])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--attack-iter", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", help=argparse.SUPPRESS)  # set when launched under torchrun
    return p.parse_args()


def measure(args: argparse.Namespace, mode: str, mesh) -> dict:
    import nets
    from iat.attacks import create_attacker
    from iat.attacks.core import AttackSettings
    from iat.train import fsdp

    torch.manual_seed(0)
    model = nets.build_model(args.arch, num_blocks=args.num_blocks, width=args.width,
                             num_classes=10)  # fmt: skip
    whole_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest_unit = max(sum(p.numel() * p.element_size() for p in unit.parameters())
                       for unit in nets.shard_units(model))  # fmt: skip
    fsdp.shard_model(model, mesh, fsdp.mixed_precision(None))
    counts = fsdp.count_collectives(model)
    settings = AttackSettings(args.attack_iter, 8.0, 2.0, num_classes=10,
                              generator=torch.Generator().manual_seed(1))  # fmt: skip
    attacker = fsdp.GatheredAttacker(create_attacker("pgd", settings), mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    side = args.image_size
    times = []
    for _ in range(args.steps):
        images = torch.rand(args.batch, 3, side, side) * 255
        labels = torch.randint(0, 10, (args.batch,))
        start = time.perf_counter()
        model.train()
        adv, _ = attacker.attack(model, images, labels)
        torch.nn.functional.cross_entropy(model(adv), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    root_bytes = whole_bytes - sum(
        sum(p.numel() * p.element_size() for p in unit.parameters()) for unit in nets.shard_units(
            nets.build_model(args.arch, num_blocks=args.num_blocks, width=args.width,
                             num_classes=10)))  # fmt: skip
    steps = args.steps
    return {
        "all_gathers": counts.all_gathers / steps,
        "all_gather_mb": counts.all_gather_bytes / steps / 2**20,
        "reduce_scatters": counts.reduce_scatters / steps,
        "reduce_scatter_mb": counts.reduce_scatter_bytes / steps / 2**20,
        "step_s": statistics.median(times),
        "state_mb": fsdp.local_state_bytes(model, optimizer) / 2**20,
        "gathered_mb": (whole_bytes if mode == "once" else root_bytes + largest_unit) / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
    }


def worker(args: argparse.Namespace) -> None:
    from iat.config import FSDP_ATTACK_GATHERS
    from iat.runtime import distributed
    from iat.train import fsdp

    torch.set_num_threads(1)
    env = distributed.detect()
    with distributed.process_group(env, torch.device("cpu")):
        mesh = fsdp.device_mesh("full", env, torch.device("cpu"))
        found = {mode: measure(args, mode, mesh) for mode in FSDP_ATTACK_GATHERS}
        Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(found))


def report(args: argparse.Namespace, out: Path) -> None:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    print(f"{args.arch} blocks {args.num_blocks} width {args.width}, PGD-{args.attack_iter} in "
          f"the loop, batch {args.batch} x {args.image_size}px per process, 2 Gloo processes, "
          f"{args.steps} steps; per step and process (rank 0 / rank 1):")  # fmt: skip
    fields = ["all_gathers", "all_gather_mb", "reduce_scatters", "reduce_scatter_mb", "step_s",
              "state_mb", "gathered_mb", "peak_rss_mb"]  # fmt: skip
    print(f"{'mode':<10}" + "".join(f"{f:>22}" for f in fields))
    for mode in ranks[0]:
        cells = [f"{ranks[0][mode][f]:.3g} / {ranks[1][mode][f]:.3g}" for f in fields]
        print(f"{mode:<10}" + "".join(f"{c:>22}" for c in cells))


def main() -> None:
    from iat.runtime import distributed

    args = parse()
    if args.out is not None:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        port = str(distributed.free_port())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", port, __file__, *sys.argv[1:], "--out", out]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, cwd=REPO)
        report(args, Path(out))


if __name__ == "__main__":
    main()
