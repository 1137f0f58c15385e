"""The fast gradient method under L-inf, L2 or L1 (NIST Dioptra's ``norm``), and its minimal-
perturbation mode (epsilon grows by ``eps_step`` until each example breaks). Registered as
``fgm`` and ``fgm-minimal``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from iat.attacks.core import (
    NORMS,
    PIXEL_MAX,
    PIXEL_MIN,
    Attacker,
    AttackSettings,
    attack_success,
    choose_targets,
)
from iat.attacks.ops import (
    check_threat_model,
    clip_pixels,
    example_gain,
    gain_and_grad,
    histogram_median,
    per_example,
    unit_l2,
)
from iat.attacks.registry import AttackInfo, ball_words, goal_words, option_words, register


def l1_box_ascent(grad: Tensor, clean: Tensor, epsilon: float) -> Tensor:
    """The steepest-ascent L1 step that stays in the pixel box: the exact maximiser of
    ``<grad, delta>`` over ``||delta||_1 <= epsilon`` and ``clean + delta`` in [0, 255].

    This linear program is a fractional knapsack: coordinates are filled in decreasing order of
    ``|grad|``, each up to its room in the gradient's direction (255 - x upwards, x downwards),
    until the budget is spent. Without the box it moves only the top coordinate (the textbook L1
    steepest ascent), which the box would mostly cut off at this scale."""
    flat = grad.flatten(1)
    room = torch.where(flat > 0, PIXEL_MAX - clean.flatten(1), clean.flatten(1) - PIXEL_MIN)
    room = torch.where(flat == 0, torch.zeros_like(room), room)
    order = flat.abs().argsort(dim=1, descending=True)
    sorted_room = room.gather(1, order)
    spent_before = sorted_room.cumsum(dim=1) - sorted_room
    share = (epsilon - spent_before).clamp(min=0.0).minimum(sorted_room)
    amount = torch.zeros_like(flat).scatter(1, order, share)
    return (amount * flat.sign()).reshape(grad.shape)


def fgm_point(clean: Tensor, grad: Tensor, norm: str, epsilon: float) -> Tensor:
    """One step of size ``epsilon`` in the ``norm``'s steepest-ascent direction, in [0, 255].

    Clipping to the pixel range only moves coordinates towards the clean image, so the step's
    norm stays <= epsilon."""
    if norm == "inf":
        return clip_pixels(clean + epsilon * grad.sign())
    if norm == "2":
        return clip_pixels(clean + epsilon * unit_l2(grad))
    return clip_pixels(clean + l1_box_ascent(grad, clean, epsilon))


class FGMAttacker(Attacker):
    """The fast gradient method: one step of size ``epsilon`` from the clean image (NIST
    Dioptra's / ART's ``FastGradientMethod``), under ``norm`` "inf" (sign), "2" (grad/||grad||_2)
    or "1" (``l1_box_ascent``), clipped to [0, 255].

    ``minimal``: Dioptra's minimal-perturbation mode. With the gradient of the clean image,
    epsilon takes the values 0 (the clean image), eps_step, 2 eps_step, ... up to ``epsilon``
    (the last value), and each example keeps the first one at which the attack succeeds (the
    ``epsilon`` point where none does). ``last_min_epsilon`` is that value per example of the
    last batch (inf where none succeeded); the batch statistics count examples per value, so an
    evaluator can sum them over batches and processes and take their median exactly.

    ``target`` as ``PGDAttacker`` (None: untargeted); ``loss`` "ce" or "cw" (logit margin).
    """

    def __init__(
        self,
        epsilon: float,
        norm: str = "inf",
        target: str | None = None,
        loss: str = "ce",
        minimal: bool = False,
        eps_step: float = 1.0,
        num_classes: int | None = None,
        generator: torch.Generator | None = None,
        eot_samples: int = 1,
    ) -> None:
        check_threat_model(epsilon, norm, ("inf", "2", "1"), loss)
        if minimal and eps_step <= 0:
            raise ValueError(f"eps_step must be > 0, got {eps_step}")
        self.epsilon = float(epsilon)
        self.norm = norm
        self.target = target
        self.loss = loss
        self.minimal = minimal
        self.eps_step = float(eps_step)
        self.num_classes = num_classes
        self.generator = generator
        self.eot_samples = eot_samples  # draws averaged per gradient against a random defense
        self.last_min_epsilon: Tensor | None = None
        bins = len(self.levels()) + 1 if minimal else 0
        self._level_counts = torch.zeros(bins, dtype=torch.float64)

    def levels(self) -> list[float]:
        """The epsilons the minimal mode tries, in order: 0, eps_step, 2 eps_step, ..., epsilon."""
        count = math.ceil(self.epsilon / self.eps_step - 1e-9)
        return [0.0] + [min(k * self.eps_step, self.epsilon) for k in range(1, count + 1)]

    def attack(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        with self._opening(model, images, labels, generator) as (clean, labels, generator):
            targets = choose_targets(model, clean, labels, self.target, self.num_classes, generator)
            gain = partial(example_gain, labels=labels, targets=targets, loss=self.loss)
            _, grad, _ = gain_and_grad(model, clean, gain, self.eot_samples)
            if not self.minimal:
                return fgm_point(clean, grad, self.norm, self.epsilon), targets
            with torch.no_grad():
                adv = self._minimal(model, clean, grad, labels, targets)
        return adv, targets

    def _minimal(
        self, model: nn.Module, clean: Tensor, grad: Tensor, labels: Tensor, targets: Tensor
    ) -> Tensor:
        """Every level on the whole batch (no host sync), largest first, so that the smallest
        successful level is the one each example keeps."""
        levels = self.levels()
        adv = fgm_point(clean, grad, self.norm, self.epsilon)
        index = torch.full(labels.shape, len(levels), dtype=torch.int64, device=clean.device)
        for i in reversed(range(len(levels))):
            point = fgm_point(clean, grad, self.norm, levels[i])
            success = attack_success(model(point), labels, targets)
            adv = torch.where(per_example(success, adv), point, adv)
            index = torch.where(success, i, index)
        values = torch.tensor([*levels, float("inf")], device=clean.device)
        self.last_min_epsilon = values[index]
        self._level_counts = torch.bincount(index, minlength=len(levels) + 1).double()
        return adv

    def stats_template(self, device: torch.device) -> dict[str, Tensor]:
        if not self.minimal:
            return {}
        return {"min_epsilon_counts": torch.zeros(len(self.levels()) + 1, device=device).double()}

    def batch_stats(self) -> dict[str, Tensor]:
        return {"min_epsilon_counts": self._level_counts} if self.minimal else {}

    def describe_stats(self, stats: dict[str, Tensor], images: int) -> dict[str, object]:
        if not self.minimal:
            return {}
        values = [*self.levels(), float("inf")]
        return {"median_min_epsilon": histogram_median(stats["min_epsilon_counts"], values)}


@register("fgm", "FGM", norms=NORMS, iterations=False, loss=True, targets="flag")
def fgm_from_settings(settings: AttackSettings, minimal: bool = False) -> FGMAttacker:
    return FGMAttacker(
        settings.epsilon,
        norm=settings.norm,
        target=settings.target,
        loss=settings.loss,
        minimal=minimal,
        eps_step=settings.eps_step,
        num_classes=settings.num_classes,
        generator=settings.generator,
        eot_samples=settings.eot_samples,
    )


def minimal_words(info: AttackInfo, settings: AttackSettings) -> str:
    """ "FGM-minimal untargeted, L2 eps=600 in steps of 150"."""
    steps = f" in steps of {settings.eps_step:g}"
    return f"{info.title} {goal_words(info, settings)}, {ball_words(settings)}{steps}" + (
        option_words(info, settings)
    )


def minimal_figures(details: dict) -> str:
    return f", median minimal eps {details['median_min_epsilon']:g}"


@register(
    "fgm-minimal",
    "FGM-minimal",
    norms=NORMS,
    iterations=False,
    loss=True,
    targets="flag",
    words=minimal_words,
    extra_record=lambda settings: {"eps_step": settings.eps_step},
    figures=minimal_figures,
)
def fgm_minimal(settings: AttackSettings) -> FGMAttacker:
    return fgm_from_settings(settings, minimal=True)
