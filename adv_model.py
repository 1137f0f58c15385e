"""White-box attackers used for adversarial training and robustness evaluation.

Every attacker takes any ``nn.Module`` that maps float NCHW BGR images in pixel units [0, 255]
to logits (the model normalises its own input), and shares one interface:
``attacker.attack(model, images, labels) -> (adv_images, target_labels)`` where
``target_labels`` is int64 and -1 wherever the attack has no target. A ``generator`` keyword
gives the attack's randomness for one batch (evaluators seed one per batch, so that results do
not depend on the number of processes).

``ATTACKS`` is the registry (name -> factory of ``AttackSettings``) from which training and
evaluation build their attackers; ``training_objective`` is the loss adversarial training
minimises, kept beside the attackers.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PIXEL_MIN = 0.0
PIXEL_MAX = 255.0
TARGET_MODES = ("random", "least_likely", None)
NO_TARGET = -1
# The original's --use-fp16xla scales the fp16 loss by 128 before the backward pass so that small
# input gradients do not underflow; only their sign is used. bf16 has fp32's range: no scaling.
FP16_LOSS_SCALE = 128.0
FGSM_RS_STEP = 1.25  # FGSM-RS step in units of epsilon (Wong, Rice, Kolter 2020, Sec 4)
# The Square Attack's query budget per example (Andriushchenko et al. 2020, and AutoAttack's).
DEFAULT_QUERIES = 5000
Objective = Callable[[nn.Module, Tensor, Tensor], Tensor]


class Attacker(abc.ABC):
    """The interface shared by every attacker (clean evaluation included)."""

    @abc.abstractmethod
    def attack(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(adv_images, target_labels)``; ``target_labels`` is -1 where untargeted.

        ``generator``, when given, is the random source for this call (else the attacker's
        own)."""

    def stats_template(self, device: torch.device) -> dict[str, Tensor]:
        """Zero float64 counts shaped like ``batch_stats()``: what an evaluator sums over batches
        and processes (a process with no batch still joins the sum). None by default."""
        return {}

    def batch_stats(self) -> dict[str, Tensor]:
        """Counts of the last ``attack`` call (same keys and shapes as ``stats_template``)."""
        return {}

    def describe_stats(self, stats: dict[str, Tensor], images: int) -> dict[str, object]:
        """Named figures from ``stats`` summed over ``images`` images (for summaries and JSON)."""
        return {}


