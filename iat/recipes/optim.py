"""Optimizers and learning-rate schedules: the registries ``--optimizer`` and ``--lr-schedule``
choose from, the weight-decay rule, and the schedules as closed forms of the progress.

The learning rate is a pure function of the fractional epochs completed, set before every
update (per iteration), so a resumed run recomputes it exactly; the optimizers' moments are in
the optimizer's state_dict, which every checkpoint holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

# Parameters never decayed whatever their shape: position embeddings and tokens (timm's
# VisionTransformer.no_weight_decay: pos_embed, cls_token, dist_token; Swin's relative position
# bias tables), matched on the last component of the parameter's name.
NO_DECAY_NAMES = (
    "pos_embed",
    "cls_token",
    "dist_token",
    "reg_token",
    "mask_token",
    "relative_position_bias_table",
)


def decays(name: str, param: torch.nn.Parameter) -> bool:
    """Whether weight decay applies: to weight matrices and kernels only, not to norms' scales
    and shifts, biases, layer scales (ndim <= 1), position embeddings or tokens (as the
    original's '.*/W' regularisation, Singh et al.'s revisiting-at ``create_optimizer`` and
    timm's ``param_groups_weight_decay``)."""
    last = name.rsplit(".", 1)[-1]
    return param.ndim > 1 and not name.endswith("bias") and last not in NO_DECAY_NAMES


def param_groups(
    named: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float
) -> list[dict]:
    """Two groups of the trainable parameters (frozen ones are left out: nothing moves them):
    decayed, then not decayed."""
    trainable = [(n, p) for n, p in named if p.requires_grad]
    return [
        {"params": [p for n, p in trainable if decays(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in trainable if not decays(n, p)], "weight_decay": 0.0},
    ]


@dataclass(frozen=True)
class OptimizerSettings:
    """What an optimizer factory may use (the LR is set before every update)."""

    lr: float
    momentum: float  # SGD's (Nesterov) momentum
    betas: tuple[float, float]  # AdamW's moment decays


def _sgd(groups: list[dict], s: OptimizerSettings) -> torch.optim.Optimizer:
    # "ImageNet in 1 Hour" Sec 5.1 / the original: Nesterov momentum 0.9.
    return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, nesterov=True)


def _adamw(groups: list[dict], s: OptimizerSettings) -> torch.optim.Optimizer:
    # Loshchilov & Hutter 2019, decoupled weight decay (the decay of each group).
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas)


OPTIMIZERS: dict[str, Callable[[list[dict], OptimizerSettings], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adamw": _adamw,
}


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule in units of the peak LR, as a function of epochs completed."""

    epochs: int  # the run's length
    warmup_epochs: float  # linear warm-up length (step, cosine)
    decay_epochs: tuple[int, ...]  # step: x0.1 after each of these
    min_factor: float  # cosine: the floor, a fraction of the peak
    knots: tuple[float, ...]  # cyclic: epoch, factor, epoch, factor, ... (interpolated)


def _step(t: float, s: Schedule) -> float:
    # Feature Denoising Sec 5 / "ImageNet in 1 Hour": divided by 10 after each decay epoch.
    return 0.1 ** sum(t >= e for e in s.decay_epochs)


def _cosine(t: float, s: Schedule) -> float:
    # Loshchilov & Hutter 2017 (SGDR) without restarts, from the peak after the warm-up down to
    # the floor at the last epoch (Singh et al.'s revisiting-at main.py get_cosine_lr).
    span = max(s.epochs - s.warmup_epochs, 1e-12)
    done = min(max((t - s.warmup_epochs) / span, 0.0), 1.0)
    return s.min_factor + (1 - s.min_factor) * 0.5 * (1 + math.cos(math.pi * done))


def default_knots(epochs: int) -> tuple[float, ...]:
    """Wong, Rice & Kolter 2020's cyclic LR (fast_adversarial CIFAR10/train_fgsm.py): 0 up to
    the peak at 2/5 of the run, back down to 0 at its end."""
    return (0.0, 0.0, 2 * epochs / 5, 1.0, float(epochs), 0.0)


def _cyclic(t: float, s: Schedule) -> float:
    knots = s.knots or default_knots(s.epochs)
    return float(np.interp(t, knots[0::2], knots[1::2]))


# --lr-schedule choices: name -> factor of the peak LR at fractional epoch t (before warm-up).
LR_SCHEDULES: dict[str, Callable[[float, Schedule], float]] = {
    "step": _step,
    "cosine": _cosine,
    "cyclic": _cyclic,
}
WARMS_UP = ("step", "cosine")  # cyclic's knots include their own warm-up


def scheduled_lr(name: str, t: float, peak: float, warmup_start: float, s: Schedule) -> float:
    """The LR of schedule `name` at `t` epochs completed: `peak` x its factor, after the linear
    warm-up from `warmup_start` over ``warmup_epochs`` (per iteration: `t` is fractional) where
    the schedule has one and starts below the peak."""
    if name in WARMS_UP and t < s.warmup_epochs and warmup_start < peak:
        return warmup_start + (peak - warmup_start) * t / s.warmup_epochs
    return peak * LR_SCHEDULES[name](t, s)


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float | None) -> None:
    """Scale the gradients so that their global L2 norm is at most `max_norm` (None: off)."""
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(params), max_norm)
