"""What every attack shares: the interface, the settings, targets and success, precision.

Every attacker takes any ``nn.Module`` that maps float NCHW BGR images in pixel units [0, 255]
to logits (the model normalises its own input), and shares one interface:
``attacker.attack(model, images, labels) -> (adv_images, target_labels)`` where
``target_labels`` is int64 and -1 wherever the attack has no target. A ``generator`` keyword
gives the attack's randomness for one batch (evaluators seed one per batch, so that results do
not depend on the number of processes). ``AttackSettings`` is the one settings type every
factory of the registry (``iat.attacks.registry``) builds from, for training and evaluation.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# The pixel range attacks clip to: the model's (nets.layers owns it), re-exported for attackers.
from nets.layers import PIXEL_MAX as PIXEL_MAX
from nets.layers import PIXEL_MIN as PIXEL_MIN

TARGET_MODES = ("random", "least_likely", None)
NO_TARGET = -1
# The original's --use-fp16xla scales the fp16 loss by 128 before the backward pass so that small
# input gradients do not underflow; only their sign is used. bf16 has fp32's range: no scaling.
FP16_LOSS_SCALE = 128.0
# The Square Attack's query budget per example (Andriushchenko et al. 2020, and AutoAttack's).
DEFAULT_QUERIES = 5000
NORMS = ("inf", "2", "1")
ATTACK_LOSSES = ("ce", "cw")  # cross-entropy, or the Carlini-Wagner logit margin
Objective = Callable[[nn.Module, Tensor, Tensor], Tensor]


class Attacker(abc.ABC):
    """The interface shared by every attacker (clean evaluation included)."""

    generator: torch.Generator | None = None  # the attacker's own random source (None: torch's)

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

    @contextlib.contextmanager
    def _opening(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator | None,
        gradients: bool = True,
        low_precision: torch.dtype | None = None,
    ) -> Iterator[tuple[Tensor, Tensor, torch.Generator | None]]:
        """How an ``attack`` begins: `model` in attack mode for the body (``attacking``, with
        input gradients and `low_precision`; without `gradients`, under ``no_grad``: a
        score-based attack), giving ``(clean, labels, generator)``: the images detached as float,
        the labels as int64, and the call's generator, else the attacker's own."""
        mode = attacking(model, low_precision) if gradients else _scoring(model)
        with mode:
            yield self._inputs(images, labels, generator)

    def _inputs(
        self, images: Tensor, labels: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, torch.Generator | None]:
        """``_opening``'s values without its mode, for an attack that scores its points outside
        attack mode (as evaluation scores them): the images detached as float, the labels as
        int64, the call's generator, else the attacker's own."""
        generator = self.generator if generator is None else generator
        return as_float(images), labels.long(), generator

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

    def image_results(self) -> dict[str, list]:
        """Per example of the last ``attack`` call, what the per-image file records beside the
        evaluation's own fields (an ensemble: the member that broke it). None by default."""
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
def attack_mode(model: nn.Module, low_precision: torch.dtype | None = None) -> Iterator[None]:
    """Puts ``model`` in inference mode with frozen parameters; restores both on exit.

    Per-module ``training`` flags and per-parameter ``requires_grad`` flags are saved and put
    back afterwards, also when the body raises. Modules that can fold their BatchNorm into
    their convolution (``fold_batchnorm``, e.g. ``nets.layers.ConvBN``) do so for the body:
    the same function up to float rounding, without the BatchNorm's passes; with
    `low_precision` (the body's autocast dtype) they also cast the folded weights to it once.
    """
    training = [(module, module.training) for module in model.modules()]
    requires_grad = [(param, param.requires_grad) for param in model.parameters()]
    # Feature Denoising, Sec 5 (and the original code): BatchNorm runs in test mode during the
    # attack, and the attack updates no moving statistics.
    model.eval()
    for param, _ in requires_grad:
        param.requires_grad_(False)
    folded = _fold_batchnorms(model, low_precision)
    try:
        yield
    finally:
        for module in folded:
            module.unfold_batchnorm()
        for module, flag in training:
            module.training = flag
        for param, flag in requires_grad:
            param.requires_grad_(flag)


@contextlib.contextmanager
def attacking(model: nn.Module, low_precision: torch.dtype | None = None) -> Iterator[None]:
    """Input gradients on (also under the caller's no_grad / inference_mode), the model in
    ``attack_mode`` (BatchNorm frozen and folded, no parameter gradients; `low_precision`: the
    autocast dtype the attack runs in)."""
    with torch.inference_mode(False), torch.enable_grad(), attack_mode(model, low_precision):
        yield


@contextlib.contextmanager
def _scoring(model: nn.Module) -> Iterator[None]:
    """``attack_mode`` without gradients: an attack that reads only the model's scores."""
    with torch.no_grad(), attack_mode(model):
        yield