class NoOpAttacker(Attacker):
    """Leaves images untouched: clean training and clean evaluation."""

    def attack(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        return images, no_targets(labels)


def no_targets(labels: Tensor) -> Tensor:
    """An int64 tensor shaped like ``labels`` filled with -1 (no target)."""
    return torch.full(labels.shape, NO_TARGET, dtype=torch.int64, device=labels.device)


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Puts ``model`` in inference mode with frozen parameters; restores both on exit.

    Per-module ``training`` flags and per-parameter ``requires_grad`` flags are saved and put
    back afterwards, also when the body raises.
    """
    training = [(module, module.training) for module in model.modules()]
    requires_grad = [(param, param.requires_grad) for param in model.parameters()]
    # Feature Denoising, Sec 5 (and the original code): BatchNorm runs in test mode during the
    # attack, and the attack updates no moving statistics.
    model.eval()
    for param, _ in requires_grad:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for module, flag in training:
            module.training = flag
        for param, flag in requires_grad:
            param.requires_grad_(flag)


def random_wrong_labels(
    labels: Tensor, num_classes: int, generator: torch.Generator | None = None
) -> Tensor:
    """For each label, a class drawn uniformly among the ``num_classes - 1`` other classes."""
    if num_classes < 2:
        raise ValueError(f"random targets need at least 2 classes, got {num_classes}")
    # Feature Denoising, Sec 6: the targeted class is selected uniformly at random (among the
    # wrong classes: label + U{1, ..., C-1} mod C, as the original code).
    offset = torch.randint(
        1, num_classes, labels.shape, generator=generator, device=_device(generator, labels)
    )
    return (labels.long() + offset.to(labels.device)) % num_classes


def choose_targets(
    model: nn.Module,
    clean: Tensor,
    labels: Tensor,
    target: str | None,
    num_classes: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    """The attack's target per example for a ``target`` mode of ``TARGET_MODES``: -1 (None), a
    random wrong class (``num_classes`` read from the model when None), or the least likely
    class of the clean logits."""
    if target is None:
        return no_targets(labels)
    if target == "random" and num_classes is not None:
        return random_wrong_labels(labels, num_classes, generator)
    with torch.no_grad():
        logits = model(clean)
    if target == "least_likely":
        return logits.argmin(dim=1).to(device=labels.device, dtype=torch.int64)
    return random_wrong_labels(labels, logits.shape[1], generator)


def attack_success(logits: Tensor, labels: Tensor, target_labels: Tensor) -> Tensor:
    """Per example: prediction == target where a target is set, else prediction != label."""
    pred = logits.argmax(dim=1)
    targeted = target_labels >= 0
    return torch.where(targeted, pred == target_labels, pred != labels)


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
        generator = self.generator if generator is None else generator
        # The attack needs input gradients even when the caller evaluates under no_grad or
        # inference_mode.
        with torch.inference_mode(False), torch.enable_grad(), attack_mode(model):
            clean = images.detach()
            if not clean.is_floating_point():
                clean = clean.float()
            target_labels = self._target_labels(model, clean, labels, generator)
            goal = labels.long() if self.target is None else target_labels
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
            self._objectives[device.type] = _build_objective(
                self._loss, device, self.autocast, self.compiled
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


@dataclass(frozen=True)
class AttackSettings:
    """Everything an attack factory may use; each factory takes what it needs."""

    num_iter: int  # iterations (0: no attack)
    epsilon: float  # radius of the threat model, pixel units [0, 255]
    step_size: float  # per-iteration step, pixel units
    target: str | None = "random"  # "random", "least_likely" or None (untargeted)
    prob_start_from_clean: float = 0.0  # chance per batch of starting from the clean image
    num_classes: int | None = None  # for random targets
    generator: torch.Generator | None = None  # default random source (per call: attack(...))
    autocast: bool = False  # iterations under autocast (fp16 on CUDA, bf16 on the CPU)
    compiled: bool = False  # iterations compiled with torch.compile
    norm: str = "inf"  # the threat model's norm: "inf", "2" or "1" (ATTACK_NORMS: who takes which)
    restarts: int = 1  # PGD / APGD-CE runs per example; each restart attacks the unbroken ones
    loss: str = "ce"  # PGD / FGM objective: "ce" (cross-entropy) or "cw" (logit margin)
    eps_step: float = 1.0  # fgm-minimal: epsilon grows by this much until the example breaks
    top_k: int = 9  # APGD-T: target classes, the k most likely wrong ones (capped at classes-1)
    eot_samples: int = 1  # forward passes averaged per iteration (EOT against random models)
    queries: int = DEFAULT_QUERIES  # square: model queries per example (the initial point included)


AttackFactory = Callable[[AttackSettings], Attacker]
ATTACKS: dict[str, AttackFactory] = {}
NORMS = ("inf", "2", "1")
ATTACK_LOSSES = ("ce", "cw")  # cross-entropy, or the Carlini-Wagner logit margin
ATTACK_NORMS: dict[str, tuple[str, ...]] = {}  # the norms each registered attack supports


def register_attack(
    name: str, norms: tuple[str, ...] = ("inf",)
) -> Callable[[AttackFactory], AttackFactory]:
    """Decorator adding an attack factory to ``ATTACKS`` under ``name``, and the threat-model
    norms it supports to ``ATTACK_NORMS``."""

    def add(factory: AttackFactory) -> AttackFactory:
        if name in ATTACKS:
            raise ValueError(f"attack {name!r} is registered twice")
        ATTACKS[name] = factory
        ATTACK_NORMS[name] = norms
        return factory

    return add


@register_attack("clean", norms=NORMS)
def _clean(settings: AttackSettings) -> Attacker:
    return NoOpAttacker()


@register_attack("pgd", norms=("inf", "2"))
def _pgd(settings: AttackSettings) -> Attacker:
    """The original's PGD; with another norm, loss or restarts, ``iat.attacks.NormPGDAttacker``
    (a subclass whose first restart is this PGD, draw for draw)."""
    if (settings.norm, settings.loss, settings.restarts) != ("inf", "ce", 1):
        from iat.attacks import pgd_from_settings

        return pgd_from_settings(settings)
    return PGDAttacker(
        settings.num_iter,
        settings.epsilon,
        settings.step_size,
        prob_start_from_clean=settings.prob_start_from_clean,
        target=settings.target,
        num_classes=settings.num_classes,
        generator=settings.generator,
        autocast=settings.autocast,
        compiled=settings.compiled,
        eot_samples=settings.eot_samples,
    )


@register_attack("fgsmrs")
def _fgsm_random_start(settings: AttackSettings) -> Attacker:
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
        compiled=settings.compiled,
    )


@register_attack("free")
def _free(settings: AttackSettings) -> Attacker:
    return FreeAttacker(settings.epsilon)


# The evaluation attack zoo lives in iat/attacks.py; its factories are registered here so that
# the registry is complete whenever adv_model is imported, and imported lazily (iat.attacks imports
# this module).
@register_attack("fgm", norms=NORMS)
def _fgm(settings: AttackSettings) -> Attacker:
    from iat.attacks import fgm_from_settings

    return fgm_from_settings(settings, minimal=False)


@register_attack("fgm-minimal", norms=NORMS)
def _fgm_minimal(settings: AttackSettings) -> Attacker:
    from iat.attacks import fgm_from_settings

    return fgm_from_settings(settings, minimal=True)


@register_attack("apgd-ce", norms=("inf", "2"))
def _apgd_ce(settings: AttackSettings) -> Attacker:
    from iat.attacks import apgd_from_settings

    return apgd_from_settings(settings, targeted=False)


@register_attack("apgd-t", norms=("inf", "2"))
def _apgd_t(settings: AttackSettings) -> Attacker:
    from iat.attacks import apgd_from_settings

    return apgd_from_settings(settings, targeted=True)


@register_attack("apgd-dlr", norms=("inf", "2"))
def _apgd_dlr(settings: AttackSettings) -> Attacker:
    from iat.attacks import apgd_from_settings

    return apgd_from_settings(settings, targeted=False, loss="dlr")


@register_attack("autoattack", norms=("inf", "2"))
def _autoattack(settings: AttackSettings) -> Attacker:
    from iat.autoattack import autoattack_from_settings

    return autoattack_from_settings(settings)


@register_attack("fab-t", norms=("inf", "2"))
def _fab_t(settings: AttackSettings) -> Attacker:
    from iat.fab import fab_from_settings

    return fab_from_settings(settings)


@register_attack("strong")
def _strong(settings: AttackSettings) -> Attacker:
    from iat.attacks import strong_from_settings

    return strong_from_settings(settings)


@register_attack("square", norms=("inf", "2"))
def _square(settings: AttackSettings) -> Attacker:
    from iat.square import square_from_settings

    return square_from_settings(settings)


def create_attacker(name: str, settings: AttackSettings) -> Attacker:
    """The attacker registered as ``name``, built from ``settings``."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; registered: {sorted(ATTACKS)}")
    if settings.norm not in ATTACK_NORMS[name]:
        raise ValueError(
            f"attack {name!r} supports norms {ATTACK_NORMS[name]}, not {settings.norm!r}"
        )
    return ATTACKS[name](settings)


