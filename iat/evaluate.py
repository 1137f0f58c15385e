"""White-box evaluation, distributed over all processes, every image counted exactly once.

The validation split is cut into fixed batches of `batch` images (``sources.rank_batches``);
batch j goes to rank j % world_size and the attack's randomness for it is a generator seeded by
j, passed through ``attacker.attack(..., generator=...)``. So the numbers do not depend on the
number of processes (the original dropped the split's remainder and averaged per-worker
averages; here counts are summed across ranks).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from tqdm import tqdm

from adv_model import Attacker
from iat import defenses, distributed
from iat.builders import build_attacker, load_for_inference
from iat.config import Config
from iat.data.layouts import CorruptImageError, Sample, check_labels, create_reader
from iat.data.sources import eval_loader, to_model_input, unreadable
from iat.metrics import EvalResult, count_batch
from iat.run_logging import ResultFileBackend, RunLogger


def batch_seed(seed: int, batch_index: int) -> int:
    """The attack's seed for global evaluation batch `batch_index`."""
    return seed * 1_000_003 + batch_index


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
    skip_unreadable: bool = False,
    desc: str = "eval",
) -> EvalResult:
    """Top-1/top-5 error and attack success of `model` under `attacker` on `samples`.

    The attack differentiates ``defenses.attack_model(model)`` (a defended model's BPDA/EOT
    view); the images are scored by `model` itself. An unreadable image is an error naming it,
    or, with `skip_unreadable`, left out of the counts and counted in ``EvalResult.skipped``."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    loader = eval_loader(
        samples,
        batch=batch,
        image_size=image_size,
        workers=workers,
        rank=rank,
        world_size=world,
        pin_memory=device.type == "cuda",
    )
    generator = torch.Generator(device=device)
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    progress = tqdm(loader, desc=desc, disable=not distributed.is_main_process(), leave=False)
    skipped = torch.zeros((), dtype=torch.float64, device=device)
    for j, (images, labels, indices, ok) in enumerate(progress):
        if not ok.all():
            bad = unreadable(samples, indices, ok)
            if not skip_unreadable:
                raise CorruptImageError(
                    f"cannot decode image {bad[0]} (--skip-unreadable skips such images)"
                )
            tqdm.write(f"warning: skipped unreadable image(s) {', '.join(bad)}", file=sys.stderr)
            skipped += len(bad)
            images, labels = images[ok], labels[ok]
        generator.manual_seed(batch_seed(seed, rank + j * world))
        images, labels = to_model_input(images, device), labels.to(device)
        logits, targets = attack_batch(model, attacker, images, labels, generator)
        totals += count_batch(logits, labels, targets)
    model.train(was_training)
    distributed.all_reduce_sum(totals)
    distributed.all_reduce_sum(skipped)
    return EvalResult.from_counts(totals, skipped=int(skipped.item()))


def attack_batch(
    model: torch.nn.Module,
    attacker: Attacker,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits of the attacked images, attack targets)``: the attack runs on what a white-box
    attacker must differentiate (BPDA/EOT for a defended model, Athalye et al. 2018 Sec 4), the
    logits come from `model` with its real transforms."""
    adv, targets = attacker.attack(
        defenses.attack_model(model), images, labels, generator=generator
    )
    with torch.no_grad():
        return model(adv).float(), targets


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
    """`evaluate` under the configured PGD-`attack_iter` attack (0: clean), fp32, of `model`
    behind the configured defense (--defense), attacked through BPDA and EOT."""
    model = defenses.defend(model, cfg.defense)
    eot = defenses.eot_samples(model, cfg.eot_samples)
    attacker = build_attacker(
        cfg, attack_iter=attack_iter, num_classes=num_classes, eot_samples=eot
    )
    return evaluate(
        model,
        attacker,
        samples,
        batch=cfg.batch,
        image_size=cfg.image_size,
        workers=cfg.workers,
        device=device,
        seed=cfg.seed,
        skip_unreadable=cfg.skip_unreadable,
        desc=desc,
    )


def run_eval(cfg: Config, device: torch.device) -> EvalResult:
    """--eval: the --load'ed model on the validation split under the configured attack."""
    samples = create_reader(cfg.data).samples("val")
    model, cfg = load_for_inference(cfg, device)  # cfg: the checkpoint's recorded architecture
    num_classes = cfg.num_classes
    check_labels(samples, num_classes, "val")
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
    main_proc = distributed.is_main_process()
    backends = [ResultFileBackend(cfg.eval_output)] if cfg.eval_output and main_proc else []
    with RunLogger(backends) as logger:
        logger.log_result("eval", eval_record(cfg, result))
    if main_proc:
        print(summary_line(cfg, result))
    return result


def threat_model(cfg: Config) -> str:
    """The attack a number was measured under, in words."""
    if cfg.attack_iter == 0:
        return f"clean{_defense_words(cfg)}"
    target = {"random": "random target", "least_likely": "least-likely target"}
    goal = target.get(cfg.attack_target, "untargeted")
    return f"PGD-{cfg.attack_iter} {goal}, L-inf eps={cfg.attack_epsilon:g}{_defense_words(cfg)}"


def _defense_words(cfg: Config) -> str:
    """The defense and how the attack sees it, after a comma; empty without a defense."""
    words = defenses.describe(cfg.defense, cfg.eot_samples, attacked=cfg.attack_iter > 0)
    return f", {words}" if words else ""


def summary_line(cfg: Config, r: EvalResult) -> str:
    skipped = f" ({r.skipped} unreadable skipped)" if r.skipped else ""
    line = (
        f"{threat_model(cfg)}: {r.images} images{skipped}, top-1 error {r.top1_error:.4f}, "
        f"top-5 error {r.top5_error:.4f}"
    )
    return (
        line if cfg.attack_iter == 0 else f"{line}, attack success rate {r.attack_success_rate:.4f}"
    )


def eval_record(cfg: Config, r: EvalResult) -> dict:
    record = r.as_dict()
    attack: dict = {"name": "clean"}
    if cfg.attack_iter:
        attack = {
            "name": "pgd",
            "iter": cfg.attack_iter,
            "epsilon": cfg.attack_epsilon,
            "step_size": cfg.attack_step_size,
            "target": cfg.attack_target,
        }
    else:
        del record["attack_success_rate"]
    return {
        **record,
        "threat_model": threat_model(cfg),
        "attack": attack,
        "checkpoint": cfg.load,
        "arch": cfg.arch,
        "depth": cfg.depth,
        "num_blocks": cfg.num_blocks,
        "denoise_op": cfg.denoise_op,
        "defense": cfg.defense,
        "world_size": distributed.get_world_size(),
    }