def scored_logits(model: nn.Module, images: Tensor) -> Tensor:
    """`model`'s float logits for `images` as evaluation scores them: one pass over the whole
    batch, in inference mode, with its BatchNorm unfolded, without gradients or autocast.
    Attacks that decide success (an ensemble member's, FAB's) read it here, so that a point on
    the decision boundary cannot count as broken for the attack and correct for the score."""
    training = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            return model(images).float()
    finally:
        for module, flag in training:
            module.training = flag


def as_float(images: Tensor) -> Tensor:
    """The images detached, as float."""
    clean = images.detach()
    return clean if clean.is_floating_point() else clean.float()


def _fold_batchnorms(model: nn.Module, low_precision: torch.dtype | None) -> list[nn.Module]:
    """Fold every foldable BatchNorm of `model` not folded already (an ``attack_mode`` inside
    another keeps the outer one's); returns the modules folded here."""
    foldable = [m for m in model.modules() if hasattr(m, "fold_batchnorm") and m.folded is None]
    for module in foldable:
        module.fold_batchnorm(low_precision)
    return foldable


def random_wrong_labels(
    labels: Tensor, num_classes: int, generator: torch.Generator | None = None
) -> Tensor:
    """For each label, a class drawn uniformly among the ``num_classes - 1`` other classes."""
    if num_classes < 2:
        raise ValueError(f"random targets need at least 2 classes, got {num_classes}")
    # Feature Denoising, Sec 6: the targeted class is selected uniformly at random (among the
    # wrong classes: label + U{1, ..., C-1} mod C, as the original code).
    offset = torch.randint(
        1, num_classes, labels.shape, generator=generator, device=draw_device(generator, labels)
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
    autocast_dtype: torch.dtype | None = None  # that autocast's type; None: the device's above
    compiled: bool = False  # iterations compiled with torch.compile
    norm: str = "inf"  # the threat model's norm: "inf", "2" or "1" (each attack's norms: registry)
    restarts: int = 1  # PGD / APGD-CE runs per example; each restart attacks the unbroken ones
    loss: str = "ce"  # PGD / FGM objective: "ce" (cross-entropy) or "cw" (logit margin)
    eps_step: float = 1.0  # fgm-minimal: epsilon grows by this much until the example breaks
    top_k: int = 9  # APGD-T: target classes, the k most likely wrong ones (capped at classes-1)
    eot_samples: int = 1  # forward passes averaged per iteration (EOT against random models)
    queries: int = DEFAULT_QUERIES  # square: queries per example after the initial point's


def pgd_step_size(epsilon: float, num_iter: int, step_size: float) -> float:
    """The step PGD takes: ``step_size``, raised to ``epsilon / num_iter`` when smaller, so that
    the iterations can cross the ball. Feature Denoising, Sec 6.1: step size 1, except for
    10-iteration attacks where it is epsilon / 10 = 1.6. Summaries and records state this value.
    """
    return max(float(step_size), float(epsilon) / num_iter) if num_iter else float(step_size)


def autocast_dtype(device: torch.device, requested: torch.dtype | None = None) -> torch.dtype:
    """The fast attack's compute type: `requested`, else fp16 on CUDA (as the original) and bf16
    elsewhere. CUDA also takes bf16 (fp32's range: no loss scaling, a coarser mantissa)."""
    if requested is not None:
        return requested
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def has_native_low_precision(device: torch.device) -> bool:
    """Whether the fast attack's compute type runs natively: always on CUDA (fp16); on a CPU
    only with bf16 units (AVX512-BF16 or AMX), without which bf16 is emulated and many times
    slower than fp32 (bench/RESULTS.md, section 1b: AVX2 only)."""
    if device.type == "cuda":
        return True
    capabilities = torch.cpu.get_capabilities() if device.type == "cpu" else {}
    return any(capabilities.get(unit) for unit in ("avx512_bf16", "amx_bf16"))


def build_objective(
    loss: Objective,
    device: torch.device,
    autocast: bool,
    compiled: bool,
    dtype: torch.dtype | None = None,
) -> Objective:
    """``loss`` under autocast to `dtype` (``autocast_dtype``; scaled for fp16) when
    ``autocast``, compiled when ``compiled``.

    The compiled graph covers the forward pass and (through AOTAutograd) the input-gradient
    backward pass; on CUDA, mode="reduce-overhead" replays both as CUDA graphs.
    """
    objective = (
        _autocast_objective(loss, device, autocast_dtype(device, dtype)) if autocast else loss
    )
    if not compiled:
        return objective
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return torch.compile(objective, dynamic=False, mode=mode)


def _autocast_objective(loss: Objective, device: torch.device, dtype: torch.dtype) -> Objective:
    scale = FP16_LOSS_SCALE if dtype == torch.float16 else 1.0

    def scaled_loss(model: nn.Module, adv: Tensor, goal: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return loss(model, adv, goal).float() * scale

    return scaled_loss


def draw_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    return like.device if generator is None else generator.device