def mixed_batch(batch: int, adv_fraction: float, paired: bool) -> tuple[slice, slice]:
    """Which images of a loaded batch of ``batch`` are attacked and which are used clean.

    Unpaired (mixed-minibatch PGD, Kurakin et al. 2017 Sec 4.1): each image once, the first
    ``round(adv_fraction * batch)`` (at least 1) attacked, the rest clean. Paired (ALP Sec 3: a
    minibatch of m clean examples and their m adversarial examples; ALP's train.py concatenates
    the loaded batch with its attacked copy): every loaded image is used, clean or attacked or
    both, and the first images are both, so that ``adv_fraction`` of the ``attacked + clean``
    images trained on are adversarial: all images clean and the first
    ``batch * F / (1 - F)`` attacked for F <= 0.5 (all twice at 0.5), else all attacked and the
    first ``batch * (1 - F) / F`` clean."""
    if not paired:
        attacked = min(batch, max(1, round(adv_fraction * batch)))
        return slice(0, attacked), slice(attacked, batch)
    if adv_fraction <= 0.5:
        attacked = min(batch, max(1, round(batch * adv_fraction / (1 - adv_fraction))))
        return slice(0, attacked), slice(0, batch)
    clean = min(batch, max(1, round(batch * (1 - adv_fraction) / adv_fraction)))
    return slice(0, batch), slice(0, clean)


