"""The training half of the builders: the training attack of each epoch (epsilon and step
warm-ups, soft targets under Mixup / CutMix, free training), Mixup / CutMix settings, the
overfitting guard, the optimizer and learning-rate schedule, the training step's precision
(--amp), and the DDP wrapper or the sharding (--fsdp).

``iat.builders`` builds what training and evaluation share (model, attack settings, attacker).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from iat.attacks import Attacker, attack_info, create_attacker
from iat.attacks.core import has_native_low_precision, pgd_step_size
from iat.attacks.spec import AttackSpec
from iat.builders import AttackPrecision, training_attack_settings
from iat.config import Config, mixing_enabled, stage_attack_spec, training_attack_spec
from iat.data.layouts import DataError, Sample
from iat.recipes.mixing import MixSettings
from iat.recipes.optim import OPTIMIZERS, OptimizerSettings, Schedule, param_groups, scheduled_lr
from iat.runtime.distributed import DistEnv
from iat.train import fsdp
from iat.train.amp import FP32, TrainingPrecision
from iat.train.overfit_guard import OverfitGuard, held_out_batch
from iat.train.soft_objective import SoftTargetPGD, soft_target_attacker


# --- training attack -------------------------------------------------------------------------
def build_training_attacker(
    cfg: Config,
    *,
    num_classes: int,
    precision: AttackPrecision,
    generator: torch.Generator,
    spec: AttackSpec | None = None,
) -> Attacker:
    """The training attack: `spec`, else --adv-method's spec (or the --attack-* flags), computed
    with `precision`, drawing from `generator`; with --free-replays > 1, free training's carried
    perturbation of the spec's epsilon instead (Shafahi et al. 2019)."""
    spec = spec or training_attack_spec(cfg)
    settings = training_attack_settings(
        cfg, spec, num_classes=num_classes, precision=precision, generator=generator
    )
    return create_attacker("free" if cfg.free_replays > 1 else spec.name, settings)


def warmup_factor(warmup_epochs: int, epoch: int) -> float:
    """min(1, (epoch - 1) / W) in epoch `epoch` (1-based): ARES 2.0's adversarial_training.py
    step ramp, ``min(epoch, 5) / 5`` of its 0-based epoch; 1 without a warm-up."""
    return 1.0 if warmup_epochs == 0 else min(1.0, (epoch - 1) / warmup_epochs)


def epoch_attack_spec(cfg: Config, epoch: int) -> AttackSpec:
    """The training attack of epoch `epoch`: its stage's (--attack-iter-schedule:
    ``stage_attack_spec``), epsilon and step scaled by their warm-ups. A PGD step is resolved
    first (``adv_model.pgd_step_size`` at full strength), then scaled; the hard-label PGD raises
    a step below epsilon / iterations again (the original's rule), the soft-target attack takes
    it as it is (ARES)."""
    spec = stage_attack_spec(cfg, epoch)
    full = spec.settings
    epsilon = full.epsilon * warmup_factor(cfg.eps_warmup_epochs, epoch)
    form = attack_info(spec.name).training
    if form is None or "step" not in form.warmups:  # a step of its own, following epsilon
        return dataclasses.replace(spec, settings=dataclasses.replace(full, epsilon=epsilon))
    step = pgd_step_size(full.epsilon, full.num_iter, full.step_size)
    step *= warmup_factor(cfg.step_warmup_epochs, epoch)
    scaled = dataclasses.replace(full, epsilon=epsilon, step_size=step)
    return dataclasses.replace(spec, settings=scaled)


def attack_changes(cfg: Config, epoch: int) -> bool:
    """Whether epoch `epoch`'s training attack differs from the epoch before's (a warm-up epoch,
    or a stage's first): the attacker is built anew for it."""
    return epoch > 1 and epoch_attack_spec(cfg, epoch) != epoch_attack_spec(cfg, epoch - 1)


def build_epoch_attacker(
    cfg: Config,
    epoch: int,
    *,
    num_classes: int,
    precision: AttackPrecision,
    generator: torch.Generator,
) -> Attacker | SoftTargetPGD:
    """The training attack of epoch `epoch` (``epoch_attack_spec``): on Mixup / CutMix's soft
    targets ``iat.train.soft_objective``'s, else ``build_training_attacker``'s."""
    spec = epoch_attack_spec(cfg, epoch)
    if mixing_enabled(cfg):
        return soft_target_attacker(spec, cfg.prob_start_from_clean, generator)
    return build_training_attacker(
        cfg, num_classes=num_classes, precision=precision, generator=generator, spec=spec
    )


def mix_settings(cfg: Config, num_classes: int) -> MixSettings:
    """timm's Mixup arguments from the configuration; label smoothing is folded into the soft
    targets."""
    return MixSettings(
        mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
        prob=cfg.mix_prob,
        switch_prob=cfg.mix_switch_prob,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )


def build_overfit_guard(
    cfg: Config, val: Sequence[Sample] | None, device: torch.device
) -> OverfitGuard | None:
    """--overfit-guard's check on the first --batch images of val/ at the training attack's
    epsilon; None when off. DataError without a val/ split."""
    if not cfg.overfit_guard:
        return None
    if not val:
        raise DataError("--overfit-guard: needs a val/ split (its first images are held out)")
    images, labels = held_out_batch(val, cfg.batch, cfg.image_size, device)
    epsilon = training_attack_spec(cfg).settings.epsilon
    return OverfitGuard(images, labels, epsilon, cfg.overfit_guard, cfg.seed)


