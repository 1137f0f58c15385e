"""Adversarial training: PGD in the loop, data-parallel, checkpointed and resumable.

Feature Denoising Sec 5: every training image is replaced by its PGD adversarial example
(random target, 20% of batches start from the clean image), and the network is trained on
those only, with label smoothing 0.1. The schedule is "ImageNet in 1 Hour" (Goyal et al.).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import distributed
import nets
from adv_model import Attacker, attack_success, build_attacker
from checkpoint import (
    latest_checkpoint,
    read_training_state,
    remove_partial_checkpoints,
    save_checkpoint,
)
from config import Config, default_logdir, save_config
from data import fake_batches, local_train_batches, server_batches, to_model_input
from evaluate import EvalResult, evaluate_attack
from run_logging import RunLogger
from runtime import dataset_classes, load_model, resolve_num_classes, split_exists
from third_party.imagenet import list_split
from third_party.zmq_protocol import default_address

IMAGENET_TRAIN_IMAGES = 1281167  # the original's steps per epoch for --fake runs
Sample = tuple[str, int]


# --- schedule --------------------------------------------------------------------------------
def peak_lr(base_lr: float, total_batch: int) -> float:
    # "ImageNet in 1 Hour" Sec 2.1: linear scaling, lr = 0.1 * total_batch / 256 (in floating
    # point: the original's integer division trained batches below 256 at LR 0).
    return base_lr * total_batch / 256


def learning_rate(progress: float, cfg: Config, total_batch: int) -> float:
    """LR at `progress` epochs completed (fractional)."""
    peak = peak_lr(cfg.base_lr, total_batch)
    if progress < cfg.warmup_epochs and peak > cfg.base_lr:
        # "ImageNet in 1 Hour" Sec 2.2: gradual warm-up, linear from 0.1 over 5 epochs.
        return cfg.base_lr + (peak - cfg.base_lr) * progress / cfg.warmup_epochs
    decays = sum(progress >= e for e in cfg.lr_decay_epochs)
    return peak * 0.1**decays


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    # Weight decay 1e-4 on conv and fc weights only, not on BatchNorm parameters or biases
    # (the original regularises '.*/W'). Nesterov momentum 0.9 ("ImageNet in 1 Hour" Sec 5.1).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum, nesterov=True)


# --- in-training evaluation ------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSpec:
    name: str
    attack_iter: int
    when: Callable[[int, int], bool]  # (epoch, max_epoch) -> run it after this epoch?


def eval_schedule(kind: str) -> list[EvalSpec]:
    """The original's in-training evaluations (always run in the last 2 epochs)."""
    if kind == "none":
        return []
    every = EvalSpec("eval-clean", 0, lambda e, m: True)
    ten = EvalSpec("eval-10step", 10, lambda e, m: True)
    if kind == "light":
        return [every, ten]
    return [
        every,
        ten,
        EvalSpec("eval-50step", 50, lambda e, m: e % 20 == 0 or e > m - 2),
        EvalSpec("eval-100step", 100, lambda e, m: e % 10 == 0 or e > m - 5),
    ]


def run_evals(
    model: torch.nn.Module,
    cfg: Config,
    val: Sequence[Sample],
    num_classes: int,
    epoch: int,
    device: torch.device,
) -> dict[str, EvalResult]:
    results = {}
    for spec in eval_schedule(cfg.train_eval):
        if not spec.when(epoch, cfg.epochs):
            continue
        results[spec.name] = evaluate_attack(
            model,
            cfg,
            val,
            attack_iter=spec.attack_iter,
            num_classes=num_classes,
            device=device,
            desc=spec.name,
        )
    return results


# --- the training loop -----------------------------------------------------------------------
@dataclass
class Meter:
    """Sums on the device; read (one host sync) only when logging."""

    device: torch.device

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        self.start = time.perf_counter()

    def add(self, loss, logits, labels, targets) -> None:
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        self.sums += torch.stack(
            [
                torch.tensor(labels.shape[0], device=logits.device, dtype=torch.float64),
                loss.detach().double() * labels.shape[0],
                (logits.argmax(dim=1) != labels).sum().double(),
                (~(top5 == labels[:, None]).any(dim=1)).sum().double(),
                attack_success(logits, labels, targets).sum().double(),
            ]
        )

    def read(self) -> dict[str, float]:
        n, loss, top1, top5, success = self.sums.tolist()
        seconds = time.perf_counter() - self.start
        n = max(n, 1.0)
        return {
            "train/loss": loss / n,
            "train/top1_error": top1 / n,
            "train/top5_error": top5 / n,
            "train/attack_success_rate": success / n,
            "train/images_per_sec_per_process": n / max(seconds, 1e-9),
        }


