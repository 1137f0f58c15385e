"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", Sec 3 and 4) under L-inf and L2: APGD-CE, APGD-DLR (the rand
version of AutoAttack's) and APGD-T, registered as ``apgd-ce``, ``apgd-dlr`` and ``apgd-t``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iat.attacks.core import Attacker, AttackSettings, no_targets
from iat.attacks.ops import (
    Attempt,
    ball_projection,
    check_threat_model,
    gain_and_grad,
    per_example,
    uniform01,
    uniform_l2_start,
    unit_l2,
    worst_case,
)
from iat.attacks.registry import TrainingForm, register

# Croce & Hein 2020, Sec 3.2: rho = 0.75 (fraction of increasing steps below which the step
# size is halved) and momentum alpha = 0.75.
APGD_RHO = 0.75


APGD_MOMENTUM = 0.75


DLR_EPS = 1e-12  # keeps the DLR denominator positive (the authors' code adds the same)


def apgd_checkpoints(num_iter: int) -> list[int]:
    """The iterations w_j at which APGD may halve its step (Croce & Hein 2020, Sec 3.2):
    w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    previous, current = 0.0, 0.22
    points = [0]
    # Rounded before ceil: p_j are hundredths, and 0.57 * 100 is 57.000000000000007 in floats.
    while (point := math.ceil(round(current * num_iter, 6))) <= num_iter:
        if point > points[-1]:
            points.append(point)
        previous, current = current, current + max(current - previous - 0.03, 0.06)
    return points


def targeted_dlr(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Croce & Hein 2020, Sec 4 (targeted DLR loss), to be maximised:
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), z_pi the logits sorted decreasingly."""
    ranked = logits.sort(dim=1, descending=True).values
    own = logits.gather(1, labels[:, None]).squeeze(1)
    target = logits.gather(1, targets[:, None]).squeeze(1)
    scale = ranked[:, 0] - (ranked[:, 2] + ranked[:, 3]) / 2 + DLR_EPS
    return -(own - target) / scale


def ce_gain(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def dlr(logits: Tensor, labels: Tensor) -> Tensor:
    """Croce & Hein 2020, Sec 4, Eq. (6) (the untargeted DLR loss), to be maximised:
    -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), z_pi the logits sorted decreasingly."""
    ranked = logits.sort(dim=1, descending=True).values
    own = logits.gather(1, labels[:, None]).squeeze(1)
    best_other = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return -(own - best_other) / (ranked[:, 0] - ranked[:, 2] + DLR_EPS)


UNTARGETED_GAINS = {"ce": ce_gain, "dlr": dlr}  # APGD-CE, APGD-DLR


class APGDAttacker(Attacker):
    """APGD (Croce & Hein 2020, Sec 3) under L-inf or L2, untargeted with the cross-entropy
    (APGD-CE) or, with ``targeted``, APGD-T: the targeted DLR loss (Sec 4) toward each of the
    ``top_k`` most likely wrong classes of the clean image in turn (capped at classes - 1).

    Success is misclassification (``target_labels`` are -1): APGD-T's targets are a means to a
    wrong prediction. As AutoAttack, examples the model already misclassifies keep the clean
    image, and each further run (a restart of APGD-CE, the next target of APGD-T) attacks only
    the examples no earlier run broke. Each example returns its first misclassified iterate, else
    the iterate of highest loss. All iterations run batch-wise on tensors (no host sync inside
    a run); ``num_iter`` iterations cost num_iter + 1 forward and backward passes (times
    ``eot_samples`` against a random defense).
    """

    def __init__(
        self,
        num_iter: int,
        epsilon: float,
        targeted: bool = False,
        top_k: int = 9,
        restarts: int = 1,
        generator: torch.Generator | None = None,
        norm: str = "inf",
        eot_samples: int = 1,
        loss: str = "ce",
    ) -> None:
        if num_iter < 1 or restarts < 1 or top_k < 1:
            raise ValueError(f"num_iter, restarts, top_k must be >= 1: {num_iter, restarts, top_k}")
        check_threat_model(epsilon, norm, ("inf", "2"))
        if loss not in UNTARGETED_GAINS:
            raise ValueError(f"APGD's loss is one of {tuple(UNTARGETED_GAINS)}, not {loss!r}")
        self.loss = loss  # untargeted runs: cross-entropy (APGD-CE) or DLR (APGD-DLR)
        self.norm = norm
        self.num_iter = num_iter
        self.epsilon = float(epsilon)
        self.targeted = targeted
        self.top_k = top_k
        self.restarts = restarts
        self.generator = generator
        self.eot_samples = eot_samples  # draws averaged per gradient against a random defense

    def attack(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        with self._opening(model, images, labels, generator) as (clean, labels, generator):
            with torch.no_grad():
                clean_logits = model(clean)
            attempts = self._attempts(model, clean, labels, clean_logits, generator)
            wrong = clean_logits.argmax(dim=1) != labels
            adv, _, _ = worst_case(clean, attempts, wrong)
        return adv, no_targets(labels)

    def _attempts(
        self,
        model: nn.Module,
        clean: Tensor,
        labels: Tensor,
        clean_logits: Tensor,
        generator: torch.Generator | None,
    ) -> list[Attempt]:
        run = partial(self._attempt, model, clean, labels, generator=generator)
        if not self.targeted:
            return [partial(run, targets=None)] * self.restarts
        classes = clean_logits.shape[1]
        if classes < 4:
            raise ValueError(f"APGD-T's DLR loss needs at least 4 classes, got {classes}")
        # Croce & Hein 2020, Sec 4 (and their code): the targets are the classes ranked 2nd to
        # (k+1)-th by the clean logits; the attacked examples are classified correctly, so these
        # are the k most likely wrong classes.
        ranked = clean_logits.argsort(dim=1, descending=True)
        k = min(self.top_k, classes - 1)
        return [partial(run, targets=ranked[:, i]) for i in range(1, k + 1)] * self.restarts

    def _attempt(
        self,
        model: nn.Module,
        clean: Tensor,
        labels: Tensor,
        todo: Tensor,
        targets: Tensor | None,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        clean, labels = clean[todo], labels[todo]
        if targets is None:
            gain = partial(UNTARGETED_GAINS[self.loss], labels=labels)
        else:
            gain = partial(targeted_dlr, labels=labels, targets=targets[todo])
        adv, best_gain = self._run(model, clean, labels, gain, generator)
        with torch.no_grad():
            success = model(adv).argmax(dim=1) != labels
        return adv, success, best_gain

    def _run(
        self,
        model: nn.Module,
        clean: Tensor,
        labels: Tensor,
        gain: Callable[[Tensor], Tensor],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        """One APGD run (Croce & Hein 2020, Algorithm 1): ``(images, best gain)``."""
        eps = self.epsilon
        project = ball_projection(clean, self.norm, eps)
        # Algorithm 1 starts from its input x^(0); the authors' code (and here) from a random
        # point of the epsilon-ball, so that restarts differ.
        if self.norm == "inf":
            x = project(clean + eps * (2 * uniform01(clean.shape, clean, generator) - 1))
        else:
            x = uniform_l2_start(clean, eps, generator)
        value, grad, logits = gain_and_grad(model, x, gain, self.eot_samples)
        broken = logits.argmax(dim=1) != labels
        out = x
        x_best, best, grad_best = x, value, grad
        x_prev = x
        # Sec 3.2: the initial step size is eta^(0) = 2 eps.
        step = torch.full(labels.shape, 2 * eps, device=clean.device)
        increases = torch.zeros(labels.shape, device=clean.device)
        best_at_check = best
        halved_at_check = torch.zeros(labels.shape, dtype=torch.bool, device=clean.device)
        checkpoints = apgd_checkpoints(self.num_iter)
        for k in range(self.num_iter):
            # Algorithm 1, lines 3 and 8-9: z = P(x + eta sign(grad)) (L2: grad / ||grad||_2);
            # x_new = P(x + alpha (z - x) + (1 - alpha)(x - x_prev)), alpha = 0.75; the first
            # step has no momentum (alpha = 1), as the authors' code.
            direction = grad.sign() if self.norm == "inf" else unit_l2(grad)
            z = project(x + per_example(step, x) * direction)
            alpha = 1.0 if k == 0 else APGD_MOMENTUM
            x_prev, x = x, project(x + alpha * (z - x) + (1 - alpha) * (x - x_prev))
            new_value, grad, logits = gain_and_grad(model, x, gain, self.eot_samples)
            newly = (logits.argmax(dim=1) != labels) & ~broken
            out = torch.where(per_example(newly, x), x, out)
            broken = broken | newly
            increases += (new_value > value).float()
            value = new_value
            improved = value > best
            x_best = torch.where(per_example(improved, x), x, x_best)
            grad_best = torch.where(per_example(improved, x), grad, grad_best)
            best = torch.where(improved, value, best)
            if k + 1 in checkpoints:
                j = checkpoints.index(k + 1)
                # Sec 3.2, condition 1: fewer than rho (w_j - w_{j-1}) steps increased the loss
                # since the last checkpoint; condition 2: the step was not halved at the last
                # checkpoint and the best loss did not improve since then.
                steady = increases < APGD_RHO * (checkpoints[j] - checkpoints[j - 1])
                stuck = ~halved_at_check & (best <= best_at_check)
                halve = steady | stuck
                # Sec 3.2: halve the step and restart from the best point found so far.
                step = torch.where(halve, step / 2, step)
                x = torch.where(per_example(halve, x), x_best, x)
                grad = torch.where(per_example(halve, x), grad_best, grad)
                value = torch.where(halve, best, value)
                halved_at_check, best_at_check = halve, best
                increases = torch.zeros_like(increases)
        return torch.where(per_example(broken, out), out, x_best), best


def apgd_from_settings(settings: AttackSettings, targeted: bool, loss: str = "ce") -> APGDAttacker:
    return APGDAttacker(
        settings.num_iter,
        settings.epsilon,
        targeted=targeted,
        top_k=settings.top_k,
        restarts=settings.restarts,
        generator=settings.generator,
        norm=settings.norm,
        eot_samples=settings.eot_samples,
        loss=loss,
    )


_APGD_SPEC = re.compile(r"^apgd_(\d+)_(\d+)$")


def apgd_spec(text: str) -> AttackSettings | None:
    """``apgd_EPS_NITER``: APGD-CE with its own step size (Singh, Croce & Hein 2023 train with
    APGD-2), integers in pixel units, NITER >= 1."""
    match = _APGD_SPEC.match(text)
    if not match or int(match.group(2)) < 1:
        return None
    return AttackSettings(int(match.group(2)), float(match.group(1)), 0.0, target=None)


@register(
    "apgd-ce",
    "APGD-CE",
    norms=("inf", "2"),
    restarts=True,
    training=TrainingForm(("apgd_EPS_NITER",), apgd_spec),
)
def apgd_ce(settings: AttackSettings) -> APGDAttacker:
    return apgd_from_settings(settings, targeted=False)


@register("apgd-t", "APGD-T", norms=("inf", "2"), restarts=True, top_k=True, targets="top-k")
def apgd_t(settings: AttackSettings) -> APGDAttacker:
    return apgd_from_settings(settings, targeted=True)


@register("apgd-dlr", "APGD-DLR", norms=("inf", "2"), restarts=True)
def apgd_dlr(settings: AttackSettings) -> APGDAttacker:
    return apgd_from_settings(settings, targeted=False, loss="dlr")
