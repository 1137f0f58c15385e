"""Adversarial training: the loop, data-parallel, checkpointed and resumable.

Feature Denoising Sec 5: every training image is replaced by its PGD adversarial example
(random target, 20% of batches start from the clean image), and the network is trained on
those only, with label smoothing 0.1 (``objective.training_objective``). The schedule is
"ImageNet in 1 Hour" (Goyal et al.; ``iat.train.builders.learning_rate``). The variants (README,
"Adversarial-training options"): mixed batches and logit pairing (in the objective), virtual
batches of several micro-batches, free training's replayed batches, a moving average of the
weights, and fine-tuning from another checkpoint. The newer recipes' parts (README, "Recipes,
optimizers, schedules, augmentation and mixing"): progressive resizing and Mixup / CutMix of
each batch on the device (its soft targets trained and attacked, ``iat.train.soft_objective``), the
attack's epsilon and step warm-ups (rebuilt per epoch), and the catastrophic-overfitting guard.
Mixed precision (--amp, ``iat.train.amp``): the step's forward pass under autocast, the weights,
optimizer state and loss in fp32, fp16's loss scaler checkpointed with the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import nets
from iat import builders
from iat.attacks import Attacker, attack_info
from iat.attacks.training import FreeAttacker
from iat.config import (
    Config,
    adv_fraction,
    config_record,
    default_logdir,
    depth_applies,
    ema_enabled,
    epoch_value,
    eval_attack,
    evaluation_point,
    fit_defense,
    mixing_enabled,
    predict_defense,
)
from iat.data.layouts import DataError, Sample, check_labels, create_reader, resolved_layout
from iat.data.sampling import check_eval_headers
from iat.data.sources import TrainSourceSpec, resize_batch, to_model_input, train_batches
from iat.defenses import transforms as defenses
from iat.defenses.registry import (
    DefenseSpec,
    ModelDefense,
    classifier_of,
    defense_record,
    frontend_flag,
    recorded_defense,
)
from iat.eval.evaluate import attack_record, evaluate_attack
from iat.eval.metrics import EvalResult, Meter
from iat.eval.summary import summary_line, threat_model
from iat.recipes.ema import WeightAverage
from iat.recipes.eval_schedule import EVAL_SCHEDULES
from iat.recipes.mixing import MixSettings, draw_mix, mix_batch, mixing_rng
from iat.recipes.optim import clip_gradients
from iat.recipes.presets import RECIPES, fitted_line
from iat.runs import sharded as sharded_checkpoints
from iat.runs.files import sharded_checkpoint_path
from iat.runs.logger import RunLogger
from iat.runs.state import (
    STAGE_FIELD,
    Progress,
    RunDirectoryLock,
    Start,
    check_run_directory,
    link_best,
    link_last,
    plan_start,
    remove_partial_checkpoints,
    save_checkpoint,
)
from iat.runs.trackers import check_trackers, run_directory_logger
from iat.runtime import distributed
from iat.runtime.cpus import usable_cpus
from iat.runtime.progress import progress_bar
from iat.train import amp, fsdp, stages
from iat.train import builders as train_builders
from iat.train.finetune import freeze_outside, load_finetune_weights
from iat.train.objective import TrainingTerms, training_terms
from iat.train.overfit_guard import OverfitGuard
from iat.train.soft_objective import SoftTargetPGD, soft_training_objective
from nets import CheckpointError

IMAGENET_TRAIN_IMAGES = 1281167  # the original's steps per epoch for --fake runs
# The in-training evaluation checkpoint-best.pt is chosen by: PGD-10 runs after every epoch
# (--train-eval original and light), so every epoch is compared on the same attack.
BEST_EVALUATION = "eval-10step"


@dataclass
class Training:
    """The objects one training run works with (built once by ``setup``)."""

    cfg: Config
    model: torch.nn.Module  # the bare network: evaluated and saved
    # What the training attack differentiates: the model behind the training defense
    # (--defense-apply fit/both) and its model-level defense as white-box attacks see them (BPDA).
    attack_model: torch.nn.Module
    ddp_model: torch.nn.Module  # what the loss is computed through: attack_model, DDP-wrapped
    attacker: Attacker | SoftTargetPGD  # the latter on Mixup / CutMix's soft targets
    generator: torch.Generator  # the training attack's randomness, saved in every checkpoint
    optimizer: torch.optim.Optimizer
    batches: Iterator
    precision: builders.AttackPrecision  # how the training attack computes
    amp: amp.TrainingPrecision  # how the training step computes (--amp)
    scaler: torch.amp.GradScaler  # fp16's loss scaler (a pass-through otherwise), checkpointed
    steps: int  # steps (updates) per epoch
    total_batch: int  # images per update over all processes (micro-batches included)
    device: torch.device
    loss: LossSettings
    ema: WeightAverage | None = None  # the moving average of the weights, when kept
    mixing: MixSettings | None = None  # Mixup / CutMix, when on
    # The training attack of an epoch (epsilon and step warm-ups: train_builders.epoch_attack_spec)
    attacker_of_epoch: Callable[[int], Attacker | SoftTargetPGD] | None = None
    held: list[MicroBatch] | None = None  # free training: the batch being replayed


@dataclass(frozen=True)
class LossSettings:
    """The arguments of ``objective.training_objective`` beyond the batch."""

    label_smoothing: float
    adv_fraction: float = 1.0  # attacked fraction of each batch
    lp_weight: float = 0.0  # adversarial logit pairing weight
    clip_grad: float | None = None  # the gradient's global L2 norm is clipped to this


MicroBatch = tuple[torch.Tensor, torch.Tensor]  # images (model input) and labels, on the device


@dataclass(frozen=True)
class StepResult:
    """One update: the mean loss and, for the metrics, the adversarial images' logits with their
    labels and attack targets (every micro-batch's, concatenated); with logit pairing, the mean
    cross-entropy and the mean unweighted pairing loss (ALP Sec 3) too."""

    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    cross_entropy: torch.Tensor | None = None
    pairing: torch.Tensor | None = None


# --- one step, one epoch ---------------------------------------------------------------------
def train_step(
    model: torch.nn.Module,
    attack_model: torch.nn.Module,
    attacker: Attacker,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[MicroBatch],
    loss: LossSettings,
    precision: amp.TrainingPrecision = amp.FP32,
    scaler: torch.amp.GradScaler | None = None,
) -> StepResult:
    """One update from one or more micro-batches (a virtual batch): for each, attack (BN in
    inference mode, on the bare model) and accumulate the gradient of its loss / count; then
    one optimizer step (after clipping the gradient's norm, with --clip-grad). Under DDP only
    the last micro-batch's backward all-reduces. With `precision` (--amp) the loss's forward
    pass runs under autocast, the loss itself in fp32; `scaler` (fp16) scales the loss,
    unscales the gradients before clipping and skips a step whose gradients overflowed."""
    optimizer.zero_grad(set_to_none=True)
    count = len(micro_batches)
    forward = amp.autocast_forward(model, precision.dtype)
    parts = []
    for k, (images, labels) in enumerate(micro_batches):
        with _sync_gradients(model, k == count - 1):
            terms = _objective(forward, attack_model, attacker, images, labels, loss)
            # Equal micro-batches: the virtual batch's mean loss is the mean of their means.
            share = terms.loss / count
            (share if scaler is None else scaler.scale(share)).backward()
        hard = labels.argmax(dim=1) if labels.ndim == 2 else labels  # a mix: its larger part
        parts.append((terms._replace(loss=terms.loss.detach()), hard[: len(terms.adv_logits)]))
    if scaler is None:
        clip_gradients(model.parameters(), loss.clip_grad)
        optimizer.step()
    else:
        scaler.unscale_(optimizer)  # the true gradients, clipped as without scaling
        clip_gradients(model.parameters(), loss.clip_grad)
        scaler.step(optimizer)  # skipped when a gradient is inf / NaN
        scaler.update()
    return _step_result(parts)


def _step_result(parts: list[tuple[TrainingTerms, torch.Tensor]]) -> StepResult:
    """One update's ``StepResult`` from its micro-batches' terms and hard labels."""
    terms = [t for t, _ in parts]
    result = StepResult(
        torch.stack([t.loss for t in terms]).mean(),
        torch.cat([t.adv_logits for t in terms]),
        torch.cat([hard for _, hard in parts]),
        torch.cat([t.targets for t in terms]),
    )
    if terms[0].pairing is None:
        return result
    return dataclasses.replace(
        result,
        cross_entropy=torch.stack([t.cross_entropy for t in terms]).mean(),
        pairing=torch.stack([t.pairing for t in terms]).mean(),
    )


def _objective(
    model: Callable[[torch.Tensor], torch.Tensor],
    attack_model: torch.nn.Module,
    attacker: Attacker | SoftTargetPGD,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss: LossSettings,
) -> TrainingTerms:
    """The training loss of a batch with hard labels [N], or of a mixed batch with soft
    targets [N, classes] (``iat.train.soft_objective``: smoothing already in the targets)."""
    if labels.ndim == 2:
        return soft_training_objective(
            model, attack_model, attacker, images, labels, loss.adv_fraction, loss.lp_weight
        )
    return training_terms(
        model,
        attack_model,
        attacker,
        images,
        labels,
        loss.label_smoothing,
        loss.adv_fraction,
        loss.lp_weight,
    )


def sized_batches(run: Training, step: int, epoch: int) -> list[MicroBatch]:
    """The micro-batches of update `step`, resized to the side of the epoch (progressive
    resizing: Wong et al. 2020, fast_adversarial ImageNet's 128 / 224 / 288 phases)."""
    batches = step_batches(run, step)
    side = epoch_value(run.cfg.size_schedule, epoch)
    if side is None or side == batches[0][0].shape[-1]:
        return batches
    return [(resize_batch(images, side), labels) for images, labels in batches]


def mixed_batches(run: Training, step: int, micro_batches: list[MicroBatch]) -> list[MicroBatch]:
    """Mixup / CutMix of each micro-batch of update `step` (images, soft targets), on the
    device; the draws depend on (seed, rank, step, micro-batch) alone (``iat.recipes.mixing``)."""
    if run.mixing is None:
        return micro_batches
    mixed = []
    for k, (images, labels) in enumerate(micro_batches):
        rng = mixing_rng(run.cfg.seed, distributed.get_rank(), step, k)
        draw = draw_mix(run.mixing, images.shape[2], images.shape[3], rng)
        mixed.append(mix_batch(images, labels, run.mixing, draw))
    return mixed


def _sync_gradients(model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` (FSDP's, ``fsdp.sync_gradients``) for every micro-batch but the last:
    gradients accumulate locally and are reduced once per update."""
    if last:
        return contextlib.nullcontext()
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    sharded = fsdp.fsdp_modules(model)
    return fsdp.sync_gradients(sharded[0], False) if sharded else contextlib.nullcontext()


def loader_batches_before(step: int, accumulate: int, free_replays: int) -> int:
    """Batches each process has drawn from its source before global `step`: `accumulate` per
    update, or one per `free_replays` updates (a resumed run continues the same stream)."""
    return step * accumulate // free_replays


def _next_batch(run: Training) -> MicroBatch:
    images, labels = next(run.batches)
    return to_model_input(images, run.device), labels.to(run.device, non_blocking=True)


def step_batches(run: Training, step: int) -> list[MicroBatch]:
    """The micro-batches of update `step` (0-based, global): --accumulate fresh ones, or with
    --free-replays M the same batch for M consecutive updates (Shafahi et al. Alg. 1)."""
    replays = run.cfg.free_replays
    if replays == 1:
        return [_next_batch(run) for _ in range(run.cfg.accumulate)]
    if run.held is None or step % replays == 0:
        run.held = [_next_batch(run)]
    return run.held


def _log_step(
    run: Training, logger: RunLogger, meter: Meter, step: int, epoch: int, lr: float, bar
) -> None:
    scalars = meter.read()
    per_process = scalars["train/images_per_sec_per_process"]
    scalars["train/images_per_sec"] = per_process * distributed.get_world_size()
    scalars["train/lr"] = lr
    scalars.update(stages.step_scalars(run.cfg, epoch))  # under a schedule: side and iterations
    logger.log(step, scalars, epoch=epoch, phase="train")
    pairing = (
        {"lp": f"{scalars['train/logit_pairing']:.3f}"} if "train/logit_pairing" in scalars else {}
    )
    bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", **pairing, lr=f"{lr:.4g}", refresh=False)
    meter.reset()


def seed_model_randomness(seed: int, epoch: int, rank: int) -> None:
    """Seeds torch's default generators, which the model's own randomness (stochastic depth,
    --drop-path) draws from, per epoch and process: a resumed run draws exactly what an
    uninterrupted one would, and the processes draw independently."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


def train_epoch(run: Training, epoch: int, step: int, logger: RunLogger) -> int:
    """Run the steps of epoch `epoch` (1-based) from global `step`; returns the step after.

    Raises FloatingPointError if any step's loss was not finite (checked once, at the end: the
    flag is accumulated on the device, without a host sync per step)."""
    cfg = run.cfg
    seed_model_randomness(cfg.seed, epoch, distributed.get_rank())
    if train_builders.attack_changes(cfg, epoch):  # a warm-up epoch, or a stage's first
        run.attacker = run.attacker_of_epoch(epoch)
    run.ddp_model.train()
    meter = Meter(run.device)
    non_finite = torch.zeros((), dtype=torch.bool, device=run.device)
    start = time.perf_counter()
    bar = progress_bar(
        range(run.steps),
        desc=f"epoch {epoch}/{cfg.epochs}",
        disable=not distributed.is_main_process(),
        dynamic_ncols=True,
    )
    for i in bar:
        micro_batches = mixed_batches(run, step, sized_batches(run, step, epoch))
        distributed.mark_progress(step + 1)
        lr = train_builders.learning_rate(epoch - 1 + i / run.steps, cfg, run.total_batch)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        result = train_step(
            run.ddp_model,
            run.attack_model,
            run.attacker,
            run.optimizer,
            micro_batches,
            run.loss,
            run.amp,
            run.scaler,
        )
        if isinstance(run.attacker, FreeAttacker):
            run.attacker.advance()
        step += 1
        if run.ema is not None:
            run.ema.update(run.model, step)
        non_finite |= ~torch.isfinite(result.loss)
        meter.add(result)
        if step % cfg.log_every == 0 or i == run.steps - 1:
            _log_step(run, logger, meter, step, epoch, lr, bar)
    if distributed.all_reduce_sum(non_finite.to(torch.int64)).item():
        raise FloatingPointError(f"training diverged: a non-finite loss in epoch {epoch}")
    per_process = run.steps * cfg.batch * cfg.accumulate / (time.perf_counter() - start)
    if distributed.is_main_process():
        tqdm.write(
            f"epoch {epoch}: {per_process:.1f} images/s per process, "
            f"{per_process * distributed.get_world_size():.1f} images/s in total"
        )
    return step


def require_finite_weights(model: torch.nn.Module, epoch: int) -> None:
    """Raise FloatingPointError naming the first non-finite weight or statistic: such a model
    is never saved (a relaunch would resume from it). One host sync."""
    state = {k: fsdp.local(v) for k, v in model.state_dict().items() if v.is_floating_point()}
    finite = torch.stack([torch.isfinite(v).all() for v in state.values()]).tolist()
    bad = [name for name, ok in zip(state, finite, strict=True) if not ok]
    # Sharded (--fsdp), each process checks its own shards and every process learns of any.
    device = next(iter(state.values())).device
    if distributed.all_reduce_sum(torch.tensor(len(bad), device=device)).item():
        which = f"{len(bad)} non-finite tensors ({bad[0]}, ...)" if bad else "non-finite shards"
        raise FloatingPointError(f"training diverged: {which} in epoch {epoch}")


# --- in-training evaluation ------------------------------------------------------------------
def run_evals(
    run: Training,
    val: Sequence[Sample],
    num_classes: int,
    progress: Progress,
    logger: RunLogger,
) -> dict[str, EvalResult]:
    """The scheduled evaluations after `progress.epoch`, each logged as soon as it finishes
    (of the averaged weights with --eval-ema)."""
    results = {}
    model = whole_model(run, num_classes, averaged=run.cfg.eval_ema)
    for spec in EVAL_SCHEDULES[run.cfg.train_eval]:
        if spec.runs_after(progress.epoch, run.cfg.epochs):
            results[spec.name] = evaluate_attack(
                model,
                run.cfg,
                val,
                attack_iter=spec.attack_iter,
                num_classes=num_classes,
                device=run.device,
                desc=spec.name,
            )
            point = evaluation_point(run.cfg, spec.attack_iter)
            trained = stages.epoch_stage(run.cfg, progress.epoch)
            log_eval(logger, spec.name, results[spec.name], progress, point, trained)
    return results


def log_eval(
    logger: RunLogger,
    name: str,
    r: EvalResult,
    progress: Progress,
    point: Config,
    trained: dict | None = None,
) -> None:
    """The evaluation's numbers, with its threat model (`point`: the configuration it ran
    under) as ``--eval``'s records name it, so that ``--report`` can read a run alone; under a
    schedule, the stage and training attack of the epoch it followed (`trained`)."""
    stage = {} if trained is None else {"training_stage": trained}
    scalars = {f"{name}/top1_error": r.top1_error, f"{name}/top5_error": r.top5_error}
    if attack_info(eval_attack(point)).perturbs:
        scalars[f"{name}/attack_success_rate"] = r.attack_success_rate
    logger.log(
        progress.step,
        scalars,
        epoch=progress.epoch,
        phase=name,
        images=r.images,
        attack=attack_record(point),
        threat_model=threat_model(point),
        defense=predict_defense(point),
        **stage,
    )
    if distributed.is_main_process():
        tqdm.write(f"epoch {progress.epoch} {name}: {summary_line(point, r)}")


# --- setting up a run ------------------------------------------------------------------------
def resolve_logdir(cfg: Config) -> str:
    return cfg.logdir or default_logdir(cfg, distributed.get_world_size())


def steps_per_epoch(cfg: Config, num_train: int | None, total_batch: int) -> int:
    if cfg.steps_per_epoch is not None:
        return cfg.steps_per_epoch
    return max(1, (num_train or IMAGENET_TRAIN_IMAGES) // total_batch)


def sync_buffers(model: torch.nn.Module, ema: WeightAverage | None = None) -> None:
    """Give every process rank 0's BatchNorm statistics (and averaged weights, whose
    statistics differ per process too) before evaluating or saving."""
    for buf in model.buffers():
        distributed.broadcast_tensor(buf, src=0)
    for tensor in ema.shadow.values() if ema is not None else ():
        if not fsdp.is_sharded(tensor):  # a shard (--fsdp) is this process's own
            distributed.broadcast_tensor(tensor, src=0)


def check_same_start(progress: Progress, device: torch.device) -> None:
    """Every process must resume from the same point (rank 0's), or DDP would mix schedules."""
    mine = torch.tensor([progress.epoch, progress.step], dtype=torch.int64, device=device)
    reference = distributed.broadcast_tensor(mine.clone(), src=0)
    disagree = distributed.all_reduce_sum((mine != reference).any().to(torch.int64))
    if disagree.item():
        raise ValueError(
            f"--logdir: processes would resume from different points (rank 0: after epoch "
            f"{int(reference[0])}, rank {distributed.get_rank()}: after epoch {progress.epoch}); "
            "the run directory must be on a filesystem that every machine sees"
        )


def run_info(env: distributed.DistEnv, device: torch.device) -> dict:
    return {
        "world_size": distributed.get_world_size(),
        "launcher": env.launcher,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpus": usable_cpus(),
        "torch": torch.__version__,
        "argv": sys.argv,
    }


@dataclass(frozen=True)
class TrainOutcome:
    model: torch.nn.Module  # the trained network (unwrapped, whole under --fsdp), on its device
    logdir: str  # where its checkpoints, config.json and metrics.jsonl are
    results: dict[str, EvalResult]  # the last in-training evaluations
    # Bytes of parameters and optimizer state this process held (its shards under --fsdp)
    state_bytes: int = 0


def restore_optimizer(optimizer: torch.optim.Optimizer, start: Start) -> None:
    """Load the checkpoint's optimizer state; one CheckpointError if it does not fit."""
    try:
        optimizer.load_state_dict(start.optimizer)
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise CheckpointError(
            f"{start.weights.source}: field 'optimizer' does not fit this model's optimizer "
            f"({error}); the trained tensors must be those of the run it continues (same "
            "--finetune-trainable-scopes and --frontend-trainable)"
        ) from error


def restore_generator(generator: torch.Generator, start: Start) -> None:
    """Continue the training attack's random stream where the checkpoint left it.

    Every process is seeded alike and draws alike, so rank 0's saved state is every rank's. A
    state from another device type cannot be continued: the run goes on, not bit-exact."""
    saved = start.rng
    if saved["device"] != generator.device.type:
        print(
            f"warning: {start.weights.source} holds a {saved['device']} random state; the "
            f"{generator.device.type} attack restarts its random stream from --seed",
            file=sys.stderr,
        )
        return
    try:
        generator.set_state(saved["attack"])
    except RuntimeError as error:
        raise CheckpointError(
            f"{start.weights.source}: field 'rng' is not a {saved['device']} random state"
        ) from error


def restore_ema(ema: WeightAverage, start: Start) -> None:
    """Continue the checkpoint's moving average; one CheckpointError if it does not fit."""
    try:
        ema.load_state_dict(start.ema)
    except (KeyError, RuntimeError) as error:
        raise CheckpointError(
            f"{start.weights.source}: field 'ema' does not fit this model ({error})"
        ) from error


def gathered_free_delta(attacker: Attacker) -> torch.Tensor | None:
    """Free training's current perturbations of every rank, stacked [world, N, C, H, W] (each
    rank's follows its own data); None for other attacks. A collective: every rank calls it."""
    if not isinstance(attacker, FreeAttacker) or attacker.delta is None:
        return None
    world, rank = distributed.get_world_size(), distributed.get_rank()
    stacked = attacker.delta.new_zeros((world, *attacker.delta.shape))
    stacked[rank] = attacker.delta
    return distributed.all_reduce_sum(stacked)


def restore_free_delta(attacker: Attacker, start: Start, device: torch.device) -> None:
    """This rank's perturbation from the checkpoint (Shafahi et al. Alg. 1: carried over);
    from 0 when the number of processes changed, with a warning."""
    if not isinstance(attacker, FreeAttacker) or start.free_delta is None:
        return
    world = distributed.get_world_size()
    if start.free_delta.shape[0] != world:
        if distributed.is_main_process():
            print(
                f"warning: {start.weights.source} holds free training's perturbation of "
                f"{start.free_delta.shape[0]} processes, not {world}: it starts again from 0",
                file=sys.stderr,
            )
        return
    attacker.delta = start.free_delta[distributed.get_rank()].to(device)


def build_network(
    cfg: Config, start: Start, num_classes: int, device, finetune: nets.Weights | None
) -> torch.nn.Module:
    """The model at the start point: the run's or --load's weights, or for a fresh run
    `finetune`'s (--finetune-checkpoint's, read once by the caller; some scopes excluded), then
    frozen outside the trainable scopes."""
    fresh = start.kind == "fresh"
    model = builders.build_model(cfg, num_classes, device, start.weights)
    # Behind a model-level defense the scopes are the classifier's (the original's names); the
    # defense is trained or frozen as --frontend-trainable says.
    classifier = classifier_of(model)
    if fresh and finetune is not None:
        # Weights with a defense of their own fill the whole model; others the classifier.
        recorded = recorded_defense(finetune)
        whole = recorded is not None
        if whole:
            check_same_defense(finetune.source, recorded, model)
        load_finetune_weights(model if whole else classifier, finetune, cfg.finetune_exclude_scopes)
    if cfg.finetune_trainable_scopes is not None:
        freeze_outside(classifier, cfg.finetune_trainable_scopes)
    return model


def check_same_defense(
    source: str, recorded: tuple[ModelDefense, DefenseSpec], model: torch.nn.Module
) -> None:
    """CheckpointError unless `model` is behind the model-level defense --finetune-checkpoint
    `source` carries (`recorded`), of the same spec."""
    defense, spec = recorded
    if classifier_of(model) is model:
        raise CheckpointError(
            f"--finetune-checkpoint {source} carries a {defense.title}; "
            f"give --frontend {frontend_flag(defense, 'FILE')} to train behind one"
        )
    if spec != model.spec:
        raise CheckpointError(
            f"--finetune-checkpoint {source} carries a {spec.describe()}, "
            f"--frontend a {model.spec.describe()}: give the same {defense.title}"
        )


def build_scaler(
    precision: amp.TrainingPrecision, start: Start, device: torch.device
) -> torch.amp.GradScaler:
    """fp16's loss scaler (--amp): the checkpoint's state, else a fresh one; a pass-through for
    bf16 and fp32."""
    scaler = amp.build_scaler(precision, device)
    if scaler.is_enabled() and start.grad_scaler is not None:
        scaler.load_state_dict(start.grad_scaler)
    return scaler


def build_ema(cfg: Config, model: torch.nn.Module, start: Start) -> WeightAverage | None:
    """The moving average (--moving-average-decay > 0): the checkpoint's, else from the start
    weights."""
    if not ema_enabled(cfg):
        return None
    ema = WeightAverage(model, cfg.moving_average_decay)
    if start.ema is not None:
        restore_ema(ema, start)
    return ema


def setup(
    cfg: Config,
    start: Start,
    train: Sequence[Sample] | None,
    num_classes: int,
    device,
    finetune: nets.Weights | None,
    env: distributed.DistEnv | None = None,
) -> Training:
    """Build the run's objects from the configuration, the start point and the fine-tuning
    weights (`env`: where this process sits, for --fsdp hybrid's machines)."""
    world = distributed.get_world_size()
    # A virtual batch of --accumulate micro-batches: the LR follows the images per update.
    total_batch = cfg.batch * world * cfg.accumulate
    steps = steps_per_epoch(cfg, len(train) if train else None, total_batch)
    torch.manual_seed(cfg.seed)
    precision = builders.attack_precision(cfg.use_fp16xla, device, cfg.fast_attack_dtype)
    step_precision = train_builders.training_precision(cfg.amp, cfg.amp_dtype, device)
    model = build_network(cfg, start, num_classes, device, finetune)
    sharded = cfg.fsdp is not None and world > 1
    if sharded:  # before the optimizer and the average, which then hold shards
        train_builders.shard_model(model, cfg, env, device, step_precision)
    optimizer = train_builders.build_optimizer(model, cfg)
    if start.optimizer is not None:
        restore_optimizer(optimizer, start)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if start.rng is not None:
        restore_generator(generator, start)
    ema = build_ema(cfg, model, start)
    scaler = build_scaler(step_precision, start, device)
    if start.sharded is not None:
        load_sharded_checkpoint(start.sharded, model, optimizer, generator, ema, scaler)
    # Dioptra's apply_fit: the training images pass through the defense (its random draws from
    # the checkpointed generator). The training attack and the loss both go through what a
    # white-box attack differentiates (BPDA for JPEG and for a model-level defense): its
    # forward pass is the real one and BPDA changes only the input gradient, which free
    # training's perturbation takes from the loss (through the real transforms it would be 0).
    trained = defenses.attack_model(defenses.defend(model, fit_defense(cfg), generator))
    spec = TrainSourceSpec(
        samples=train,
        batch=cfg.batch,
        image_size=cfg.image_size,
        augment=cfg.train_augment,
        num_classes=num_classes,
        workers=cfg.workers,
        seed=cfg.seed,
        rank=distributed.get_rank(),
        world_size=world,
        first_batch=loader_batches_before(start.progress.step, cfg.accumulate, cfg.free_replays),
        address=cfg.data_server,
        timeout_s=cfg.data_timeout,
        pin_memory=device.type == "cuda",
        data=cfg.data,
        layout=None if cfg.data is None else resolved_layout(cfg.data, cfg.data_layout),
        classes=None if cfg.data is None or cfg.fake else num_classes,
    )
    attacker_of_epoch = functools.partial(
        train_builders.build_epoch_attacker,
        cfg,
        num_classes=num_classes,
        precision=precision,
        generator=generator,
    )
    if sharded:
        attacker_of_epoch = fsdp.gathering_attacks(attacker_of_epoch, cfg.fsdp_attack_gather)
    attacker = attacker_of_epoch(start.progress.epoch + 1)
    restore_free_delta(attacker, start, device)
    return Training(
        cfg=cfg,
        model=model,
        ddp_model=trained if sharded else train_builders.wrap_model(trained, cfg, device, world),
        attack_model=trained,
        attacker=attacker,
        generator=generator,
        optimizer=optimizer,
        batches=train_batches(cfg.loader, cfg.fake, spec),
        precision=precision,
        amp=step_precision,
        scaler=scaler,
        steps=steps,
        total_batch=total_batch,
        device=device,
        loss=LossSettings(cfg.label_smoothing, adv_fraction(cfg), cfg.lp_weight, cfg.clip_grad),
        ema=ema,
        mixing=train_builders.mix_settings(cfg, num_classes) if mixing_enabled(cfg) else None,
        attacker_of_epoch=attacker_of_epoch,
    )


def run_training(cfg: Config, env: distributed.DistEnv, device: torch.device) -> TrainOutcome:
    """Train as configured, resuming the run directory's latest checkpoint if there is one;
    the run directory is locked against a second trainer while this one runs."""
    with RunDirectoryLock(resolve_logdir(cfg), distributed.is_main_process()) as lock:
        return _train_in(cfg, env, device, lock)


def _train_in(
    cfg: Config, env: distributed.DistEnv, device: torch.device, lock: RunDirectoryLock
) -> TrainOutcome:
    main_proc = distributed.is_main_process()
    classes, train, val = read_splits(cfg, main_proc)
    finetune = None  # --finetune-checkpoint's weights, read once
    if cfg.finetune_checkpoint is not None:  # its recorded architecture, where flags set none
        finetune = nets.read_weights(cfg.finetune_checkpoint)
        cfg = builders.with_recorded_architecture(cfg, finetune)
    num_classes = builders.resolve_num_classes(cfg, classes)
    check_splits(cfg, train, val, num_classes)
    logdir = resolve_logdir(cfg)
    check_run_directory(logdir)
    settings = dataclasses.asdict(cfg)
    check_trackers(settings)  # a tracker that cannot log stops the run before it has files
    lock.acquire(create=False)  # an existing run directory: before its checkpoints are read
    if cfg.fsdp is None:
        start = plan_start(logdir, cfg.load, cfg.starting_epoch, main_proc)
    else:
        start = sharded_checkpoints.plan_sharded_start(logdir, cfg.load, cfg.starting_epoch)
    check_same_start(start.progress, device)
    run = setup(cfg, start, train, num_classes, device, finetune, env)
    if start.progress.epoch >= cfg.epochs:
        if main_proc:
            print(
                f"{logdir}: already complete ({start.progress.epoch} of {cfg.epochs} epochs); "
                "nothing to train (a new --logdir, or more --epochs, trains again)",
                file=sys.stderr,
            )
        return TrainOutcome(model=whole_model(run, num_classes), logdir=logdir, results={})
    # The first batch before the run directory: a data server that is down leaves nothing.
    run.batches = itertools.chain([next(run.batches)], run.batches)
    facts = {**run_info(env, device), "logdir": logdir, "steps": run.steps}
    facts["attack_precision"] = run.precision.description
    facts["training_precision"] = run.amp.description
    facts["finetune_checkpoint"] = cfg.finetune_checkpoint
    facts["recipe"], facts["recipe_source"] = cfg.recipe, RECIPES[cfg.recipe].source
    if main_proc:
        lock.acquire(create=True)
        remove_partial_checkpoints(logdir)
        sharded_checkpoints.remove_partial(logdir)
        print(start_line(facts, start), file=sys.stderr)
        print(settings_line(cfg), file=sys.stderr)
        fitted = fitted_line(cfg.recipe, cfg.epochs, dataclasses.asdict(cfg))
        for line in (fitted, *stages.start_lines(cfg, start)):
            if line:
                print(line, file=sys.stderr)
    purge = start.progress.step + 1  # a killed run's steps after its checkpoint, logged again
    with run_directory_logger(logdir, settings, enabled=main_proc, purge_step=purge) as logger:
        logger.log_config(config_record(cfg, facts))
        results = train_epochs(run, start.progress, val, num_classes, logdir, logger)
    state_bytes = fsdp.local_state_bytes(run.model, run.optimizer)
    return TrainOutcome(whole_model(run, num_classes), logdir, results, state_bytes)


def read_splits(
    cfg: Config, main_proc: bool
) -> tuple[list[str] | None, list[Sample] | None, list[Sample] | None]:
    """``(classes, train samples, val samples)`` of --data (None where it has none, or for
    --fake); a warning where in-training evaluation finds no val/ split."""
    reader = None if cfg.fake or cfg.data is None else create_reader(cfg.data, cfg.data_layout)
    classes = reader.classes() if reader else None
    train = reader.samples("train") if reader and reader.has_split("train") else None
    if reader and train is None and cfg.loader == "local":
        raise DataError(f"--data: {cfg.data} has no train/ split to train on (--loader local)")
    val = reader.samples("val") if reader and reader.has_split("val") else None
    if val is None and reader and cfg.train_eval != "none" and main_proc:
        print(
            "warning: no val/ split in --data: in-training evaluation is skipped", file=sys.stderr
        )
    return classes, train, val


def check_splits(
    cfg: Config,
    train: Sequence[Sample] | None,
    val: Sequence[Sample] | None,
    num_classes: int,
) -> None:
    """Every label within `num_classes`; the val images' headers readable before training
    (when it is evaluated)."""
    for split, samples in (("train", train), ("val", val)):
        if samples:
            check_labels(samples, num_classes, split)
    if val and cfg.train_eval != "none":
        check_eval_headers(val, "val", cfg.skip_unreadable)


def train_epochs(
    run: Training,
    start: Progress,
    val: Sequence[Sample] | None,
    num_classes: int,
    logdir: str,
    logger: RunLogger,
) -> dict[str, EvalResult]:
    """The epochs after `start`, each saved and evaluated as scheduled (until the overfitting
    guard stops them); the last evaluations' results."""
    main_proc = distributed.is_main_process()
    results: dict[str, EvalResult] = {}
    step = start.step
    guard = train_builders.build_overfit_guard(run.cfg, val, run.device)
    if guard is not None:
        guard.remember(run.model)
    for epoch in range(start.epoch + 1, run.cfg.epochs + 1):
        step = train_epoch(run, epoch, step, logger)
        sync_buffers(run.model, run.ema)
        require_finite_weights(run.model, epoch)
        progress = Progress(epoch, step)
        if guard is not None and overfitted(guard, run.model, progress, logger):
            break
        free_deltas = gathered_free_delta(run.attacker)
        if run.cfg.fsdp is not None:  # every process writes its shards
            save_sharded_epoch(run, logdir, progress, num_classes, logger)
        elif main_proc:
            path = save_epoch(run, logdir, progress, num_classes, free_deltas, logger)
        if val:
            results = run_evals(run, val, num_classes, progress, logger)
            if main_proc and BEST_EVALUATION in results and run.cfg.fsdp is None:
                accuracy = results[BEST_EVALUATION].robust_accuracy
                link_best(path, BEST_EVALUATION, accuracy)
        distributed.barrier()
    return results


def save_epoch(
    run: Training,
    logdir: str,
    progress: Progress,
    num_classes: int,
    free_deltas: torch.Tensor | None,
    logger: RunLogger,
) -> Path:
    """Rank 0: the epoch's checkpoint, logged and linked as the last one."""
    logger.flush()  # the steps up to the checkpoint survive a kill right after it
    path = save_checkpoint(
        logdir,
        progress,
        run.model,
        run.optimizer,
        run.cfg.keep_checkpoints,
        architecture=builders.architecture_record(run.cfg, num_classes, defense_record(run.model)),
        attack_generator=run.generator,
        averaged=None if run.ema is None else run.ema.state_dict(),
        free_delta=free_deltas,
        grad_scaler=amp.scaler_state(run.scaler),
        stage=stages.epoch_stage(run.cfg, progress.epoch),
    )
    logger.log_result(
        "checkpoint", {"path": str(path), "step": progress.step, "epoch": progress.epoch}
    )
    link_last(path)
    return path


def save_sharded_epoch(
    run: Training, logdir: str, progress: Progress, num_classes: int, logger: RunLogger
) -> Path:
    """Every process (--fsdp): the epoch's sharded checkpoint (``iat.runs.sharded``), logged,
    linked as the last one and the older ones pruned by rank 0."""
    logger.flush()
    facts = {
        "epoch": progress.epoch,
        "step": progress.step,
        "architecture": builders.architecture_record(
            run.cfg, num_classes, defense_record(run.model)
        ),
        "grad_scaler": amp.scaler_state(run.scaler),
    }
    stage = stages.epoch_stage(run.cfg, progress.epoch)
    if stage is not None:
        facts[STAGE_FIELD] = stage
    path = sharded_checkpoints.save_sharded(
        sharded_checkpoint_path(logdir, progress.epoch),
        run.model,
        run.optimizer,
        run.generator,
        None if run.ema is None else run.ema.shadow,
        facts,
    )
    if distributed.is_main_process():
        logger.log_result(
            "checkpoint", {"path": str(path), "step": progress.step, "epoch": progress.epoch}
        )
        sharded_checkpoints.prune_and_link(logdir, path, run.cfg.keep_checkpoints)
    return path


def load_sharded_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    ema: WeightAverage | None,
    scaler: torch.amp.GradScaler,
) -> None:
    """Every process (--fsdp): the run state of sharded checkpoint `path`, loaded in place."""
    shadow = None if ema is None else ema.shadow
    state = sharded_checkpoints.load_sharded(path, model, optimizer, generator, shadow)
    if scaler.is_enabled() and state.get("grad_scaler") is not None:
        scaler.load_state_dict(state["grad_scaler"])


def whole_model(run: Training, num_classes: int, averaged: bool = False) -> torch.nn.Module:
    """The trained network whole, unsharded: `run.model` itself, or under --fsdp a copy built
    again and filled with every shard gathered (a collective: every process calls it); with
    `averaged`, the moving average's weights."""
    if not fsdp.fsdp_modules(run.model):
        return run.ema.averaged_model(run.model) if averaged else run.model
    shards = run.ema.shadow if averaged else run.model.state_dict()
    whole = builders.build_model(run.cfg, num_classes, run.device)
    whole.load_state_dict(fsdp.full_state(shards))
    return whole


def overfitted(
    guard: OverfitGuard, model: torch.nn.Module, progress: Progress, logger: RunLogger
) -> bool:
    """The guard's check after an epoch (every process alike: same weights, same draws),
    logged; on a collapse the weights roll back to the previous epoch's, this epoch is not
    saved, and training stops (Wong et al. 2020 Sec 5.2)."""
    collapsed, figures = guard.collapsed(model)
    scalars = {"guard/pgd_accuracy": figures.pgd, "guard/fgsm_accuracy": figures.fgsm}
    logger.log(progress.step, scalars, epoch=progress.epoch, phase="guard")
    if collapsed:
        guard.roll_back(model)
        logger.log_result("overfit_guard", {"epoch": progress.epoch, **scalars})
        if distributed.is_main_process():
            tqdm.write(
                f"epoch {progress.epoch}: catastrophic overfitting (held-out PGD accuracy "
                f"{figures.pgd:.3f}, FGSM {figures.fgsm:.3f}): stopped, weights of epoch "
                f"{progress.epoch - 1} kept"
            )
    return collapsed


def start_line(facts: dict, start: Start) -> str:
    """The run's first line: where it starts, where it runs, and how the attack computes."""
    where = start.describe()
    if start.kind == "fresh" and facts.get("finetune_checkpoint"):
        where = f"fine-tuning from the weights of {facts['finetune_checkpoint']}"
    return (
        f"{facts['logdir']}: {where}; {facts['world_size']} process(es) "
        f"({facts['launcher']}) on {facts['device']}, {facts['threads']} thread(s) each "
        f"({facts['cpus']} usable CPUs); attack: {facts['attack_precision']}; training step: "
        f"{facts['training_precision']}; recipe "
        f"{facts['recipe']} ({facts['recipe_source']})"
    )


def settings_line(cfg: Config) -> str:
    """Every resolved setting that applies, in the configuration's order: not the unset ones,
    nor ``depth`` where it chooses nothing (config.json holds them all)."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    if not depth_applies(cfg):
        values.pop("depth", None)
    return "settings: " + ", ".join(f"{name}={value}" for name, value in values.items())