def train_step(
    model: torch.nn.Module,
    raw_model: torch.nn.Module,
    attacker: Attacker,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step: attack (BN in inference mode, on the unwrapped model), then learn on the result."""
    adv, targets = attacker.attack(raw_model, images, labels)
    logits = model(adv)
    # Feature Denoising Sec 5: label smoothing 0.1 on the adversarial images.
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits.detach(), targets


def train_epoch(
    *,
    model: torch.nn.Module,
    raw_model: torch.nn.Module,
    attacker: Attacker,
    optimizer: torch.optim.Optimizer,
    batches: Iterator,
    cfg: Config,
    epoch: int,
    steps: int,
    first_step: int,
    total_batch: int,
    device: torch.device,
    logger: RunLogger,
) -> int:
    """Run `steps` steps of epoch `epoch` (1-based); returns the global step afterwards."""
    model.train()
    meter = Meter(device)
    step = first_step
    start = time.perf_counter()
    bar = tqdm(
        range(steps),
        desc=f"epoch {epoch}/{cfg.epochs}",
        disable=not distributed.is_main_process(),
        dynamic_ncols=True,
    )
    for i in bar:
        images, labels = next(batches)
        lr = learning_rate(epoch - 1 + i / steps, cfg, total_batch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, labels = to_model_input(images, device), labels.to(device, non_blocking=True)
        loss, logits, targets = train_step(
            model, raw_model, attacker, optimizer, images, labels, cfg.label_smoothing
        )
        meter.add(loss, logits, labels, targets)
        step += 1
        if step % cfg.log_every == 0 or i == steps - 1:
            scalars = meter.read()
            scalars["train/images_per_sec"] = scalars["train/images_per_sec_per_process"] * (
                total_batch / cfg.batch
            )
            scalars["train/lr"] = lr
            logger.log(step, scalars, epoch=epoch, phase="train")
            bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", lr=f"{lr:.4g}")
            meter.reset()
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"training diverged: loss is {loss.item()} in epoch {epoch}")
    per_process = steps * cfg.batch / (time.perf_counter() - start)
    if distributed.is_main_process():
        tqdm.write(
            f"epoch {epoch}: {per_process:.1f} images/s per process, "
            f"{per_process * total_batch / cfg.batch:.1f} images/s in total"
        )
    return step


# --- setting up a run ------------------------------------------------------------------------
def resolve_logdir(cfg: Config) -> str:
    return cfg.logdir or default_logdir(cfg, distributed.get_world_size())


def steps_per_epoch(cfg: Config, num_train: int | None, total_batch: int) -> int:
    if cfg.steps_per_epoch is not None:
        return cfg.steps_per_epoch
    return max(1, (num_train or IMAGENET_TRAIN_IMAGES) // total_batch)


def batch_stream(
    cfg: Config, train: Sequence[Sample] | None, num_classes: int, steps: int, start_epoch: int
) -> Iterator:
    """All training batches of the run as one iterator, epoch after epoch."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    if cfg.fake:
        yield from fake_batches(cfg.batch, cfg.image_size, num_classes, cfg.seed + rank)
    elif cfg.loader == "server":
        address = cfg.data_server or default_address(cfg.batch)
        yield from server_batches(address, cfg.data_timeout, torch.cuda.is_available())
    else:
        for epoch in range(start_epoch, cfg.epochs + 1):
            yield from local_train_batches(
                train,
                epoch=epoch,
                steps=steps,
                batch=cfg.batch,
                rank=rank,
                world_size=world,
                image_size=cfg.image_size,
                augment_kind=cfg.train_augment,
                workers=cfg.workers,
                seed=cfg.seed,
            )


def wrap_model(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel averages gradients over all processes (the original's
    HorovodTrainer(average=True)); BatchNorm statistics stay per process unless --sync-bn."""
    if distributed.get_world_size() == 1:
        return model
    if cfg.sync_bn:
        if device.type != "cuda":
            raise ValueError("--sync-bn: synchronised BatchNorm needs CUDA devices")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def sync_buffers(model: torch.nn.Module) -> None:
    """Give every process rank 0's BatchNorm statistics before evaluating or saving."""
    for buf in model.buffers():
        distributed.broadcast_tensor(buf, src=0)


def restore(cfg: Config, logdir: str, model: torch.nn.Module, optimizer) -> tuple[int, int]:
    """Resume from the run directory's latest checkpoint (a relaunch), else from --load.

    Returns (first epoch to run, global step)."""
    path = latest_checkpoint(logdir)
    source = str(path) if path is not None else cfg.load
    if source is None:
        return cfg.starting_epoch, 0
    nets.load_weights(model, source)
    state = read_training_state(source)
    if state is None:
        return cfg.starting_epoch, 0
    optimizer.load_state_dict(state["optimizer"])
    if distributed.is_main_process():
        print(f"resuming from {source} after epoch {state['epoch']}", file=sys.stderr)
    return state["epoch"] + 1, state["step"]


def check_same_start(start_epoch: int, step: int, device: torch.device) -> None:
    """Every process must resume from the same point (rank 0's), or DDP would mix schedules."""
    mine = torch.tensor([start_epoch, step], dtype=torch.int64, device=device)
    reference = distributed.broadcast_tensor(mine.clone(), src=0)
    disagree = distributed.all_reduce_sum((mine != reference).any().to(torch.int64))
    if disagree.item():
        raise ValueError(
            f"--logdir: processes would resume from different points (rank 0: epoch "
            f"{int(reference[0])}, rank {distributed.get_rank()}: epoch {start_epoch}); the run "
            "directory must be on a filesystem that every machine sees"
        )


def run_info(env: distributed.DistEnv, device: torch.device) -> dict:
    return {
        "world_size": distributed.get_world_size(),
        "launcher": env.launcher,
        "device": str(device),
        "torch": torch.__version__,
        "argv": sys.argv,
    }


@dataclass(frozen=True)
class TrainOutcome:
    model: torch.nn.Module  # the trained network (unwrapped), on its device
    logdir: str  # where its checkpoints, config.json and metrics.jsonl are
    results: dict[str, EvalResult]  # the last in-training evaluations


def run_training(cfg: Config, env: distributed.DistEnv, device: torch.device) -> TrainOutcome:
    """Train as configured, resuming the run directory's latest checkpoint if there is one."""
    classes = dataset_classes(cfg)
    train = list_split(cfg.data, "train")[0] if classes is not None else None
    val = list_split(cfg.data, "val")[0] if cfg.data and split_exists(cfg.data, "val") else None
    if val is None and cfg.data and cfg.train_eval != "none" and distributed.is_main_process():
        print(
            "warning: no val/ split in --data: in-training evaluation is skipped", file=sys.stderr
        )
    num_classes = resolve_num_classes(cfg, classes)
    world = distributed.get_world_size()
    total_batch = cfg.batch * world
    steps = steps_per_epoch(cfg, len(train) if train else None, total_batch)
    logdir = resolve_logdir(cfg)
    main_proc = distributed.is_main_process()
    if main_proc:
        Path(logdir).mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(logdir)
        save_config(cfg, logdir, {**run_info(env, device), "logdir": logdir, "steps": steps})
    torch.manual_seed(cfg.seed)
    model = load_model(cfg, num_classes, device)
    optimizer = build_optimizer(model, cfg)
    start_epoch, step = restore(cfg, logdir, model, optimizer)
    check_same_start(start_epoch, step, device)
    ddp_model = wrap_model(model, cfg, device)
    attacker = build_attacker(
        cfg.attack_iter,
        cfg.attack_epsilon,
        cfg.attack_step_size,
        prob_start_from_clean=cfg.prob_start_from_clean,
        target=None if cfg.attack_target == "none" else cfg.attack_target,
        num_classes=num_classes,
        fast=cfg.use_fp16xla,
    )
    batches = batch_stream(cfg, train, num_classes, steps, start_epoch)
    results: dict[str, EvalResult] = {}
    with RunLogger(logdir if main_proc else None) as logger:
        for epoch in range(start_epoch, cfg.epochs + 1):
            step = train_epoch(
                model=ddp_model,
                raw_model=model,
                attacker=attacker,
                optimizer=optimizer,
                batches=batches,
                cfg=cfg,
                epoch=epoch,
                steps=steps,
                first_step=step,
                total_batch=total_batch,
                device=device,
                logger=logger,
            )
            sync_buffers(model)
            if main_proc:
                save_checkpoint(
                    logdir,
                    epoch=epoch,
                    step=step,
                    model=model,
                    optimizer=optimizer,
                    keep=cfg.keep_checkpoints,
                )
            if val:
                results = run_evals(model, cfg, val, num_classes, epoch, device)
                log_evals(logger, results, step, epoch)
            distributed.barrier()
    return TrainOutcome(model=model, logdir=logdir, results=results)


def log_evals(logger: RunLogger, results: dict[str, EvalResult], step: int, epoch: int) -> None:
    for name, r in results.items():
        scalars = {
            f"{name}/top1_error": r.top1_error,
            f"{name}/top5_error": r.top5_error,
            f"{name}/attack_success_rate": r.attack_success_rate,
        }
        logger.log(step, scalars, epoch=epoch, phase=name, images=r.images)
        if distributed.is_main_process():
            tqdm.write(
                f"epoch {epoch} {name}: top1 error {r.top1_error:.4f}, "
                f"top5 error {r.top5_error:.4f}, attack success {r.attack_success_rate:.4f} "
                f"({r.images} images)"
            )
