"""The Square Attack (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020, "Square Attack: a
query-efficient black-box adversarial attack via random search"), under L-inf and L2.

Score-based and gradient-free: it reads only the model's logits (under ``torch.no_grad``), so it
works where gradients are masked or zero. Random search (Sec 3, Alg. 1) over perturbations at the
vertices of the threat model: each iteration changes one random square window of the current
perturbation and keeps the change if the margin loss of the true class decreases. An example is
done once it is misclassified; only the others are queried. Images are float NCHW BGR in pixel
units [0, 255]; epsilon is in pixel units of the norm.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from iat.attacks.core import DEFAULT_QUERIES, Attacker, AttackSettings, no_targets
from iat.attacks.ops import (
    check_threat_model,
    clip_pixels,
    logit_margin,
    norm_of,
    per_example,
    uniform01,
)
from iat.attacks.registry import register

# Initial fraction of the pixels a window covers. The paper's experiments tune it per setting
# (the authors' code: 0.05 for L-inf, 0.1 for L2 on standard models, "robust models require
# higher p"); 0.8 is AutoAttack's value (Croce & Hein 2020), the usual one against defenses.
P_INIT = 0.8
# The paper's schedule (Sec 3 and the authors' code, p_selection): p is halved at these
# iterations. AutoAttack runs it unscaled at 5,000 queries (its resc_schedule=False); the
# paper's code may stretch it to the budget (iteration * 10,000 / queries).
P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
SCHEDULE_QUERIES = 10_000
# The authors' L-inf code redraws a window's signs while they would leave the image unchanged (a
# wasted query); capped here, so that a degenerate case (epsilon 0) cannot loop forever.
MAX_REDRAWS = 10
L2_MIN_SIDE = 3  # Sec 3.3 (the authors' code): L2 windows are at least 3x3, of odd side
NORM_FLOOR = 1e-12  # keeps the L2 normalisations finite (the authors' code adds the same)


def square_fraction(p_init: float, iteration: int, queries: int, rescale: bool = False) -> float:
    """The fraction p of pixels the window of ``iteration`` covers (0-based): ``p_init`` halved
    at each of ``P_HALVINGS`` passed; with ``rescale`` the schedule stretched to ``queries``."""
    scaled = int(iteration / queries * SCHEDULE_QUERIES) if rescale else iteration
    return p_init / 2 ** sum(scaled > point for point in P_HALVINGS)


def window_side(p: float, height: int, width: int, norm: str) -> int:
    """Side s of the square window: the s x s x c window holds a fraction p of the n features,
    s = round(sqrt(p n / c)) (Sec 3.2 / 3.3), at least 1 (L-inf) or 3 and odd (L2), at most
    the image's shorter side."""
    side = round(math.sqrt(p * height * width))
    if norm == "2":
        side = max(side, L2_MIN_SIDE)
        side += 1 - side % 2
    return min(max(side, 1), height, width)


