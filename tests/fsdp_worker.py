"""One rank of the 2-process runs of tests/test_fsdp.py, all in one process group (one launch:
starting the processes costs more here than the runs).

Usage: fsdp_worker.py JOBS.json.  The file lists jobs, run in order by every rank:

* ``{"train": [main.py flags], "out": DIR}``: a training run as main.py's (tests/train_worker.py
  writes DIR/rank<R>.pt and DIR/rank<R>.json);
* ``{"collectives": [ARCH, ...], "iters": K, "out": DIR}``: for each ARCH and each
  --fsdp-attack-gather mode, a tiny model sharded over both processes takes 2 adversarial
  training steps (PGD-K in the loop); DIR/rank<R>.json holds, per ARCH, mode and step, the
  all-gathers and reduce-scatters of the attack alone and of the whole step, whether the attack
  left a parameter gradient, the number of sharded units, and the step's loss; under "root",
  the bytes a tiny ViT's root unit gathers and its parameters' placements, fully_shard's default
  against ``fsdp.shard_model``'s;
* ``{"mesh": MODE, "out": DIR}``: DIR/rank<R>.json holds the shape and dimension names of the
  device mesh --fsdp MODE makes of these processes.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from train_worker import train

import nets
from iat.attacks import create_attacker
from iat.attacks.core import AttackSettings
from iat.config import FSDP_ATTACK_GATHERS
from iat.runtime import distributed
from iat.train import fsdp

BLOCKS = {"vit_small_patch16_224": [2], "ResNetDenoise": [1, 1, 1, 1]}


def steps(arch: str, mode: str, attack_iter: int, mesh) -> list[dict]:
    torch.manual_seed(0)
    model = nets.build_model(arch, num_blocks=BLOCKS[arch], width=8, num_classes=10)
    fsdp.shard_model(model, mesh, fsdp.mixed_precision(None))
    counts = fsdp.count_collectives(model)
    settings = AttackSettings(attack_iter, 8.0, 2.0, num_classes=10,
                              generator=torch.Generator().manual_seed(1))  # fmt: skip
    attacker = fsdp.GatheredAttacker(create_attacker("pgd", settings), mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(dist.get_rank())
    found = []
    for _ in range(2):
        images = torch.rand(2, 3, 32, 32, generator=data) * 255
        labels = torch.randint(0, 10, (2,), generator=data)
        before = (counts.all_gathers, counts.reduce_scatters)
        model.train()
        adv, _ = attacker.attack(model, images, labels)
        attack = (counts.all_gathers - before[0], counts.reduce_scatters - before[1])
        left = any(p.grad is not None for p in model.parameters())
        loss = torch.nn.functional.cross_entropy(model(adv), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        found.append({
            "attack": attack,
            "step": (counts.all_gathers - before[0], counts.reduce_scatters - before[1]),
            "grads_left": left,
            "units": len(fsdp.fsdp_modules(model)),
            "loss": loss.item(),
        })  # fmt: skip
    return found


def root_gather(arch: str, mesh, placed: bool) -> dict:
    """The bytes the root unit of a tiny `arch` gathers for an evaluation's forward pass, and
    how its parameters are split: sharded by ``fsdp.shard_model`` (`placed`), else by
    fully_shard's default placement (dim 0) over the same units."""
    torch.manual_seed(0)
    model = nets.build_model(arch, num_blocks=BLOCKS[arch], width=8, num_classes=10).eval()
    if placed:
        fsdp.shard_model(model, mesh, fsdp.mixed_precision(None))
    else:
        for unit in nets.shard_units(model):
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
    owned = {id(p) for unit in fsdp.fsdp_modules(model)[1:] for p in unit.parameters()}
    placements = {
        name: str(p.placements[0]) for name, p in model.named_parameters() if id(p) not in owned
    }
    counts = fsdp.count_collectives(model, root_only=True)
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32) * 255)
    return {
        "gathers": counts.all_gathers,
        "bytes": counts.all_gather_bytes,
        "placements": placements,
    }


def collectives(out_dir: Path, archs: list[str], attack_iter: int, env) -> None:
    mesh = fsdp.device_mesh("full", env, torch.device("cpu"))
    result = {
        arch: {mode: steps(arch, mode, attack_iter, mesh) for mode in FSDP_ATTACK_GATHERS}
        for arch in archs
    }
    result["root"] = {
        placement: root_gather(archs[0], mesh, placement == "placed")
        for placement in ("default", "placed")
    }
    (out_dir / f"rank{env.rank}.json").write_text(json.dumps(result))


def main(jobs: list[dict]) -> None:
    env = distributed.detect()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    with distributed.process_group(env, device, timeout_s=120):
        for job in jobs:
            out = Path(job["out"])
            out.mkdir(exist_ok=True)
            if "train" in job:
                train(out, job["train"], env, device)
            elif "mesh" in job:
                mesh = fsdp.device_mesh(job["mesh"], env, device)
                facts = {"shape": list(mesh.shape), "names": list(mesh.mesh_dim_names)}
                (out / f"rank{env.rank}.json").write_text(json.dumps(facts))
            else:
                collectives(out, job["collectives"], job["iters"], env)


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
