"""FAB-T: the targeted Fast Adaptive Boundary attack, as AutoAttack's standard version runs it.

FAB (Croce & Hein, "Minimally distorted Adversarial Examples with a Fast Adaptive Boundary
Attack", ICML 2020) looks for the smallest perturbation that changes the prediction: each
iteration linearises the decision boundary at the current point, projects the current point and
the clean image onto that hyperplane within the pixel box, and steps to a biased mix of the two
projections. The targeted version (Croce & Hein 2020, "Reliable evaluation of adversarial
robustness with an ensemble of diverse parameter-free attacks", Sec 4, FAB-T) linearises only the
boundary between the true class and one target, for each of the K likeliest wrong classes in
turn. As AutoAttack counts it, an example is broken when FAB's point is misclassified and within
the epsilon-ball; epsilon otherwise only sets the radius of the random restarts. As AutoAttack's
FAB, it has no final search onto the boundary.

Images are float NCHW BGR in pixel units [0, 255], as everywhere; epsilon is in pixel units of
the norm ("inf" or "2"). ``fab_from_settings`` is registered as ``fab-t``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from iat.attacks.core import (
    PIXEL_MAX,
    PIXEL_MIN,
    Attacker,
    AttackSettings,
    attacking,
    no_targets,
    scored_logits,
)
from iat.attacks.ops import (
    check_threat_model,
    clip_pixels,
    gain_and_grad,
    histogram_median,
    norm_of,
    normal,
    per_example,
    uniform01,
)
from iat.attacks.registry import register

# FAB Sec 2.2 (and AutoAttack's defaults): alpha_max bounds the bias towards the clean image,
# eta extrapolates past the linearised boundary, beta is the backward step after a success.
FAB_ALPHA_MAX = 0.1
FAB_ETA = 1.05
FAB_BETA = 0.9
NORM_FLOOR = 1e-8  # keeps alpha's denominator positive, as the authors' code
NORM_BINS = 1000  # the statistics' histogram of found norms: bins of epsilon / 1000


def project_onto_hyperplane(points: Tensor, w: Tensor, r: Tensor, norm: str) -> Tensor:
    """FAB Sec 2.1: per row, the smallest ``d`` in the ``norm`` ("inf" or "2") with
    ``<w, d> = r`` and ``points + d`` in [0, 255], for (B, n) ``points``, ``w`` and (B,) ``r``;
    where the box cannot reach the hyperplane, the box point that gets closest to it.

    After flipping ``w`` so that ``r >= 0``, the minimiser moves every coordinate in the
    direction of its weight: L-inf by ``min(lam, room)``, L2 by ``|w| min(lam, room / |w|)``
    (the KKT point of the box-constrained least-norm problem), ``room`` being the distance to
    the box's face in that direction. ``<w, d>`` is then a non-decreasing piecewise-linear
    function of ``lam`` whose kinks are the coordinates' saturation points; sorting them gives
    its value at every kink, and the kink interval holding ``r`` the exact ``lam``."""
    w = torch.where(r[:, None] < 0, -w, w)
    r = r.abs()
    room = torch.where(w > 0, PIXEL_MAX - points, points - PIXEL_MIN)
    size = w.abs()
    scale = torch.ones_like(size) if norm == "inf" else size
    slope = size * scale  # d<w, d>/d lam while the coordinate is free
    limit = room / scale.clamp_min(1e-30)  # the lam at which the coordinate reaches the box
    saturation, order = limit.sort(dim=1)
    slope_sorted = slope.gather(1, order)
    gain = (size * room).gather(1, order)  # what a saturated coordinate adds to <w, d>
    saturated_before = gain.cumsum(dim=1) - gain
    free_from = slope_sorted.flip(1).cumsum(dim=1).flip(1)
    free_after = torch.cat([free_from[:, 1:], torch.zeros_like(free_from[:, :1])], dim=1)
    reach = saturated_before + gain + saturation * free_after  # <w, d> at each kink
    kink = (reach < r[:, None]).sum(dim=1, keepdim=True)
    feasible = kink < points.shape[1]
    kink = kink.clamp(max=points.shape[1] - 1)
    # Within the kink interval, <w, d> = saturated_before + lam * free_from: solve for lam.
    free = free_from.gather(1, kink).clamp_min(1e-30)
    lam = (r[:, None] - saturated_before.gather(1, kink)) / free
    lam = torch.where(feasible, lam.clamp_min(0.0), torch.full_like(lam, math.inf))
    return w.sign() * scale * torch.minimum(lam, limit)


def target_margin(logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """``z_target - z_label`` per example: FAB-T's boundary is where it crosses 0."""
    return (logits.gather(1, targets[:, None]) - logits.gather(1, labels[:, None])).squeeze(1)


