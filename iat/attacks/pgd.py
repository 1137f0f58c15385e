"""PGD: the original's L-inf PGD with sign steps (``PGDAttacker``, training and evaluation), and
``NormPGDAttacker``: the same under L2, with the CW margin loss and restarts that keep each
example's worst case. Registered as ``pgd``: the original's class whenever the settings are the
original's (L-inf, cross-entropy, one restart), so that training draws exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iat.attacks.core import (
    PIXEL_MAX,
    PIXEL_MIN,
    TARGET_MODES,
    Attacker,
    AttackSettings,
    Objective,
    attack_success,
    autocast_dtype,
    build_objective,
    choose_targets,
    draw_device,
    pgd_step_size,
)
from iat.attacks.ops import (
    check_threat_model,
    clip_pixels,
    example_gain,
    logit_margin,
    project_l2,
    uniform_l2_start,
    unit_l2,
    worst_case,
)
from iat.attacks.registry import TrainingForm, register


class PGDAttacker(Attacker):
    """L-infinity projected gradient descent with sign steps, in pixel units.

    Args:
        num_iter: number of PGD iterations (>= 1).
        epsilon: radius of the L-infinity ball, in pixel units [0, 255].
        step_size: step size in pixel units; raised to ``epsilon / num_iter`` when smaller.
        prob_start_from_clean: probability, drawn once per batch, that PGD starts from the clean
            image rather than from a uniform random point of the epsilon-ball.
        target: ``"random"`` (a uniformly drawn wrong class), ``"least_likely"`` (the argmin of
            the clean logits) or ``None`` (untargeted: ascend the loss of the true label).
        num_classes: number of classes for random targets; read from the model output when None
            (one extra no-grad forward pass per batch).
        generator: source of randomness (start point, targets, start choice); its device is used
            for the draws, which are then moved to the images' device.
        autocast: run every iteration's forward and input-gradient pass under autocast (fp16
            with the loss scaled by 128 on CUDA, bf16 elsewhere). Weights, iterates and the
            projection stay fp32, so the iterates keep every guarantee of the fp32 attack.
        autocast_dtype: that autocast's type, None for the device's above; bf16 on CUDA needs
            no loss scaling (fp32's range).
        compiled: compile that pass with ``torch.compile`` (plus CUDA graphs on CUDA), with
            static shapes: one compilation per batch shape and model.
        eot_samples: forward passes whose losses each iteration averages: against a model with
            a random input transform, the gradient averaged over that many draws (EOT, Athalye,
            Carlini & Wagner, ICML 2018, Sec 4.3); 1 for deterministic models.
    """

    def __init__(
        self,
        num_iter: int,
        epsilon: float,
        step_size: float,
        prob_start_from_clean: float = 0.0,
        target: str | None = "random",
        num_classes: int | None = None,
        generator: torch.Generator | None = None,
        autocast: bool = False,
        compiled: bool = False,
        eot_samples: int = 1,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        _check_args(num_iter, epsilon, step_size, prob_start_from_clean, target)
        if eot_samples < 1:
            raise ValueError(f"eot_samples must be >= 1, got {eot_samples}")
        self.num_iter = num_iter
        self.epsilon = float(epsilon)
        self.step_size = pgd_step_size(self.epsilon, num_iter, step_size)
        self.prob_start_from_clean = prob_start_from_clean
        self.target = target
        self.num_classes = num_classes
        self.generator = generator
        self.autocast = autocast
        self.autocast_dtype = autocast_dtype
        self.compiled = compiled
        self.eot_samples = eot_samples
        self._objectives: dict[str, Objective] = {}

    def attack(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        # The attack needs input gradients even when the caller evaluates under no_grad or
        # inference_mode.
        low_precision = (
            autocast_dtype(images.device, self.autocast_dtype) if self.autocast else None
        )
        opening = self._opening(model, images, labels, generator, low_precision=low_precision)
        with opening as (clean, labels, generator):
            target_labels = self._target_labels(model, clean, labels, generator)
            goal = labels if self.target is None else target_labels
            # Feature Denoising, Sec 6: perturbations are bounded in L-infinity norm; every
            # iterate stays in the epsilon-ball around the clean image and in the pixel range.
            lower = (clean - self.epsilon).clamp(PIXEL_MIN, PIXEL_MAX)
            upper = (clean + self.epsilon).clamp(PIXEL_MIN, PIXEL_MAX)
            adv = self._start(clean, lower, upper, generator)
            objective = self.objective(clean.device)
            for _ in range(self.num_iter):
                adv = self._step(objective, model, adv, lower, upper, goal)
        return adv.detach(), target_labels

    def _target_labels(
        self, model: nn.Module, clean: Tensor, labels: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        return choose_targets(model, clean, labels, self.target, self.num_classes, generator)

    def _start(
        self, clean: Tensor, lower: Tensor, upper: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        # Feature Denoising, Sec 5: a batch starts PGD from the clean image with probability
        # prob_start_from_clean (20% in training), otherwise from a uniform random point in the
        # epsilon-ball. Decided once per batch, as a tensor, without a host sync.
        from_noise = _uniform((), 0.0, 1.0, clean, generator) >= self.prob_start_from_clean
        noise = _uniform(clean.shape, -self.epsilon, self.epsilon, clean, generator)
        start = clean + from_noise.to(clean.dtype) * noise
        return torch.minimum(torch.maximum(start, lower), upper)

    def _loss(self, model: nn.Module, adv: Tensor, goal: Tensor) -> Tensor:
        """The objective each step descends: cross-entropy to the target, or minus the
        cross-entropy of the true label when untargeted. Summed over examples, so per-example
        gradients are not scaled down by the batch size (the sign is unaffected); averaged over
        ``eot_samples`` forward passes (each a fresh draw of a random model)."""
        draws = [
            F.cross_entropy(model(adv), goal, reduction="sum") for _ in range(self.eot_samples)
        ]
        loss = draws[0] if self.eot_samples == 1 else torch.stack(draws).mean()
        return -loss if self.target is None else loss

    def objective(self, device: torch.device) -> Objective:
        """``(model, adv, goal) -> loss``, the function whose input gradient each iteration
        follows: ``_loss``, under autocast and/or compiled as requested. Built once per device
        type and kept (a compilation costs minutes)."""
        if device.type not in self._objectives:
            self._objectives[device.type] = build_objective(
                self._loss, device, self.autocast, self.compiled, self.autocast_dtype
            )
        return self._objectives[device.type]

    def _step(
        self,
        objective: Objective,
        model: nn.Module,
        adv: Tensor,
        lower: Tensor,
        upper: Tensor,
        goal: Tensor,
    ) -> Tensor:
        """One PGD iteration: a sign-gradient step on ``objective``, projected onto the box."""
        adv = adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(model, adv, goal), adv)
        # Feature Denoising, Sec 5: PGD (Madry et al.) as the white-box attacker.
        stepped = adv.detach() - self.step_size * grad.sign()
        return torch.minimum(torch.maximum(stepped, lower), upper)


def _check_args(
    num_iter: int,
    epsilon: float,
    step_size: float,
    prob_start_from_clean: float,
    target: str | None,
) -> None:
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if step_size < 0:
        raise ValueError(f"step_size must be >= 0, got {step_size}")
    if not 0.0 <= prob_start_from_clean <= 1.0:
        raise ValueError(f"prob_start_from_clean must be in [0, 1], got {prob_start_from_clean}")
    if target not in TARGET_MODES:
        raise ValueError(f"unknown target {target!r}; valid values: {TARGET_MODES}")


def _uniform(
    shape: tuple[int, ...] | torch.Size,
    low: float,
    high: float,
    like: Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    """Uniform draws in [low, high) on the generator's device, moved to ``like``'s device."""
    unit = torch.rand(
        shape, generator=generator, device=draw_device(generator, like), dtype=like.dtype
    )
    return (low + (high - low) * unit).to(like.device)


class NormPGDAttacker(PGDAttacker):
    """``PGDAttacker`` under L-inf or L2, with the cross-entropy or the CW margin loss, and
    ``restarts`` runs per example keeping its worst case.

    With norm "inf", loss "ce" and one restart it is ``PGDAttacker``, draw for draw. Restart r > 0
    attacks only the examples no earlier restart broke (success as ``attack_success``: the
    target for targeted attacks, any wrong class otherwise), from a new random start, toward the
    same targets; each example keeps a successful image when one exists, else the one with the
    highest objective. So restarts never lower the attack success of the same seeds.

    L2: steps ``step_size * grad / ||grad||_2``, start uniform in the L2 ball, projection onto
    the ball then clipping to [0, 255] (which only shortens the perturbation).
    """

    def __init__(
        self,
        num_iter: int,
        epsilon: float,
        step_size: float,
        norm: str = "inf",
        loss: str = "ce",
        restarts: int = 1,
        target: str | None = "random",
        num_classes: int | None = None,
        generator: torch.Generator | None = None,
        autocast: bool = False,
        compiled: bool = False,
        eot_samples: int = 1,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_iter,
            epsilon,
            step_size,
            target=target,
            num_classes=num_classes,
            generator=generator,
            autocast=autocast,
            compiled=compiled,
            eot_samples=eot_samples,
            autocast_dtype=autocast_dtype,
        )
        check_threat_model(epsilon, norm, ("inf", "2"), loss)
        if restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {restarts}")
        self.norm = norm
        self.loss = loss
        self.restarts = restarts

    def attack(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        with self._opening(model, images, labels, generator) as (clean, labels, generator):
            targets = self._target_labels(model, clean, labels, generator)
            attempt = partial(self._attempt, model, clean, labels, targets, generator)
            unbroken = torch.zeros(labels.shape, dtype=torch.bool, device=clean.device)
            adv, _, _ = worst_case(clean, [attempt] * self.restarts, unbroken)
        return adv, targets

    def _attempt(
        self,
        model: nn.Module,
        clean: Tensor,
        labels: Tensor,
        targets: Tensor,
        generator: torch.Generator | None,
        todo: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        clean, labels, targets = clean[todo], labels[todo], targets[todo]
        goal = labels if self.target is None else targets
        adv = self._run(model, clean, goal, generator)
        with torch.no_grad():
            logits = model(adv)
        gain = example_gain(logits, labels, targets, self.loss)
        return adv, attack_success(logits, labels, targets), gain

    def _run(
        self, model: nn.Module, clean: Tensor, goal: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        objective = self.objective(clean.device)
        if self.norm == "inf":
            lower = (clean - self.epsilon).clamp(PIXEL_MIN, PIXEL_MAX)
            upper = (clean + self.epsilon).clamp(PIXEL_MIN, PIXEL_MAX)
            adv = self._start(clean, lower, upper, generator)
            for _ in range(self.num_iter):
                adv = self._step(objective, model, adv, lower, upper, goal)
            return adv
        adv = self._l2_start(clean, generator)
        for _ in range(self.num_iter):
            adv = self._l2_step(objective, model, adv, clean, goal)
        return adv

    def _l2_start(self, clean: Tensor, generator: torch.Generator | None) -> Tensor:
        return uniform_l2_start(clean, self.epsilon, generator)

    def _l2_step(
        self, objective: Callable, model: nn.Module, adv: Tensor, clean: Tensor, goal: Tensor
    ) -> Tensor:
        adv = adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(model, adv, goal), adv)
        stepped = adv.detach() - self.step_size * unit_l2(grad)
        return clip_pixels(clean + project_l2(stepped - clean, self.epsilon))

    def _loss(self, model: nn.Module, adv: Tensor, goal: Tensor) -> Tensor:
        """``PGDAttacker``'s cross-entropy, or the CW margin of ``goal`` (minimised when
        untargeted, maximised toward a target), summed over examples."""
        if self.loss == "ce":
            return super()._loss(model, adv, goal)
        # EOT (Athalye et al. 2018, Sec 4.1): the margin averaged over draws of a random model.
        draws = [logit_margin(model(adv), goal).sum() for _ in range(self.eot_samples)]
        margin = torch.stack(draws).mean()
        return margin if self.target is None else -margin


def _shared_options(settings: AttackSettings) -> dict:
    """The keyword arguments both PGD classes take from the settings."""
    return {
        "target": settings.target,
        "num_classes": settings.num_classes,
        "generator": settings.generator,
        "autocast": settings.autocast,
        "autocast_dtype": settings.autocast_dtype,
        "compiled": settings.compiled,
        "eot_samples": settings.eot_samples,
    }


def pgd_from_settings(settings: AttackSettings) -> NormPGDAttacker:
    return NormPGDAttacker(
        settings.num_iter,
        settings.epsilon,
        settings.step_size,
        norm=settings.norm,
        loss=settings.loss,
        restarts=settings.restarts,
        **_shared_options(settings),
    )


# ALP's training attack names: the prefix says the target (ALP README, "adv_method" flag);
# integers in pixel units, STEP and NITER >= 1.
PGD_TARGETS = {"pgd": None, "pgdll": "least_likely", "pgdrnd": "random"}
_PGD_SPEC = re.compile(r"^(pgd|pgdll|pgdrnd)_(\d+)_(\d+)_(\d+)$")


def pgd_spec(text: str) -> AttackSettings | None:
    match = _PGD_SPEC.match(text)
    if not match or int(match.group(4)) < 1 or int(match.group(3)) < 1:
        return None
    kind, eps, step, niter = match.groups()
    return AttackSettings(int(niter), float(eps), float(step), target=PGD_TARGETS[kind])


# Untargeted PGD on soft targets keeps its iterations, epsilon and step (ARES; the step as the
# epoch's warm-ups leave it) and --prob-start-from-clean.
PGD_TRAINING = TrainingForm(
    tuple(f"{kind}_EPS_STEP_NITER" for kind in PGD_TARGETS),
    pgd_spec,
    soft_target=lambda s, start_clean: (s.num_iter, s.epsilon, s.step_size, start_clean),
    warmups=("epsilon", "step"),
)


@register(
    "pgd",
    "PGD",
    norms=("inf", "2"),
    step=True,
    loss=True,
    restarts=True,
    targets="flag",
    training=PGD_TRAINING,
)
def original_or_norm_pgd(settings: AttackSettings) -> Attacker:
    """The original's PGD; with another norm, loss or restarts, ``NormPGDAttacker`` (whose first
    restart is this PGD, draw for draw)."""
    if (settings.norm, settings.loss, settings.restarts) != ("inf", "ce", 1):
        return pgd_from_settings(settings)
    return PGDAttacker(
        settings.num_iter,
        settings.epsilon,
        settings.step_size,
        prob_start_from_clean=settings.prob_start_from_clean,
        **_shared_options(settings),
    )
