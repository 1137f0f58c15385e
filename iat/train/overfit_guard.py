"""FGSM training's catastrophic-overfitting guard (Wong, Rice & Kolter 2020, "Fast is better
than free", Sec 5.2): after each epoch, PGD and FGSM accuracy on one held-out batch; when PGD
accuracy collapses (falls by more than a threshold since the last epoch) while FGSM accuracy
rises, training stops and the weights roll back to the previous epoch's.

fast_adversarial's CIFAR10/train_fgsm.py ``--early-stop`` checks PGD-5 (step 2/255 at epsilon
8/255: epsilon / 4) on one minibatch against a drop of 0.2 and keeps the previous epoch's state
dict; the check here is the same on the first images of val/ (held out), with FGSM-RS beside it.
Every draw comes from a generator seeded per check, so a resumed run recomputes the previous
epoch's figures exactly (nothing to checkpoint).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from iat.attacks.pgd import PGDAttacker
from iat.attacks.training import FGSM_RS_STEP
from iat.data.augment import eval_transform
from iat.data.layouts import Sample, read_image_bgr
from iat.data.sources import to_model_input

GUARD_PGD_ITER = 5  # fast_adversarial train_fgsm.py: attack_pgd(..., 5, 1)
GUARD_PGD_STEP = 0.25  # 2/255 at epsilon 8/255


@dataclass(frozen=True)
class GuardFigures:
    """Accuracy on the held-out batch under PGD-5 and under FGSM-RS."""

    pgd: float
    fgsm: float


def held_out_batch(
    samples: Sequence[Sample], count: int, image_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` images of `samples` (val/), evaluation-cropped, on `device`."""
    chosen = samples[:count]
    images = np.stack([eval_transform(read_image_bgr(path), image_size) for path, _ in chosen])
    labels = torch.tensor([label for _, label in chosen], dtype=torch.int64, device=device)
    return to_model_input(torch.from_numpy(images), device), labels


def _accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    training = model.training
    model.eval()
    with torch.no_grad():
        correct = (model(images).argmax(dim=1) == labels).float().mean().item()
    model.train(training)
    return correct


class OverfitGuard:
    """Checks the model after each epoch and keeps the weights to roll back to."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        epsilon: float,
        threshold: float,
        seed: int,
    ) -> None:
        self.images, self.labels = images, labels
        self.epsilon, self.threshold, self.seed = epsilon, threshold, seed
        self.last: GuardFigures | None = None  # the previous epoch's figures
        self.kept: dict[str, torch.Tensor] | None = None  # the previous epoch's weights

    def _attack(self, model: torch.nn.Module, num_iter: int, step: float) -> torch.Tensor:
        generator = torch.Generator(device=self.images.device).manual_seed(self.seed)
        attacker = PGDAttacker(num_iter, self.epsilon, step, target=None, generator=generator)
        adv, _ = attacker.attack(model, self.images, self.labels)
        return adv

    def figures(self, model: torch.nn.Module) -> GuardFigures:
        pgd = self._attack(model, GUARD_PGD_ITER, GUARD_PGD_STEP * self.epsilon)
        fgsm = self._attack(model, 1, FGSM_RS_STEP * self.epsilon)
        return GuardFigures(_accuracy(model, pgd, self.labels), _accuracy(model, fgsm, self.labels))

    def remember(self, model: torch.nn.Module) -> None:
        """The start point's figures and weights (before the first epoch this run trains)."""
        self.last = self.figures(model)
        self.kept = copy.deepcopy(model.state_dict())

    def collapsed(self, model: torch.nn.Module) -> tuple[bool, GuardFigures]:
        """Whether `model` overfitted catastrophically since the last check (PGD accuracy down
        by more than the threshold, FGSM accuracy up); if not, its figures and weights become
        the ones to compare with and to roll back to."""
        now = self.figures(model)
        last = self.last
        if last is not None and last.pgd - now.pgd > self.threshold and now.fgsm > last.fgsm:
            return True, now
        self.last, self.kept = now, copy.deepcopy(model.state_dict())
        return False, now

    def roll_back(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.kept)