class FABAttacker(Attacker):
    """FAB-T under L-inf or L2: for each of the ``top_k`` likeliest wrong classes of the clean
    image (capped at classes - 1), ``restarts`` FAB runs of ``num_iter`` iterations toward it,
    each run on the examples no earlier run broke within ``epsilon``.

    The first run per target starts from the clean image, later ones from a random point at
    distance epsilon / 2 (AutoAttack's FAB). Success is misclassification (``target_labels``
    are -1), as AutoAttack; examples the model already misclassifies keep the clean image, as do
    the examples no run broke within ``epsilon``. A broken example returns the smallest
    misclassified iterate its run found, with no final search onto the boundary (AutoAttack's
    FAB has none; FAB's paper, Sec 2.2, adds one that leaves points ~1e-8 from the boundary),
    and counts only where ``scored_logits`` of the whole batch confirms it; an example whose
    point does not hold goes on to the next target.

    Statistics per batch: a histogram of the norms of the perturbations that broke examples
    (bins of epsilon / 1000), from which ``describe_stats`` gives their count and median.
    One iteration costs one forward and input-gradient pass (times ``eot_samples`` against a
    random defense) and one forward pass.
    """

    def __init__(
        self,
        num_iter: int,
        epsilon: float,
        norm: str = "inf",
        top_k: int = 9,
        restarts: int = 1,
        generator: torch.Generator | None = None,
        eot_samples: int = 1,
    ) -> None:
        if num_iter < 1 or restarts < 1 or top_k < 1:
            raise ValueError(f"num_iter, restarts, top_k must be >= 1: {num_iter, restarts, top_k}")
        check_threat_model(epsilon, norm, ("inf", "2"))
        self.num_iter = num_iter
        self.epsilon = float(epsilon)
        self.norm = norm
        self.top_k = top_k
        self.restarts = restarts
        self.generator = generator
        self.eot_samples = eot_samples
        self._norm_counts = torch.zeros(NORM_BINS, dtype=torch.float64)

    def attack(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        clean, labels, generator = self._inputs(images, labels, generator)
        clean_logits = scored_logits(model, clean)
        # AutoAttack (fab_base.perturb): only correctly classified examples are attacked;
        # the targets are the classes ranked 2nd to (k+1)-th by the clean logits.
        broken = clean_logits.argmax(dim=1) != labels
        attacked = ~broken
        ranked = clean_logits.argsort(dim=1, descending=True)
        found = torch.full(labels.shape, math.inf, device=clean.device)
        adv = clean.clone()
        for rank in range(1, min(self.top_k, clean_logits.shape[1] - 1) + 1):
            for restart in range(self.restarts):
                todo = (~broken).nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                with attacking(model):
                    point, distance = self._run(
                        model, clean[todo], labels[todo], ranked[todo, rank], restart > 0, generator
                    )
                # AutoAttack: a point counts only within the epsilon-ball, and (as its
                # robust flags) only where the score says it is misclassified; else the
                # example stays in play for the next target.
                within = per_example(distance <= self.epsilon, point)
                candidate = adv.clone()
                candidate[todo] = torch.where(within, point, adv[todo])
                holds = scored_logits(model, candidate).argmax(dim=1)[todo] != labels[todo]
                holds &= distance <= self.epsilon
                adv[todo] = torch.where(per_example(holds, point), point, adv[todo])
                found[todo] = torch.where(holds, distance, found[todo])
                broken[todo] = holds
        self._norm_counts = self._histogram(found[attacked & broken])
        return adv, no_targets(labels)

    def _run(
        self,
        model: nn.Module,
        clean: Tensor,
        labels: Tensor,
        targets: Tensor,
        random_start: bool,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        """One FAB run toward ``targets`` (FAB Algorithm 1 with the boundary of FAB-T):
        ``(smallest misclassified point found, its norm)``, inf and the clean image where none."""
        x = self._start(clean, generator) if random_start else clean
        best, best_norm = clean.clone(), torch.full(labels.shape, math.inf, device=clean.device)
        margin = partial(target_margin, labels=labels, targets=targets)
        origin = clean.flatten(1)
        for _ in range(self.num_iter):
            value, grad, _ = gain_and_grad(model, x, margin, self.eot_samples)
            with torch.no_grad():
                # FAB Sec 2.2: the linearised boundary {z : f(x) + <grad, z - x> = 0}; project
                # the current point and the clean image onto it within the box (Sec 2.1).
                w = grad.flatten(1)
                here = x.flatten(1)
                offset = -value
                offset_origin = offset - (w * (origin - here)).sum(dim=1)
                step = project_onto_hyperplane(
                    torch.cat([here, origin]),
                    torch.cat([w, w]),
                    torch.cat([offset, offset_origin]),
                    self.norm,
                ).view(2, *x.shape)
                lengths = norm_of(step.flatten(0, 1), self.norm).clamp_min(NORM_FLOOR)
                length, length_origin = lengths.view(2, -1)
                # FAB Sec 2.2, biased gradient step: alpha = min(|d| / (|d| + |d_orig|),
                # alpha_max), both projections extrapolated by eta, then clipped to the box.
                alpha = per_example(
                    (length / (length + length_origin)).clamp(0.0, FAB_ALPHA_MAX), x
                )
                x = clip_pixels(
                    (1 - alpha) * (x + FAB_ETA * step[0]) + alpha * (clean + FAB_ETA * step[1])
                )
                wrong = model(x).argmax(dim=1) != labels
                distance = norm_of(x - clean, self.norm)
                better = wrong & (distance < best_norm)
                best = torch.where(per_example(better, x), x, best)
                best_norm = torch.where(better, distance, best_norm)
                # FAB Sec 2.2, backward step: from a misclassified point, back towards the
                # clean image by the factor beta.
                x = torch.where(per_example(wrong, x), clean + FAB_BETA * (x - clean), x)
        return best, best_norm

    def _start(self, clean: Tensor, generator: torch.Generator | None) -> Tensor:
        """AutoAttack's FAB restart: a random point at distance epsilon / 2 from the clean image
        (L-inf: uniform draws scaled to the norm; L2: a Gaussian direction), in [0, 255]."""
        if self.norm == "inf":
            draw = 2 * uniform01(clean.shape, clean, generator) - 1
        else:
            draw = normal(clean.shape, clean, generator)
        radius = per_example(norm_of(draw, self.norm).clamp_min(1e-30), clean)
        return clip_pixels(clean + (self.epsilon / 2) * draw / radius)

    def _histogram(self, norms: Tensor) -> Tensor:
        width = max(self.epsilon, 1e-12) / NORM_BINS
        bins = (norms / width).floor().long().clamp(0, NORM_BINS - 1)
        return torch.bincount(bins, minlength=NORM_BINS).double()

    def stats_template(self, device: torch.device) -> dict[str, Tensor]:
        return {"norm_counts": torch.zeros(NORM_BINS, dtype=torch.float64, device=device)}

    def batch_stats(self) -> dict[str, Tensor]:
        return {"norm_counts": self._norm_counts}

    def describe_stats(self, stats: dict[str, Tensor], images: int) -> dict[str, object]:
        counts = stats["norm_counts"]
        width = self.epsilon / NORM_BINS
        centres = [(i + 0.5) * width for i in range(NORM_BINS)]
        return {
            "broken": int(round(counts.sum().item())),
            "median_norm": histogram_median(counts, centres),
        }


def fab_figures(details: dict) -> str:
    return f", FAB-T broke {details['broken']} within eps, median norm {details['median_norm']:g}"


@register(
    "fab-t",
    "FAB-T",
    norms=("inf", "2"),
    restarts=True,
    top_k=True,
    targets="top-k",
    figures=fab_figures,
)
def fab_from_settings(settings: AttackSettings) -> FABAttacker:
    return FABAttacker(
        settings.num_iter,
        settings.epsilon,
        norm=settings.norm,
        top_k=settings.top_k,
        restarts=settings.restarts,
        generator=settings.generator,
        eot_samples=settings.eot_samples,
    )
