"""Batch mixing on the device, after the batch arrives: Mixup (Zhang et al. 2018) and CutMix
(Yun et al. 2019) with soft targets, as timm's ``Mixup`` in its "batch" mode (one draw per
batch, each image mixed with the batch's reverse order) that ARES 2.0 and Singh et al.'s
revisiting-at train with.

The draws (whether to mix, which of the two, lambda, the box) come from a NumPy generator seeded
by (seed, rank, step, micro-batch) alone: nothing to checkpoint, and a resumed run mixes what the
uninterrupted run mixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MixSettings:
    """timm's Mixup arguments (mixup_alpha, cutmix_alpha, prob, switch_prob, label_smoothing)."""

    mixup_alpha: float  # Beta(alpha, alpha) of Mixup's lambda; 0: no Mixup
    cutmix_alpha: float  # Beta(alpha, alpha) of CutMix's box area; 0: no CutMix
    prob: float  # chance that a batch is mixed at all
    switch_prob: float  # with both on: chance that a mixed batch uses CutMix rather than Mixup
    label_smoothing: float  # folded into the soft targets (timm's mixup_target)
    num_classes: int

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclass(frozen=True)
class MixDraw:
    """One batch's mixing: lambda, the weight of the image's own label, and CutMix's box
    ``(top, bottom, left, right)`` (None for Mixup or no mixing)."""

    lam: float
    box: tuple[int, int, int, int] | None = None


def mixing_rng(seed: int, rank: int, step: int, micro_batch: int) -> np.random.Generator:
    """The draws of one micro-batch: depend on these numbers only (stream 4 of the seed)."""
    return np.random.default_rng([seed, 4, rank, step, micro_batch])


def cutmix_box(
    height: int, width: int, lam: float, rng: np.random.Generator
) -> tuple[tuple[int, int, int, int], float]:
    """Yun et al. 2019 Sec 3.1 (timm's ``rand_bbox``): a box of sides sqrt(1 - lam) x the
    image's, centred uniformly and clipped to the image; lambda corrected to the area kept
    (timm's correct_lam)."""
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    area = (bottom - top) * (right - left)
    return (int(top), int(bottom), int(left), int(right)), 1.0 - area / float(height * width)


def draw_mix(s: MixSettings, height: int, width: int, rng: np.random.Generator) -> MixDraw:
    """timm's ``Mixup._params_per_batch``: mixed with chance `prob`; with both kinds on, CutMix
    with chance `switch_prob`; lambda ~ Beta(alpha, alpha) of the kind chosen."""
    if not s.enabled or rng.random() >= s.prob:
        return MixDraw(1.0)
    use_cutmix = s.mixup_alpha <= 0 or (s.cutmix_alpha > 0 and rng.random() < s.switch_prob)
    alpha = s.cutmix_alpha if use_cutmix else s.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if not use_cutmix:
        return MixDraw(lam)
    box, lam = cutmix_box(height, width, lam, rng)
    return MixDraw(lam, box)


def soft_targets(labels: torch.Tensor, s: MixSettings, lam: float) -> torch.Tensor:
    """lam x the smoothed one-hot label + (1 - lam) x that of the image mixed in (the batch
    reversed); each row sums to 1 (timm's ``mixup_target``)."""
    off = s.label_smoothing / s.num_classes
    one_hot = F.one_hot(labels.long(), s.num_classes).float()
    smoothed = one_hot * (1.0 - s.label_smoothing) + off
    return smoothed * lam + smoothed.flip(0) * (1.0 - lam)


def mix_batch(
    images: torch.Tensor, labels: torch.Tensor, s: MixSettings, draw: MixDraw
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mixed images, soft targets [N, classes])``: each image blended with (Mixup) or
    pasted into by (CutMix) the image at the mirrored position of the batch."""
    if draw.lam == 1.0:
        return images, soft_targets(labels, s, 1.0)
    reverse = images.flip(0)
    if draw.box is None:
        mixed = images * draw.lam + reverse * (1.0 - draw.lam)
    else:
        top, bottom, left, right = draw.box
        mixed = images.clone()
        mixed[:, :, top:bottom, left:right] = reverse[:, :, top:bottom, left:right]
    return mixed, soft_targets(labels, s, draw.lam)
