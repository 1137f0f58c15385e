"""Adapters between this project's input convention and the RobustBench / AutoAttack one.

This project's models take float NCHW **BGR** images in **pixel units [0, 255]** and normalise
them themselves (the original's convention). RobustBench, AutoAttack and most attack libraries
expect a model taking **RGB in [0, 1]**. ``to_unit_rgb(model)`` gives such a model for them;
``from_unit_rgb(model)`` brings any model of that ecosystem here, where it can be evaluated and
adversarially trained like a registered architecture (e.g. registered with ``nets.register``).
Both are plain ``nn.Module`` wrappers: gradients flow through, so white-box attacks see the
wrapped model exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from nets.layers import bgr_pixels_to_unit_rgb, unit_rgb_to_bgr_pixels


class UnitRGBInput(nn.Module):
    """A model of this project, called with RGB images in [0, 1]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(unit_rgb_to_bgr_pixels(images))


class BGRPixelInput(nn.Module):
    """A model taking RGB in [0, 1] (RobustBench's convention), called as this project's are."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(bgr_pixels_to_unit_rgb(images))


def to_unit_rgb(model: nn.Module) -> nn.Module:
    """``model`` (BGR pixels in) as a RobustBench-style model (RGB [0, 1] in); the inverse of
    ``from_unit_rgb``."""
    return model.model if isinstance(model, BGRPixelInput) else UnitRGBInput(model)


def from_unit_rgb(model: nn.Module) -> nn.Module:
    """A RobustBench-style model (RGB [0, 1] in) as this project's models are called (BGR
    pixels in); the inverse of ``to_unit_rgb``."""
    return model.model if isinstance(model, UnitRGBInput) else BGRPixelInput(model)
