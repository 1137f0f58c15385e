"""An exponential moving average of a model's weights (parameters and BatchNorm statistics).

ALP's train.py averages every model variable with ``tf.train.ExponentialMovingAverage(decay,
global_step)`` and evaluates the averages; this is the same average, kept beside the raw
weights, saved in checkpoints (``run_state``) and loaded for evaluation on request.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch


def ema_decay(decay: float, num_updates: int) -> float:
    """The decay of update `num_updates` (1-based): min(decay, (1 + n) / (10 + n)), as
    ``tf.train.ExponentialMovingAverage`` given ``num_updates``: early averages forget the
    random initialisation quickly."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


class WeightAverage:
    """Shadow copies of a model's state_dict entries, moved toward the model after each update.

    Floating-point entries are averaged; integer ones (BatchNorm's ``num_batches_tracked``) are
    copied."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, num_updates: int) -> None:
        """shadow -= (1 - d) * (shadow - weight), d = ``ema_decay(decay, num_updates)``."""
        weight = 1.0 - ema_decay(self.decay, num_updates)
        for key, value in model.state_dict().items():
            shadow = self.shadow[key]
            if shadow.is_floating_point():
                shadow.sub_(weight * (shadow - value))
            else:
                shadow.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore saved averages; KeyError / RuntimeError when they do not fit the model."""
        if state.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state.keys())[:3]
            unexpected = sorted(state.keys() - self.shadow.keys())[:3]
            raise KeyError(f"missing {missing}, unexpected {unexpected}")
        for key, value in state.items():
            self.shadow[key].copy_(value)

    def averaged_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of `model` holding the averaged weights (the model itself is untouched)."""
        averaged = copy.deepcopy(model)
        averaged.load_state_dict(self.shadow, strict=True)
        return averaged
