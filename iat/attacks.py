"""The evaluation attack zoo, behind ``adv_model``'s one interface and registry.

* ``FGMAttacker``: the fast gradient method under L-inf, L2 or L1 (NIST Dioptra's ``norm``), and
  its minimal-perturbation mode (epsilon grows by ``eps_step`` until each example breaks);
* ``NormPGDAttacker``: ``PGDAttacker`` with an L2 norm, the CW margin loss and restarts that keep
  each example's worst case;
* ``APGDAttacker``: APGD-CE and APGD-T (Croce & Hein 2020, "Reliable evaluation of adversarial
  robustness with an ensemble of diverse parameter-free attacks", Sec 3 and 4);
* ``EnsembleAttacker``: ``strong``, the per-example worst case over APGD-CE, APGD-T and targeted
  PGD, each run only on the examples the previous ones left unbroken.

Images are float NCHW BGR in pixel units [0, 255], as everywhere; epsilon and steps are pixel
units in the attack's norm. The factories (``*_from_settings``) are registered in
``adv_model.ATTACKS``, which imports this module lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adv_model import (
    ATTACK_LOSSES,
    PIXEL_MAX,
    PIXEL_MIN,
    Attacker,
    AttackSettings,
    PGDAttacker,
    attack_mode,
    attack_success,
    choose_targets,
    no_targets,
)

# Croce & Hein 2020, Sec 3.2: rho = 0.75 (fraction of increasing steps below which the step
# size is halved) and momentum alpha = 0.75.
APGD_RHO = 0.75
APGD_MOMENTUM = 0.75
DLR_EPS = 1e-12  # keeps the DLR denominator positive (the authors' code adds the same)
# One attempt on the examples still unbroken: their indices -> (adv, success, score).
Attempt = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


# --- shared pieces ---------------------------------------------------------------------------
@contextlib.contextmanager
def attacking(model: nn.Module) -> Iterator[None]:
    """Input gradients on (also under the caller's no_grad / inference_mode), the model in
    ``attack_mode`` (BatchNorm frozen, no parameter gradients)."""
    with torch.inference_mode(False), torch.enable_grad(), attack_mode(model):
        yield


def as_float(images: Tensor) -> Tensor:
    clean = images.detach()
    return clean if clean.is_floating_point() else clean.float()


def logit_margin(logits: Tensor, classes: Tensor) -> Tensor:
    """Per example ``z_c - max_{j != c} z_j`` (Carlini & Wagner 2017, Sec V.A, the f_6 margin)."""
    own = logits.gather(1, classes[:, None]).squeeze(1)
    others = logits.scatter(1, classes[:, None], float("-inf"))
    return own - others.amax(dim=1)


def example_gain(logits: Tensor, labels: Tensor, targets: Tensor, loss: str) -> Tensor:
    """Per example, what the attack maximises: untargeted, the cross-entropy of the label (or
    minus its logit margin); targeted, minus the cross-entropy of the target (or its margin)."""
    targeted = targets >= 0
    goal = torch.where(targeted, targets, labels.long())
    if loss == "ce":
        value = F.cross_entropy(logits, goal, reduction="none")
        return torch.where(targeted, -value, value)
    margin = logit_margin(logits, goal)
    return torch.where(targeted, margin, -margin)


def gain_and_grad(
    model: nn.Module, adv: Tensor, gain: Callable[[Tensor], Tensor], eot_samples: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """``(gain per example, its input gradient, logits)`` at ``adv``. The gains are summed before
    the backward pass, so each example's gradient is its own (not scaled by the batch size).
    Against a random model (defense), gain, gradient and logits are means over ``eot_samples``
    forward passes, each a fresh draw (EOT: Athalye, Carlini & Wagner 2018, Sec 4.3)."""
    adv = adv.detach().requires_grad_(True)
    draws = [model(adv) for _ in range(eot_samples)]
    value = torch.stack([gain(logits) for logits in draws]).mean(dim=0)
    logits = torch.stack(draws).mean(dim=0)
    (grad,) = torch.autograd.grad(value.sum(), adv)
    return value.detach(), grad, logits.detach()


def norm_of(delta: Tensor, norm: str) -> Tensor:
    """Per-example L-inf, L2 or L1 norm of an NCHW tensor."""
    flat = delta.flatten(1)
    if norm == "inf":
        return flat.abs().amax(dim=1)
    return flat.norm(p=float(norm), dim=1)


def _per_example(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def unit_l2(grad: Tensor) -> Tensor:
    """``grad / ||grad||_2`` per example (0 where the gradient is 0)."""
    return grad / _per_example(norm_of(grad, "2").clamp_min(1e-30), grad)


def project_l2(delta: Tensor, epsilon: float) -> Tensor:
    """``delta`` scaled into the L2 ball of radius ``epsilon`` (the Euclidean projection)."""
    scale = (epsilon / norm_of(delta, "2").clamp_min(1e-30)).clamp(max=1.0)
    return delta * _per_example(scale, delta)


def clip_pixels(images: Tensor) -> Tensor:
    return images.clamp(PIXEL_MIN, PIXEL_MAX)


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


def worst_case(
    clean: Tensor, attempts: Sequence[Attempt], broken: Tensor
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Each attempt in turn on the examples not yet ``broken``; per example the image of the
    attempt that broke it, else of the attempt with the highest score (the clean image where
    ``broken`` already holds). Returns ``(images, broken, examples each attempt broke)``.

    The indices of the unbroken examples are read between attempts (one host sync each), never
    inside an attempt's iterations."""
    best = clean.clone()
    score = torch.full(broken.shape, float("-inf"), device=clean.device)
    broken = broken.clone()
    newly = []
    for attempt in attempts:
        todo = (~broken).nonzero().squeeze(1)
        if todo.numel() == 0:
            newly.append(torch.zeros((), dtype=torch.int64, device=clean.device))
            continue
        adv, success, gain = attempt(todo)
        better = success | (gain > score[todo])
        best[todo] = torch.where(_per_example(better, adv), adv, best[todo])
        score[todo] = torch.where(better, gain, score[todo])
        broken[todo] = success
        newly.append(success.sum())
    return best, broken, newly


def _randn(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = like.device if generator is None else generator.device
    draws = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    return draws.to(like.device)


def _rand(shape: torch.Size | tuple, like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = like.device if generator is None else generator.device
    return torch.rand(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def uniform_l2_start(clean: Tensor, epsilon: float, generator: torch.Generator | None) -> Tensor:
    """A uniform point of the L2 ball around ``clean`` (a Gaussian direction, radius
    eps * U^(1/d)), clipped to [0, 255]."""
    direction = unit_l2(_randn(clean.shape, clean, generator))
    dims = clean[0].numel()
    radius = epsilon * _rand((clean.shape[0],), clean, generator) ** (1.0 / dims)
    return clip_pixels(clean + direction * _per_example(radius, clean))


def _check_common(epsilon: float, norm: str, norms: tuple[str, ...], loss: str = "ce") -> None:
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if norm not in norms:
        raise ValueError(f"norm {norm!r} is not one of {norms}")
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"loss {loss!r} is not one of {ATTACK_LOSSES}")


# --- FGM -------------------------------------------------------------------------------------
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
        _check_common(epsilon, norm, ("inf", "2", "1"), loss)
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
        generator = self.generator if generator is None else generator
        with attacking(model):
            clean = as_float(images)
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
            adv = torch.where(_per_example(success, adv), point, adv)
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


def histogram_median(counts: Tensor, values: Sequence[float]) -> float:
    """The median of the multiset holding ``counts[i]`` copies of ``values[i]`` (values
    ascending): the mean of the two middle elements for an even total; nan when empty."""
    cumulative = counts.double().cumsum(0).tolist()
    total = int(round(cumulative[-1])) if cumulative else 0
    if total == 0:
        return float("nan")

    def kth(k: int) -> float:
        return next(v for v, c in zip(values, cumulative, strict=True) if c > k)

    return (kth((total - 1) // 2) + kth(total // 2)) / 2


# --- PGD with norms, losses and restarts -----------------------------------------------------
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
        )
        _check_common(epsilon, norm, ("inf", "2"), loss)
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
        generator = self.generator if generator is None else generator
        with attacking(model):
            clean = as_float(images)
            targets = self._target_labels(model, clean, labels, generator)
            attempt = partial(self._attempt, model, clean, labels.long(), targets, generator)
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


# --- APGD ------------------------------------------------------------------------------------
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


def ball_projection(clean: Tensor, norm: str, epsilon: float) -> Callable[[Tensor], Tensor]:
    """x -> its projection onto the ``norm`` ball of radius ``epsilon`` around ``clean``, within
    [0, 255]. L-inf: a clamp (the exact projection onto the box intersection); L2: the ball's
    projection, then the pixel clip (which only shortens the perturbation)."""
    if norm == "inf":
        lower = (clean - epsilon).clamp(PIXEL_MIN, PIXEL_MAX)
        upper = (clean + epsilon).clamp(PIXEL_MIN, PIXEL_MAX)
        return lambda x: torch.minimum(torch.maximum(x, lower), upper)
    return lambda x: clip_pixels(clean + project_l2(x - clean, epsilon))


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
        _check_common(epsilon, norm, ("inf", "2"))
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
        generator = self.generator if generator is None else generator
        labels = labels.long()
        with attacking(model):
            clean = as_float(images)
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
            x = project(clean + eps * (2 * _rand(clean.shape, clean, generator) - 1))
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
            z = project(x + _per_example(step, x) * direction)
            alpha = 1.0 if k == 0 else APGD_MOMENTUM
            x_prev, x = x, project(x + alpha * (z - x) + (1 - alpha) * (x - x_prev))
            new_value, grad, logits = gain_and_grad(model, x, gain, self.eot_samples)
            newly = (logits.argmax(dim=1) != labels) & ~broken
            out = torch.where(_per_example(newly, x), x, out)
            broken = broken | newly
            increases += (new_value > value).float()
            value = new_value
            improved = value > best
            x_best = torch.where(_per_example(improved, x), x, x_best)
            grad_best = torch.where(_per_example(improved, x), grad, grad_best)
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
                x = torch.where(_per_example(halve, x), x_best, x)
                grad = torch.where(_per_example(halve, x), grad_best, grad)
                value = torch.where(halve, best, value)
                halved_at_check, best_at_check = halve, best
                increases = torch.zeros_like(increases)
        return torch.where(_per_example(broken, out), out, x_best), best


# --- the strong ensemble ---------------------------------------------------------------------
class EnsembleAttacker(Attacker):
    """The per-example worst case over ``members`` (name, attacker), AutoAttack-style: the
    examples the model misclassifies keep the clean image, then each member attacks only the
    examples the previous ones left classified correctly. Success is misclassification
    (``target_labels`` are -1), also for targeted members.

    Statistics per batch: ``broken`` = [misclassified clean, then the examples each member
    newly broke], ``attacked`` = the examples each member attacked. The first member's share is
    its own success rate; each later one's is what it adds to the ensemble.
    """

    def __init__(self, members: Sequence[tuple[str, Attacker]]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)
        self._broken = torch.zeros(len(self.members) + 1, dtype=torch.float64)
        self._attacked = torch.zeros(len(self.members), dtype=torch.float64)

    def attack(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        labels = labels.long()
        clean = as_float(images)
        with attacking(model), torch.no_grad():
            wrong = model(clean).argmax(dim=1) != labels
        attempts = [
            partial(self._attempt, attacker, model, clean, labels, generator)
            for _, attacker in self.members
        ]
        adv, _, newly = worst_case(clean, attempts, wrong)
        self._broken = torch.stack([wrong.sum(), *newly]).double()
        self._attacked = labels.numel() - self._broken.cumsum(0)[:-1]
        return adv, no_targets(labels)

    def _attempt(
        self,
        attacker: Attacker,
        model: nn.Module,
        clean: Tensor,
        labels: Tensor,
        generator: torch.Generator | None,
        todo: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One member on the unbroken examples; every score 0, so that an example no member
        breaks keeps the first member's image."""
        adv, _ = attacker.attack(model, clean[todo], labels[todo], generator=generator)
        with attacking(model), torch.no_grad():
            success = model(adv).argmax(dim=1) != labels[todo]
        return adv, success, torch.zeros(success.shape, device=adv.device)

    def stats_template(self, device: torch.device) -> dict[str, Tensor]:
        members = len(self.members)
        zeros = partial(torch.zeros, dtype=torch.float64, device=device)
        return {"broken": zeros(members + 1), "attacked": zeros(members)}

    def batch_stats(self) -> dict[str, Tensor]:
        return {"broken": self._broken, "attacked": self._attacked}

    def describe_stats(self, stats: dict[str, Tensor], images: int) -> dict[str, object]:
        broken = [int(round(v)) for v in stats["broken"].tolist()]
        attacked = [int(round(v)) for v in stats["attacked"].tolist()]
        members = {
            name: {
                "attacked": attacked[i],
                "broken": broken[i + 1],
                "success_rate": broken[i + 1] / max(attacked[i], 1),
            }
            for i, (name, _) in enumerate(self.members)
        }
        return {
            "clean_wrong": broken[0],
            "members": members,
            "ensemble_success_rate": sum(broken) / max(images, 1),
        }


# --- factories (registered in adv_model.ATTACKS) ---------------------------------------------
def fgm_from_settings(settings: AttackSettings, minimal: bool) -> FGMAttacker:
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


def pgd_from_settings(settings: AttackSettings) -> NormPGDAttacker:
    return NormPGDAttacker(
        settings.num_iter,
        settings.epsilon,
        settings.step_size,
        norm=settings.norm,
        loss=settings.loss,
        restarts=settings.restarts,
        target=settings.target,
        num_classes=settings.num_classes,
        generator=settings.generator,
        autocast=settings.autocast,
        compiled=settings.compiled,
        eot_samples=settings.eot_samples,
    )


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


STRONG_MEMBERS = ("apgd-ce", "apgd-t", "pgd-target")


def strong_from_settings(settings: AttackSettings) -> EnsembleAttacker:
    """APGD-CE, APGD-T (``top_k`` targets) and the original's PGD toward a random wrong class
    (with ``restarts``), each with ``num_iter`` iterations and ``epsilon`` (L-inf)."""
    pgd = pgd_from_settings(
        dataclasses.replace(
            settings, norm="inf", loss="ce", target="random", autocast=False, compiled=False
        )
    )
    members = (
        apgd_from_settings(dataclasses.replace(settings, restarts=1), targeted=False),
        apgd_from_settings(dataclasses.replace(settings, restarts=1), targeted=True),
        pgd,
    )
    return EnsembleAttacker(list(zip(STRONG_MEMBERS, members, strict=True)))