def window_mask(top: Tensor, left: Tensor, side: int, height: int, width: int) -> Tensor:
    """Per example, a boolean (n, 1, h, w) mask of the square of ``side`` at (top, left)."""
    rows = torch.arange(height, device=top.device)
    cols = torch.arange(width, device=left.device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def rectangle_bump(rows: int, cols: int, like: Tensor) -> Tensor:
    """The authors' pseudo-Gaussian bump on a rows x cols rectangle (Sec 3.3, eta): nested
    squares around (rows // 2, cols // 2), the one of Chebyshev radius k adding 1 / (k + 1)^2,
    unit L2 norm."""
    if rows == 0 or cols == 0:
        return like.new_zeros(rows, cols)
    rings = max(rows // 2, cols // 2) + 1
    weights = 1.0 / (torch.arange(rings, device=like.device, dtype=like.dtype) + 1) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[d]: the squares of radius >= d
    di = (torch.arange(rows, device=like.device) - rows // 2).abs()
    dj = (torch.arange(cols, device=like.device) - cols // 2).abs()
    bump = tail[torch.maximum(di[:, None], dj[None, :])]
    return bump / bump.norm()


def bump_pair(side: int, like: Tensor) -> Tensor:
    """Sec 3.3's update shape on an s x s window (the authors' meta_pseudo_gaussian_pert): a
    bump on the top half, minus a bump on the bottom half, unit L2 norm; and its transpose.
    Returns (2, s, s); the attack picks either with probability 1/2."""
    half = side // 2
    bump = torch.cat([rectangle_bump(half, side, like), -rectangle_bump(side - half, side, like)])
    bump = bump / bump.norm()
    return torch.stack([bump, bump.T])


def _signs(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Independent +-1 draws, each with probability 1/2."""
    return torch.where(uniform01(shape, like, generator) < 0.5, -1.0, 1.0).to(like.dtype)


def _offsets(count: int, room: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """``count`` offsets uniform in {0, ..., room}: every position of a window in the image
    (Alg. 2 / 3 of the paper; the authors' code leaves out the last one)."""
    return (uniform01((count,), like, generator) * (room + 1)).long().clamp(max=room)


class SquareAttacker(Attacker):
    """The untargeted Square Attack under ``norm`` "inf" or "2" with radius ``epsilon``.

    Examples the model misclassifies on the clean image keep it and are not attacked (that
    clean pass is no query of the budget, as the authors count). Each attacked example spends
    at most ``queries`` + 1 queries, as AutoAttack's (``n_queries`` iterations after the
    initial perturbation's query): one for the initial perturbation, one per iteration until it
    is misclassified. ``rescale_schedule`` stretches p's schedule to the budget (AutoAttack:
    off). A query is one forward pass, or against a random defense the mean logits
    of ``eot_samples`` passes. The margin loss is the true class's logit minus the largest
    other logit (Sec 3, untargeted).

    Statistics per batch: examples attacked and broken, queries they spent (summed).
    """

    def __init__(
        self,
        epsilon: float,
        norm: str = "inf",
        queries: int = DEFAULT_QUERIES,
        p_init: float = P_INIT,
        generator: torch.Generator | None = None,
        eot_samples: int = 1,
        rescale_schedule: bool = False,
    ) -> None:
        check_threat_model(epsilon, norm, ("inf", "2"))
        if queries < 1:
            raise ValueError(f"queries must be >= 1, got {queries}")
        if not 0.0 < p_init <= 1.0:
            raise ValueError(f"p_init must be in (0, 1], got {p_init}")
        self.epsilon = float(epsilon)
        self.norm = norm
        self.queries = queries
        self.p_init = p_init
        self.rescale_schedule = rescale_schedule
        self.generator = generator
        self.eot_samples = eot_samples
        self.last_queries: Tensor | None = None  # per example of the last batch (0: not attacked)
        self._stats = self.stats_template(torch.device("cpu"))

    def attack(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        scoring = self._opening(model, images, labels, generator, gradients=False)
        with scoring as (clean, labels, generator):
            attacked = self._logits(model, clean).argmax(dim=1) == labels
            adv = clean.clone()
            queries = torch.zeros(labels.shape, device=clean.device)
            broken = torch.zeros_like(attacked)
            todo = attacked.nonzero().squeeze(1)
            if todo.numel() > 0:
                adv[todo], queries[todo], broken[todo] = self._run(
                    model, clean[todo], labels[todo], generator
                )
        self.last_queries = queries
        self._stats = {
            "attacked": attacked.sum().double(),
            "broken": broken.sum().double(),
            "queries": queries.sum().double(),
            "queries_broken": queries[broken].sum().double(),
        }
        return adv, no_targets(labels)

    def _logits(self, model: nn.Module, images: Tensor) -> Tensor:
        if self.eot_samples == 1:
            return model(images)
        return torch.stack([model(images) for _ in range(self.eot_samples)]).mean(dim=0)

    def _run(
        self, model: nn.Module, clean: Tensor, labels: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Alg. 1 on examples the model classifies correctly: ``(images, queries, broken)``."""
        if self.norm == "inf":
            best = self._linf_init(clean, generator)
        else:
            best = self._l2_init(clean, generator)
        logits = self._logits(model, best)
        margin = logit_margin(logits, labels)
        broken = logits.argmax(dim=1) != labels
        queries = torch.ones(labels.shape, device=clean.device)
        for iteration in range(self.queries):
            todo = (~broken).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            p = square_fraction(self.p_init, iteration, self.queries, self.rescale_schedule)
            propose = self._linf_proposal if self.norm == "inf" else self._l2_proposal
            candidate = propose(clean[todo], best[todo], p, generator)
            logits = self._logits(model, candidate)
            new_margin = logit_margin(logits, labels[todo])
            wrong = logits.argmax(dim=1) != labels[todo]
            # Alg. 1: keep the candidate if the loss decreased; a misclassified candidate is
            # kept even at a tied margin (AutoAttack's implementation does the same).
            accept = (new_margin < margin[todo]) | wrong
            best[todo] = torch.where(per_example(accept, candidate), candidate, best[todo])
            margin[todo] = torch.where(accept, new_margin, margin[todo])
            broken[todo] = wrong
            queries[todo] += 1
        return best, queries, broken

    # --- L-inf (Sec 3.2) -------------------------------------------------------------------
    def _linf_init(self, clean: Tensor, generator: torch.Generator | None) -> Tensor:
        """Sec 3.2: vertical stripes of width 1, each +-epsilon per channel."""
        n, c, _, w = clean.shape
        return clip_pixels(clean + self.epsilon * _signs((n, c, 1, w), clean, generator))

    def _linf_proposal(
        self, clean: Tensor, best: Tensor, p: float, generator: torch.Generator | None
    ) -> Tensor:
        """Alg. 2: one random s x s window per example set to a new +-epsilon per channel."""
        n, c, h, w = clean.shape
        side = window_side(p, h, w, "inf")
        mask = window_mask(
            _offsets(n, h - side, clean, generator),
            _offsets(n, w - side, clean, generator),
            side,
            h,
            w,
        )
        candidate = best
        unchanged = torch.ones(n, dtype=torch.bool, device=clean.device)
        for _ in range(MAX_REDRAWS):
            signs = _signs((n, c, 1, 1), clean, generator)
            drawn = torch.where(mask, clip_pixels(clean + self.epsilon * signs), best)
            candidate = torch.where(per_example(unchanged, drawn), drawn, candidate)
            unchanged = (candidate - best).flatten(1).abs().amax(dim=1) < 1e-7
            if not unchanged.any():
                break
        return candidate

    # --- L2 (Sec 3.3) ----------------------------------------------------------------------
    def _l2_init(self, clean: Tensor, generator: torch.Generator | None) -> Tensor:
        """Sec 3.3: a grid of s x s windows, s = h // 5, each a bump (or its transpose) with a
        random sign per channel; the whole scaled to L2 norm epsilon."""
        n, c, h, w = clean.shape
        side = max(h // 5, 1)
        pair = bump_pair(side, clean)
        delta = torch.zeros_like(clean)
        # The authors' code centres the grid of h // side windows per side.
        top0, left0 = (h - h // side * side) // 2, (w - w // side * side) // 2
        for top in range(top0, h - side + 1, side):
            for left in range(left0, w - side + 1, side):
                coin = (uniform01((n,), clean, generator) < 0.5).long()
                bumps = pair[coin][:, None] * _signs((n, c, 1, 1), clean, generator)
                delta[:, :, top : top + side, left : left + side] += bumps
        return self._l2_point(clean, delta)

    def _l2_point(self, clean: Tensor, delta: Tensor) -> Tensor:
        """``clean`` + ``delta`` scaled to L2 norm epsilon, clipped to [0, 255] (the clip only
        shortens the perturbation)."""
        scale = self.epsilon / norm_of(delta, "2").clamp_min(NORM_FLOOR)
        return clip_pixels(clean + delta * per_example(scale, delta))

    def _l2_proposal(
        self, clean: Tensor, best: Tensor, p: float, generator: torch.Generator | None
    ) -> Tensor:
        """Alg. 3: per example, window 1 gets a new bump plus its old content (normalised per
        channel), scaled to carry the budget left plus the mass of windows 1 and 2; window 2
        is emptied; the perturbation is rescaled to norm epsilon."""
        n, c, h, w = clean.shape
        side = window_side(p, h, w, "2")
        top, left = _offsets(n, h - side, clean, generator), _offsets(n, w - side, clean, generator)
        first = window_mask(top, left, side, h, w)
        second = window_mask(
            _offsets(n, h - side, clean, generator),
            _offsets(n, w - side, clean, generator),
            side,
            h,
            w,
        )
        delta = best - clean
        # The window's s x s pixels per example, as advanced indices (n, c, s, s).
        span = torch.arange(side, device=clean.device)
        index = (
            torch.arange(n, device=clean.device)[:, None, None, None],
            torch.arange(c, device=clean.device)[None, :, None, None],
            (top[:, None] + span)[:, None, :, None],
            (left[:, None] + span)[:, None, None, :],
        )
        old = delta[index]
        old_norm = old.square().sum(dim=(2, 3), keepdim=True).sqrt()
        union_norm = (delta * (first | second)).square().sum(dim=(2, 3), keepdim=True).sqrt()
        free = (self.epsilon**2 - norm_of(delta, "2").square()).clamp_min(0.0)
        coin = (uniform01((n,), clean, generator) < 0.5).long()
        bumps = bump_pair(side, clean)[coin][:, None] * _signs((n, c, 1, 1), clean, generator)
        new = bumps + old / (old_norm + NORM_FLOOR)
        # Per channel: the budget left shared equally by the c channels, plus the channel's
        # mass in the two windows (the authors' code), so that the total norm stays epsilon.
        target = (per_example(free, new) / c + union_norm.square()).sqrt()
        new = new / (new.square().sum(dim=(2, 3), keepdim=True).sqrt() + NORM_FLOOR) * target
        delta = delta.masked_fill(second, 0.0)
        delta[index] = new
        return self._l2_point(clean, delta)

    # --- statistics --------------------------------------------------------------------------
    def stats_template(self, device: torch.device) -> dict[str, Tensor]:
        keys = ("attacked", "broken", "queries", "queries_broken")
        return {key: torch.zeros((), dtype=torch.float64, device=device) for key in keys}

    def batch_stats(self) -> dict[str, Tensor]:
        return self._stats

    def describe_stats(self, stats: dict[str, Tensor], images: int) -> dict[str, object]:
        attacked, broken = int(round(stats["attacked"].item())), int(round(stats["broken"].item()))
        return {
            "attacked": attacked,
            "broken": broken,
            "mean_queries": stats["queries"].item() / max(attacked, 1),
            "mean_queries_broken": stats["queries_broken"].item() / max(broken, 1),
        }


def square_figures(details: dict) -> str:
    return (
        f", mean queries {details['mean_queries']:.1f} per attacked example "
        f"({details['mean_queries_broken']:.1f} per broken one, "
        f"{details['broken']} of {details['attacked']} broken)"
    )


@register(
    "square",
    "Square",
    norms=("inf", "2"),
    iterations=False,
    queries=True,
    gradient=False,
    extra_record=lambda settings: {"p_init": P_INIT},
    figures=square_figures,
)
def square_from_settings(settings: AttackSettings) -> SquareAttacker:
    return SquareAttacker(
        settings.epsilon,
        norm=settings.norm,
        queries=settings.queries,
        generator=settings.generator,
        eot_samples=settings.eot_samples,
    )
