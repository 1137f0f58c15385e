"""Adversarial training on soft targets (Mixup / CutMix, ``iat.recipes.mixing``): the training
attack maximises the loss of the soft target, and the model is trained on it.

ARES 2.0 (``ares/utils/adv.py`` ``adv_generator`` with ``attack_criterion: mixup``, as its
``robust_training/train_configs/*.yaml`` set) attacks the mixed images with the soft-target
cross-entropy, -sum_c y_c log p_c, and trains on the same target. The hard-label attackers of
``adv_model`` keep their interface; this module is the training attack for soft targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iat.attacks.core import PIXEL_MAX, PIXEL_MIN, attack_mode, no_targets
from iat.attacks.registry import attack_info
from iat.attacks.spec import AttackSpec
from iat.train.objective import TrainingTerms, mixed_batch, paired_terms


class SoftTargetPGD:
    """Untargeted L-inf PGD with sign steps in pixel units, ascending the soft-target
    cross-entropy; BatchNorm in inference mode and parameters frozen during the attack (as
    ``adv_model.PGDAttacker``). Starts from a uniform point of the epsilon-ball, or, with chance
    `prob_start_from_clean` per batch, from the clean image; 0 iterations: the clean images."""

    def __init__(
        self,
        num_iter: int,
        epsilon: float,
        step_size: float,
        prob_start_from_clean: float,
        generator: torch.Generator,
    ) -> None:
        self.num_iter, self.epsilon, self.step_size = num_iter, float(epsilon), float(step_size)
        self.prob_start_from_clean = prob_start_from_clean
        self.generator = generator

    def _uniform(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        unit = torch.rand(shape, generator=self.generator, device=self.generator.device)
        return unit.to(like.device, like.dtype)

    def attack(self, model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        """The adversarial images of `images` for soft `targets` [N, classes]."""
        clean = images.detach()
        if self.num_iter == 0:
            return clean
        lower = (clean - self.epsilon).clamp(PIXEL_MIN, PIXEL_MAX)
        upper = (clean + self.epsilon).clamp(PIXEL_MIN, PIXEL_MAX)
        from_noise = self._uniform((), clean) >= self.prob_start_from_clean
        noise = -self.epsilon + 2 * self.epsilon * self._uniform(tuple(clean.shape), clean)
        adv = torch.minimum(torch.maximum(clean + from_noise * noise, lower), upper)
        with torch.enable_grad(), attack_mode(model):
            for _ in range(self.num_iter):
                adv = adv.detach().requires_grad_(True)
                loss = F.cross_entropy(model(adv), targets, reduction="sum")
                (grad,) = torch.autograd.grad(loss, adv)
                adv = torch.minimum(
                    torch.maximum(adv.detach() + self.step_size * grad.sign(), lower), upper
                )
        return adv.detach()


def soft_target_attacker(
    spec: AttackSpec, prob_start_from_clean: float, generator: torch.Generator
) -> SoftTargetPGD:
    """The training attack `spec` on soft targets: the sign-gradient ascent its registration
    stands it for (``TrainingForm.soft_target``: clean; untargeted PGD with the spec's step as
    ``epoch_attack_spec`` leaves it; FGSM-RS's one step of 1.25 epsilon from a random start)."""
    form = attack_info(spec.name).training
    if form is None or form.soft_target is None or spec.settings.target is not None:
        raise ValueError(f"no soft-target form of the training attack {spec}")
    num_iter, epsilon, step, start_clean = form.soft_target(spec.settings, prob_start_from_clean)
    return SoftTargetPGD(num_iter, epsilon, step, start_clean, generator)


def soft_training_objective(
    model: nn.Module,
    attack_model: nn.Module,
    attacker: SoftTargetPGD,
    images: Tensor,
    targets: Tensor,
    adv_fraction: float = 1.0,
    lp_weight: float = 0.0,
) -> TrainingTerms:
    """``objective.training_terms`` on soft `targets` [N, classes] (label smoothing already
    folded into them); mixed batches and logit pairing (ALP Sec 3) compose as there."""
    pairing = lp_weight > 0
    attacked, clean = mixed_batch(images.shape[0], adv_fraction, paired=pairing)
    adv = attacker.attack(attack_model, images[attacked], targets[attacked])
    logits = model(torch.cat([adv, images[clean].to(adv.dtype)]))
    cross_entropy = F.cross_entropy(logits, torch.cat([targets[attacked], targets[clean]]))
    return paired_terms(
        cross_entropy, logits, adv.shape[0], no_targets(targets[attacked, 0]), lp_weight
    )