# --- optimizer and schedule ------------------------------------------------------------------
def peak_lr(base_lr: float, total_batch: int) -> float:
    # "ImageNet in 1 Hour" Sec 2.1: linear scaling, lr = 0.1 * total_batch / 256 (in floating
    # point: the original's integer division trained batches below 256 at LR 0).
    return base_lr * total_batch / 256


def learning_rate(progress: float, cfg: Config, total_batch: int) -> float:
    """LR at `progress` epochs completed (fractional: set before every update). The warm-up
    starts at --warmup-factor x the peak or, by default, the original's: at base_lr, only when
    the scaled peak is higher ("ImageNet in 1 Hour" Sec 2.2: linear from 0.1 over 5 epochs)."""
    peak = peak_lr(cfg.base_lr, total_batch)
    start = cfg.base_lr if cfg.warmup_factor is None else cfg.warmup_factor * peak
    schedule = Schedule(
        epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        decay_epochs=cfg.lr_decay_epochs,
        min_factor=cfg.min_lr_factor,
        knots=cfg.lr_knots or (),
    )
    return scheduled_lr(cfg.lr_schedule, progress, peak, start, schedule)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """--optimizer over the trainable parameters (frozen ones, requires_grad False, are left
    out: no weight decay or momentum moves them), weight decay on weight matrices and kernels
    only (``iat.recipes.optim.decays``)."""
    settings = OptimizerSettings(lr=cfg.base_lr, momentum=cfg.momentum, betas=cfg.adam_betas)
    groups = param_groups(model.named_parameters(), cfg.weight_decay)
    return OPTIMIZERS[cfg.optimizer](groups, settings)


# --- precision -------------------------------------------------------------------------------
def training_precision(amp: bool, amp_dtype: str | None, device: torch.device) -> TrainingPrecision:
    """What --amp (--amp-dtype: "bfloat16" or "float16"; None: the device's) gives on `device`:

    * CUDA: bf16 where the GPU computes it (Ampere and later: no loss scaling needed), else fp16
      with a GradScaler; bf16 asked of an older GPU is refused;
    * a CPU with bf16 units (AVX512-BF16 or AMX): bf16; without them bf16 is emulated and many
      times slower than fp32 (bench/RESULTS.md, sections 1b and 14), so the step stays fp32 and
      the run's first line says why, as --use-fp16xla does;
    * fp16 on a CPU only with fp16 units (AVX512-FP16 or AMX-FP16), else refused: torch's CPU
      autocast runs fp16, but emulated, slower than fp32 and with fp16's narrow range.
    ValueError (one line) for a refused choice."""
    if not amp:
        return FP32
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        name = amp_dtype or ("bfloat16" if bf16 else "float16")
        if name == "bfloat16" and not bf16:
            raise ValueError("--amp-dtype bfloat16: this GPU has no bf16 units; use float16")
        return _autocast_precision(name)
    name = amp_dtype or "bfloat16"
    capabilities = torch.cpu.get_capabilities() if device.type == "cpu" else {}
    if name == "float16":
        if not any(capabilities.get(unit) for unit in ("avx512_fp16", "amx_fp16")):
            raise ValueError(
                f"--amp-dtype float16: {device.type} has no fp16 units (AVX512-FP16 or AMX-FP16); "
                "emulated fp16 is slower than fp32: use bfloat16, or no --amp"
            )
        return _autocast_precision(name)
    if not has_native_low_precision(device):
        return TrainingPrecision(
            None, "fp32: this CPU has no bf16 units, --amp would be emulated and slower"
        )
    return _autocast_precision(name)


def _autocast_precision(name: str) -> TrainingPrecision:
    if name == "float16":
        return TrainingPrecision(
            torch.float16, "fp16 autocast, loss scaled (GradScaler), fp32 weights (--amp)"
        )
    return TrainingPrecision(torch.bfloat16, "bf16 autocast, fp32 weights (--amp)")


# --- data parallelism ------------------------------------------------------------------------
def wrap_model(
    model: torch.nn.Module, cfg: Config, device: torch.device, world_size: int
) -> torch.nn.Module:
    """DistributedDataParallel averages gradients over all processes (the original's
    HorovodTrainer(average=True)); BatchNorm statistics stay per process unless --sync-bn."""
    if world_size == 1:
        return model
    if cfg.sync_bn:
        if device.type != "cuda":
            raise ValueError("--sync-bn: synchronised BatchNorm needs CUDA devices")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def shard_model(
    model: torch.nn.Module,
    cfg: Config,
    env: DistEnv,
    device: torch.device,
    precision: TrainingPrecision,
) -> torch.nn.Module:
    """--fsdp: `model` sharded in place over the processes as --fsdp arranges them
    (``iat.train.fsdp``), gathered in --amp's compute type. ValueError (one line) for fp16,
    whose loss scaler takes no sharded gradients here."""
    if precision.scaled:
        raise ValueError(
            "--fsdp: not with fp16 --amp (its loss scaler takes no sharded "
            "gradients); use --amp-dtype bfloat16"
        )
    mesh = fsdp.device_mesh(cfg.fsdp, env, device)
    return fsdp.shard_model(model, mesh, fsdp.mixed_precision(precision.dtype))
