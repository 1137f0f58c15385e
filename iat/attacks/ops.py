"""Pieces the attacks share: gains and their gradients, norms and projections, random draws,
and the per-example worst case over attempts.

Images are float NCHW BGR in pixel units [0, 255]; epsilon is in pixel units of the norm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iat.attacks.core import ATTACK_LOSSES, PIXEL_MAX, PIXEL_MIN

# One attempt on the examples still unbroken: their indices -> (adv, success, score).
Attempt = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


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


def per_example(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def unit_l2(grad: Tensor) -> Tensor:
    """``grad / ||grad||_2`` per example (0 where the gradient is 0)."""
    return grad / per_example(norm_of(grad, "2").clamp_min(1e-30), grad)


def project_l2(delta: Tensor, epsilon: float) -> Tensor:
    """``delta`` scaled into the L2 ball of radius ``epsilon`` (the Euclidean projection)."""
    scale = (epsilon / norm_of(delta, "2").clamp_min(1e-30)).clamp(max=1.0)
    return delta * per_example(scale, delta)


def clip_pixels(images: Tensor) -> Tensor:
    return images.clamp(PIXEL_MIN, PIXEL_MAX)


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
        best[todo] = torch.where(per_example(better, adv), adv, best[todo])
        score[todo] = torch.where(better, gain, score[todo])
        broken[todo] = success
        newly.append(success.sum())
    return best, broken, newly


def normal(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = like.device if generator is None else generator.device
    draws = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    return draws.to(like.device)


def uniform01(shape: torch.Size | tuple, like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = like.device if generator is None else generator.device
    return torch.rand(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def uniform_l2_start(clean: Tensor, epsilon: float, generator: torch.Generator | None) -> Tensor:
    """A uniform point of the L2 ball around ``clean`` (a Gaussian direction, radius
    eps * U^(1/d)), clipped to [0, 255]."""
    direction = unit_l2(normal(clean.shape, clean, generator))
    dims = clean[0].numel()
    radius = epsilon * uniform01((clean.shape[0],), clean, generator) ** (1.0 / dims)
    return clip_pixels(clean + direction * per_example(radius, clean))


def ball_projection(clean: Tensor, norm: str, epsilon: float) -> Callable[[Tensor], Tensor]:
    """x -> its projection onto the ``norm`` ball of radius ``epsilon`` around ``clean``, within
    [0, 255]. L-inf: a clamp (the exact projection onto the box intersection); L2: the ball's
    projection, then the pixel clip (which only shortens the perturbation)."""
    if norm == "inf":
        lower = (clean - epsilon).clamp(PIXEL_MIN, PIXEL_MAX)
        upper = (clean + epsilon).clamp(PIXEL_MIN, PIXEL_MAX)
        return lambda x: torch.minimum(torch.maximum(x, lower), upper)
    return lambda x: clip_pixels(clean + project_l2(x - clean, epsilon))


def check_threat_model(epsilon: float, norm: str, norms: tuple[str, ...], loss: str = "ce") -> None:
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if norm not in norms:
        raise ValueError(f"norm {norm!r} is not one of {norms}")
    if loss not in ATTACK_LOSSES:
        raise ValueError(f"loss {loss!r} is not one of {ATTACK_LOSSES}")


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
