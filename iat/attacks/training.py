"""Training-only attacks: free adversarial training's carried perturbation and FGSM with a random
start. ``--adv-method`` takes them; ``--attack`` does not offer them (no evaluation form).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from iat.attacks.core import (
    PIXEL_MAX,
    PIXEL_MIN,
    Attacker,
    AttackSettings,
    no_targets,
)
from iat.attacks.pgd import PGDAttacker
from iat.attacks.registry import TrainingForm, register

FGSM_RS_STEP = 1.25  # FGSM-RS step in units of epsilon (Wong, Rice, Kolter 2020, Sec 4)


class FreeAttacker(Attacker):
    """Free adversarial training's perturbation (Shafahi et al. 2019, "Adversarial Training for
    Free!", Alg. 1): no attack pass of its own. ``attack`` returns the images plus the current
    perturbation delta, as a leaf of the training graph; the training step's one backward pass
    gives the weight gradient and delta's gradient alike, and ``advance`` (after that backward)
    moves delta by epsilon * sign(gradient), clipped to the epsilon-ball. Delta is carried over
    between replays of a minibatch, from minibatch to minibatch and across epochs (a training
    checkpoint holds it); it starts at 0 (Alg. 1's initialisation) and restarts at 0 if the
    batch's shape changes."""

    def __init__(self, epsilon: float) -> None:
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        self.epsilon = float(epsilon)
        self.delta: Tensor | None = None
        self._leaf: Tensor | None = None

    def attack(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        if self.delta is None or self.delta.shape != images.shape:
            self.delta = torch.zeros_like(images)
        self._leaf = self.delta.clone().requires_grad_(True)
        adv = torch.clamp(images.detach() + self._leaf, PIXEL_MIN, PIXEL_MAX)
        return adv, no_targets(labels)

    @torch.no_grad()
    def advance(self) -> None:
        """Shafahi et al. Alg. 1: delta <- clip(delta + eps * sign(grad_x), -eps, eps)."""
        if self._leaf is None or self._leaf.grad is None:
            raise RuntimeError("advance() needs a backward pass through the last attack")
        stepped = self.delta + self.epsilon * self._leaf.grad.sign()
        self.delta = stepped.clamp(-self.epsilon, self.epsilon)
        self._leaf = None


_FGSM_RS_SPEC = re.compile(r"^fgsmrs_(\d+)$")


def fgsm_rs_spec(text: str) -> AttackSettings | None:
    """``fgsmrs_EPS``: epsilon an integer in pixel units; the step is the method's own."""
    match = _FGSM_RS_SPEC.match(text)
    return None if not match else AttackSettings(1, float(match.group(1)), 0.0, target=None)


# On soft targets: one step of 1.25 epsilon from a random start (Wong et al. 2020 Sec 4);
# only epsilon warms up (the step follows it).
FGSM_RS_TRAINING = TrainingForm(
    ("fgsmrs_EPS",),
    fgsm_rs_spec,
    soft_target=lambda s, _start_clean: (1, s.epsilon, FGSM_RS_STEP * s.epsilon, 0.0),
    warmups=("epsilon",),
)


@register("fgsmrs", "FGSM-RS", iterations=False, evaluation=False, training=FGSM_RS_TRAINING)
def fgsm_random_start(settings: AttackSettings) -> Attacker:
    """FGSM with a random start (Wong, Rice, Kolter 2020, "Fast is better than free", Alg. 3):
    one untargeted sign step of 1.25 epsilon from a uniform point of the epsilon-ball, projected
    back onto it. ``num_iter``, ``step_size``, ``target`` and ``prob_start_from_clean`` of the
    settings are not used: the method fixes them."""
    # Wong et al. Sec 4: alpha = 1.25 epsilon; the random start is what makes one step work.
    return PGDAttacker(
        1,
        settings.epsilon,
        FGSM_RS_STEP * settings.epsilon,
        prob_start_from_clean=0.0,
        target=None,
        generator=settings.generator,
        autocast=settings.autocast,
        autocast_dtype=settings.autocast_dtype,
        compiled=settings.compiled,
    )


@register("free", "free", iterations=False, evaluation=False)
def free(settings: AttackSettings) -> Attacker:
    return FreeAttacker(settings.epsilon)