def logit_pairing_loss(clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
    """The mean squared difference of paired logits (ALP Sec 3, L2 loss between f(x) and
    f(x~)): the first ``min(len(clean), len(adv))`` rows of each are pairs."""
    pairs = min(clean_logits.shape[0], adv_logits.shape[0])
    return F.mse_loss(adv_logits[:pairs], clean_logits[:pairs])


def training_objective(
    model: nn.Module,
    attack_model: nn.Module,
    attacker: Attacker,
    images: Tensor,
    labels: Tensor,
    label_smoothing: float,
    adv_fraction: float = 1.0,
    lp_weight: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The adversarial training loss of one batch: ``(loss, adv_logits, target_labels)``.

    The attack runs on ``attack_model`` (the bare network, BatchNorm in inference mode) and the
    loss is computed through ``model`` (e.g. its DDP wrapper) in one forward pass.
    ``adv_fraction`` 1 (the original) trains on adversarial images only; below 1 the batch is
    mixed (``mixed_batch``), and ``lp_weight`` > 0 adds adversarial logit pairing. The logits
    and targets returned are those of the adversarial images, made from the first
    ``len(adv_logits)`` images of the batch (what the training metrics count)."""
    pairing = lp_weight > 0
    attacked, clean = mixed_batch(images.shape[0], adv_fraction, paired=pairing)
    adv, targets = attacker.attack(attack_model, images[attacked], labels[attacked])
    logits = model(torch.cat([adv, images[clean].to(adv.dtype)]))
    adv_logits, clean_logits = logits[: adv.shape[0]], logits[adv.shape[0] :]
    # Feature Denoising Sec 5: label smoothing 0.1; ALP Sec 3: the cross-entropy of the mixed
    # minibatch, clean and adversarial images alike.
    loss = F.cross_entropy(
        logits, torch.cat([labels[attacked], labels[clean]]), label_smoothing=label_smoothing
    )
    if pairing:
        # ALP Sec 3: J(M, theta) + lambda * L(f(x), f(x~)) over the pairs.
        loss = loss + lp_weight * logit_pairing_loss(clean_logits, adv_logits)
    return loss, adv_logits.detach(), targets


def pgd_step_size(epsilon: float, num_iter: int, step_size: float) -> float:
    """The step PGD takes: ``step_size``, raised to ``epsilon / num_iter`` when smaller, so that
    the iterations can cross the ball. Feature Denoising, Sec 6.1: step size 1, except for
    10-iteration attacks where it is epsilon / 10 = 1.6. Summaries and records state this value.
    """
    return max(float(step_size), float(epsilon) / num_iter) if num_iter else float(step_size)


def autocast_dtype(device: torch.device) -> torch.dtype:
    """The fast attack's compute type: fp16 on CUDA (as the original), bf16 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def has_native_low_precision(device: torch.device) -> bool:
    """Whether the fast attack's compute type runs natively: always on CUDA (fp16); on a CPU
    only with bf16 units (AVX512-BF16 or AMX), without which bf16 is emulated and many times
    slower than fp32 (issue measurements: 3.2 s vs 0.22 s per ResNet-50 iteration on AVX2)."""
    if device.type == "cuda":
        return True
    capabilities = torch.cpu.get_capabilities() if device.type == "cpu" else {}
    return any(capabilities.get(unit) for unit in ("avx512_bf16", "amx_bf16"))


def _build_objective(
    loss: Objective, device: torch.device, autocast: bool, compiled: bool
) -> Objective:
    """``loss`` under autocast (scaled for fp16) when ``autocast``, compiled when ``compiled``.

    The compiled graph covers the forward pass and (through AOTAutograd) the input-gradient
    backward pass; on CUDA, mode="reduce-overhead" replays both as CUDA graphs.
    """
    objective = _autocast_objective(loss, device) if autocast else loss
    if not compiled:
        return objective
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return torch.compile(objective, dynamic=False, mode=mode)


def _autocast_objective(loss: Objective, device: torch.device) -> Objective:
    dtype = autocast_dtype(device)
    scale = FP16_LOSS_SCALE if dtype == torch.float16 else 1.0

    def scaled_loss(model: nn.Module, adv: Tensor, goal: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return loss(model, adv, goal).float() * scale

    return scaled_loss


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


def _device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    return like.device if generator is None else generator.device


def _uniform(
    shape: tuple[int, ...] | torch.Size,
    low: float,
    high: float,
    like: Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    """Uniform draws in [low, high) on the generator's device, moved to ``like``'s device."""
    unit = torch.rand(shape, generator=generator, device=_device(generator, like), dtype=like.dtype)
    return (low + (high - low) * unit).to(like.device)
