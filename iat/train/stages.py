"""Training stages: the epochs over which --size-schedule and --attack-iter-schedule hold still
(AdvXL's coarse-to-fine, weak-to-strong training, Wang et al. 2024 Sec 3; fast-at's progressive
resizing), and what the run's records say of them.

A stage begins at epoch 1 and at every first epoch either schedule names; within a stage the
image side and the attack's iterations stay (the warm-ups may still ramp epsilon or the step).
With a schedule, the trainer logs each step's side and iterations, each in-training evaluation
the stage and attack of the epoch it followed, and each checkpoint those of its epoch; a
relaunch whose schedules give that epoch another stage or attack says so in one line.
"""

from __future__ import annotations

from iat.attacks import attack_info
from iat.attacks.registry import record
from iat.config import Config, epoch_value, mixing_enabled
from iat.runs.state import Start
from iat.train.builders import epoch_attack_spec


def staged(cfg: Config) -> bool:
    """Whether a schedule changes the side or the attack's iterations by epoch."""
    return cfg.size_schedule is not None or cfg.attack_iter_schedule is not None


def stage_firsts(cfg: Config) -> tuple[int, ...]:
    """The first epochs of the run's stages: 1 and each first epoch a schedule names, up to
    --epochs."""
    firsts = {1}
    for pairs in (cfg.size_schedule, cfg.attack_iter_schedule):
        firsts.update(first for first in (pairs or ())[0::2] if first <= cfg.epochs)
    return tuple(sorted(firsts))


def stage_record(cfg: Config, epoch: int) -> dict[str, object]:
    """What epoch `epoch` (1-based) trained with, as logs and checkpoints record it: its stage
    (1-based) and the stage's first epoch, the image side, and the training attack as it ran
    (warm-ups applied): its name and settings as results name them; on Mixup / CutMix's soft
    targets the sign-gradient ascent that stands for it (``iat.train.soft_objective``)."""
    firsts = stage_firsts(cfg)
    index = max(k for k, first in enumerate(firsts) if first <= epoch)
    spec = epoch_attack_spec(cfg, epoch)
    info = attack_info(spec.name)
    attack = record(spec.name, spec.settings) if info.perturbs else {}
    if mixing_enabled(cfg) and info.training is not None and info.training.soft_target:
        iters, epsilon, step, _ = info.training.soft_target(spec.settings, 0.0)
        attack = {"iter": iters, "epsilon": epsilon, "step_size": step, "soft_target": True}
    return {
        "stage": index + 1,
        "first_epoch": firsts[index],
        "image_size": epoch_value(cfg.size_schedule, epoch) or cfg.image_size,
        "attack": spec.name,
        "iter": spec.settings.num_iter,  # FGSM-RS: 1, clean: 0
        **attack,
    }


def epoch_stage(cfg: Config, epoch: int) -> dict[str, object] | None:
    """``stage_record`` of epoch `epoch` under a schedule (logs and checkpoints hold it); None
    without one."""
    return stage_record(cfg, epoch) if staged(cfg) else None


def step_scalars(cfg: Config, epoch: int) -> dict[str, float]:
    """A training step's logged side and attack iterations under a schedule; none without."""
    stage = epoch_stage(cfg, epoch)
    if stage is None:
        return {}
    return {"train/image_size": stage["image_size"], "train/attack_iter": stage["iter"]}


def _words(stage: dict[str, object]) -> str:
    """ "112 px, PGD-1 step 4": the side, the attack, its iterations and its step."""
    info = attack_info(str(stage["attack"]))
    words = f"{stage['image_size']} px, {info.title}"
    if info.iterations:
        words += f"-{stage['iter']}"
    if "step_size" in stage:
        words += f" step {stage['step_size']:.3g}"
    return words


def stages_line(cfg: Config) -> str | None:
    """The run's stages in one line, each as it ends (its warm-ups done), for the run's start;
    None without a schedule."""
    if not staged(cfg):
        return None
    lasts = [first - 1 for first in stage_firsts(cfg)[1:]] + [cfg.epochs]
    parts = [
        f"epoch{'s' * (last > first)} {first}{f'-{last}' * (last > first)}: "
        f"{_words(stage_record(cfg, last))}"
        for first, last in zip(stage_firsts(cfg), lasts, strict=True)
    ]
    return "stages: " + "; ".join(parts)


def start_lines(cfg: Config, start: Start) -> tuple[str | None, str | None]:
    """The run's start: its stages (``stages_line``), and a warning where the checkpoint it
    starts from recorded another stage or attack for its last epoch than this configuration's
    schedules give that epoch (they changed between launches, e.g. a recipe's stages fitted to
    another --epochs); None for each that does not apply."""
    recorded, epoch = start.stage, start.progress.epoch
    if recorded is None or epoch < 1 or recorded == stage_record(cfg, epoch):
        return stages_line(cfg), None
    now = stage_record(cfg, epoch)
    source = start.weights.source if start.weights is not None else start.sharded
    return stages_line(cfg), (
        f"warning: {source} trained epoch {epoch} in stage {recorded['stage']} "
        f"({_words(recorded)}); this run's schedules give it stage {now['stage']} "
        f"({_words(now)}): the stages changed, the run goes on with the new ones"
    )
