"""White-box evaluation, distributed over all processes, every image counted exactly once.

The validation split is cut into fixed batches of `batch` images; batch j goes to rank
j % world_size and its attack randomness is seeded by j. So the numbers do not depend on the
number of processes (the original dropped the split's remainder and averaged per-worker averages;
here counts are summed across ranks).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import distributed
from adv_model import Attacker, attack_success, build_attacker
from atomic_io import atomic_write_text
from config import Config
from data import EvalDataset, to_model_input
from runtime import check_labels, checkpoint_classes, load_model
from third_party.imagenet import list_split

Sample = tuple[str, int]


@dataclass(frozen=True)
class EvalResult:
    images: int  # images evaluated, over all processes
    top1_error: float  # fraction of (attacked) images whose top-1 prediction is wrong
    top5_error: float  # fraction whose label is not among the top 5
    attack_success_rate: float  # fraction where the attack reached its goal (see attack_success)

    def as_dict(self) -> dict:
        return asdict(self)


def rank_batches(num_images: int, batch: int, rank: int, world_size: int) -> list[list[int]]:
    """Global batch j (images [j*batch, (j+1)*batch)) belongs to rank j % world_size."""
    starts = range(rank * batch, num_images, world_size * batch)
    return [list(range(s, min(s + batch, num_images))) for s in starts]


def count_batch(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[images, top-1 wrong, top-5 wrong, attack successes] of one batch."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    in_top5 = (top5 == labels[:, None]).any(dim=1)
    return torch.stack(
        [
            torch.tensor(labels.shape[0], device=logits.device),
            (logits.argmax(dim=1) != labels).sum(),
            (~in_top5).sum(),
            attack_success(logits, labels, targets).sum(),
        ]
    ).double()


def evaluate(
    model: torch.nn.Module,
    attacker: Attacker,
    samples: Sequence[Sample],
    *,
    batch: int,
    image_size: int,
    workers: int,
    device: torch.device,
    seed: int,
    generator: torch.Generator | None = None,
    desc: str = "eval",
) -> EvalResult:
    """Top-1/top-5 error and attack success of `model` under `attacker` on `samples`.

    `generator` is the attacker's random source, if any: it is re-seeded for every global batch.
    """
    rank, world = distributed.get_rank(), distributed.get_world_size()
    batches = rank_batches(len(samples), batch, rank, world)
    loader = DataLoader(
        EvalDataset(samples, image_size),
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    progress = tqdm(loader, desc=desc, disable=not distributed.is_main_process(), leave=False)
    for j, (images, labels, _) in enumerate(progress):
        if generator is not None:
            generator.manual_seed(seed * 1_000_003 + rank + j * world)
        images, labels = to_model_input(images, device), labels.to(device)
        adv, targets = attacker.attack(model, images, labels)
        with torch.no_grad():
            logits = model(adv).float()
        totals += count_batch(logits, labels, targets)
    model.train(was_training)
    distributed.all_reduce_sum(totals)
    n, top1, top5, success = totals.tolist()
    return EvalResult(
        images=int(n),
        top1_error=top1 / max(n, 1),
        top5_error=top5 / max(n, 1),
        attack_success_rate=success / max(n, 1),
    )


def attacker_for(
    cfg: Config, attack_iter: int, num_classes: int, generator: torch.Generator
) -> Attacker:
    """The evaluation attacker: PGD from a random start (never from the clean image), fp32."""
    return build_attacker(
        attack_iter,
        cfg.attack_epsilon,
        cfg.attack_step_size,
        target=None if cfg.attack_target == "none" else cfg.attack_target,
        num_classes=num_classes,
        generator=generator,
    )


def evaluate_attack(
    model: torch.nn.Module,
    cfg: Config,
    samples: Sequence[Sample],
    *,
    attack_iter: int,
    num_classes: int,
    device: torch.device,
    desc: str,
) -> EvalResult:
    """`evaluate` under the configured PGD-`attack_iter` attack (0: clean)."""
    generator = torch.Generator(device=device)
    return evaluate(
        model,
        attacker_for(cfg, attack_iter, num_classes, generator),
        samples,
        batch=cfg.batch,
        image_size=cfg.image_size,
        workers=cfg.workers,
        device=device,
        seed=cfg.seed,
        generator=generator,
        desc=desc,
    )


def run_eval(cfg: Config, device: torch.device) -> EvalResult:
    """--eval: the --load'ed model on the validation split under a PGD-`attack_iter` attack."""
    samples = list_split(cfg.data, "val")[0]
    num_classes = checkpoint_classes(cfg)
    check_labels(samples, num_classes, "val")
    model = load_model(cfg, num_classes, device)
    desc = f"eval PGD-{cfg.attack_iter}" if cfg.attack_iter else "eval clean"
    result = evaluate_attack(
        model,
        cfg,
        samples,
        attack_iter=cfg.attack_iter,
        num_classes=num_classes,
        device=device,
        desc=desc,
    )
    if distributed.is_main_process():
        print(summary_line(cfg, result))
        if cfg.eval_output is not None:
            atomic_write_text(cfg.eval_output, json.dumps(eval_record(cfg, result), indent=2))
    return result


def summary_line(cfg: Config, r: EvalResult) -> str:
    attack = "clean" if cfg.attack_iter == 0 else f"PGD-{cfg.attack_iter} eps={cfg.attack_epsilon}"
    return (
        f"{attack}: {r.images} images, top-1 error {r.top1_error:.4f}, "
        f"top-5 error {r.top5_error:.4f}, attack success rate {r.attack_success_rate:.4f}"
    )


def eval_record(cfg: Config, r: EvalResult) -> dict:
    return {
        **r.as_dict(),
        "attack": {
            "iter": cfg.attack_iter,
            "epsilon": cfg.attack_epsilon,
            "step_size": cfg.attack_step_size,
            "target": cfg.attack_target,
        },
        "checkpoint": cfg.load,
        "arch": cfg.arch,
        "depth": cfg.depth,
        "num_blocks": cfg.num_blocks,
        "world_size": distributed.get_world_size(),
    }
