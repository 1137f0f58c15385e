"""Mixed-precision training (--amp, timm's convention): the training forward pass under autocast
and its backward pass through the autocast graph, while the weights, the optimizer's state, the
loss (cross-entropy, logit pairing) and BatchNorm's statistics stay fp32. fp16 scales the loss
(``torch.amp.GradScaler``: dynamic, steps with overflowing gradients skipped) and its state
travels in every checkpoint; bf16 has fp32's range and needs no scaling. The training attack's
precision is apart (--use-fp16xla, ``iat.builders.attack_precision``), and evaluation stays fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TrainingPrecision:
    """How the training step computes (``iat.train.builders.training_precision`` decides)."""

    dtype: torch.dtype | None  # autocast's compute type; None: fp32 throughout
    description: str  # said in the run's first line and in config.json

    @property
    def scaled(self) -> bool:
        """Whether the loss is scaled (fp16's narrow range; bf16 and fp32 need no scaling)."""
        return self.dtype == torch.float16


FP32 = TrainingPrecision(None, "fp32")


def autocast_forward(model: nn.Module, dtype: torch.dtype | None) -> Callable[[Tensor], Tensor]:
    """`model`'s forward pass under autocast to `dtype`, its logits returned as fp32, so that the
    loss built on them is computed in fp32; `model` itself when `dtype` is None. The backward
    pass, run outside autocast, follows the autocast graph (torch's recommended use)."""
    if dtype is None:
        return model

    def forward(images: Tensor) -> Tensor:
        with torch.autocast(images.device.type, dtype=dtype):
            logits = model(images)
        return logits.float()

    return forward


def build_scaler(precision: TrainingPrecision, device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler: on for fp16, a pass-through otherwise (its state then empty)."""
    return torch.amp.GradScaler(device.type, enabled=precision.scaled)


def scaler_state(scaler: torch.amp.GradScaler) -> dict | None:
    """What a checkpoint keeps of `scaler` (its scale and growth tracker); None when off."""
    return scaler.state_dict() if scaler.is_enabled() else None
