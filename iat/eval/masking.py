"""Checks that an evaluation's attack failed rather than the model resisted (gradient masking).

Carlini et al. 2019 ("On Evaluating Adversarial Robustness", Sec 5) and Pintor et al. (NeurIPS
2022, "Indicators of Attack Failure") list the signs; these four run with every ``strong`` or
``autoattack`` evaluation, on the first ``--masking-checks`` images, through ``evaluate`` (so
distributed and counted exactly once like the evaluation itself):

* **flat loss**: the attack's adversarial point does not raise the cross-entropy over the clean
  image's, or the input gradient at the clean image is zero, for a share of the images
  (a non-differentiable layer without BPDA; Pintor et al., "silent success/failure" indicators);
* **gradient-free success**: a score-based attack (Square, when registered) breaks images that
  every gradient member left correct (Carlini et al. Sec 5.2: try gradient-free attacks);
* **unbounded ε**: untargeted PGD from the clean image over the whole pixel range does not
  drive the accuracy to ~0 (Carlini et al. Sec 5.1: unbounded attacks must reach 100% success);
* **more iterations**: twice the iterations still lower the robust accuracy (the attack had not
  converged; Carlini et al. Sec 5.3).

Each gives a figure, its threshold and whether it warns; warnings are printed and every check is
stored in the evaluation's record (``masking_checks``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iat.attacks import (
    PIXEL_MAX,
    Attacker,
    AttackSettings,
    attack_info,
    create_attacker,
    no_targets,
)
from iat.attacks.core import as_float, attacking
from iat.config import Config, eval_attack
from iat.data.layouts import Sample
from iat.eval.metrics import EvalResult

FLAT_SHARE = 0.1  # warn when more than this share of images shows a flat loss
UNBOUNDED_ACCURACY = 0.05  # warn when unbounded PGD leaves more than this accuracy
MORE_ITERATIONS_DROP = 0.02  # warn when twice the iterations lower robust accuracy by more
UNBOUNDED_ITER = 20  # untargeted PGD iterations for the unbounded check
GRADIENT_FREE = "square"  # the score-based attack the check runs
GRADIENT_FREE_QUERIES = 1000  # its budget in the check (Square's own default: 5,000)


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    threshold: float
    warn: bool
    message: str  # what the figure means when it warns

    def line(self) -> str:
        return f"warning: possible attack failure ({self.name}): {self.message}"


class MaskingProbe(Attacker):
    """`inner`'s attack, then the flat-loss and gradient-free checks on the same images.

    Statistics (summed over batches and ranks): ``[correct on clean, no loss increase, zero
    input gradient, correct after inner, broken by the gradient-free attack]``. The returned
    images are inner's, replaced by the gradient-free attack's where that broke them."""

    def __init__(self, inner: Attacker, gradient_free: Attacker | None) -> None:
        self.inner, self.gradient_free = inner, gradient_free
        self._stats = torch.zeros(5, dtype=torch.float64)

    def attack(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        labels = labels.long()
        adv, _ = self.inner.attack(model, images, labels, generator=generator)
        clean = as_float(images).requires_grad_(True)
        with attacking(model):
            clean_logits = model(clean)
            clean_loss = F.cross_entropy(clean_logits, labels, reduction="none")
            (grad,) = torch.autograd.grad(clean_loss.sum(), clean)
        with torch.no_grad(), attacking(model):
            adv_logits = model(adv)
        adv_loss = F.cross_entropy(adv_logits.detach(), labels, reduction="none")
        correct = clean_logits.detach().argmax(dim=1) == labels
        flat = correct & (adv_loss <= clean_loss.detach())
        zero_grad = correct & (grad.flatten(1).abs().amax(dim=1) == 0)
        robust = correct & (adv_logits.argmax(dim=1) == labels)
        broken_free = torch.zeros_like(robust)
        if self.gradient_free is not None and robust.any():
            free_adv, _ = self.gradient_free.attack(
                model, images[robust], labels[robust], generator=generator
            )
            with torch.no_grad(), attacking(model):
                free_wrong = model(free_adv).argmax(dim=1) != labels[robust]
            adv = adv.clone()
            adv[robust.nonzero().squeeze(1)[free_wrong]] = free_adv[free_wrong].to(adv.dtype)
            broken_free[robust.nonzero().squeeze(1)[free_wrong]] = True
        counts = [correct, flat, zero_grad, robust, broken_free]
        self._stats = torch.stack([c.sum() for c in counts]).double()
        return adv.detach(), no_targets(labels)

    def stats_template(self, device: torch.device) -> dict[str, Tensor]:
        return {"probe": torch.zeros(5, dtype=torch.float64, device=device)}

    def batch_stats(self) -> dict[str, Tensor]:
        return {"probe": self._stats}

    def describe_stats(self, stats: dict[str, Tensor], images: int) -> dict[str, object]:
        return {"probe_counts": [int(round(v)) for v in stats["probe"].tolist()]}


Evaluate = Callable[[Config, Sequence[Sample], Callable[[Attacker], Attacker] | None], EvalResult]


def run_checks(cfg: Config, samples: Sequence[Sample], evaluate: Evaluate) -> list[Check]:
    """The four checks on the first ``cfg.masking_checks`` of `samples`, for `cfg`'s attack.

    `evaluate(cfg, samples, wrap)` evaluates `cfg`'s attack on `samples`, its attacker first
    passed through `wrap` when given, and returns the counts with the attacker's statistics."""
    subset = list(samples[: cfg.masking_checks])
    # An attack with a score-based member (AutoAttack's Square) has run one: a second run would
    # only measure its randomness.
    free = None if attack_info(eval_attack(cfg)).queries else _gradient_free(cfg)
    probed = evaluate(cfg, subset, lambda inner: MaskingProbe(inner, free))
    correct, flat, zero_grad, robust, broken_free = (
        float(v) for v in probed.details["probe_counts"]
    )
    checks = [
        _flat_loss(correct, flat, zero_grad),
        _gradient_free_success(robust, broken_free, free is not None, eval_attack(cfg)),
    ]
    # Unbounded: the whole pixel box (an L-inf ball of radius 255 holds every image, so any
    # norm's unbounded attack is this one). From the clean image: a random start in so large a
    # ball is noise, misclassified without any gradient, and would hide the failure looked for.
    unbounded = AttackSettings(
        UNBOUNDED_ITER,
        PIXEL_MAX,
        PIXEL_MAX / UNBOUNDED_ITER,
        target=None,
        prob_start_from_clean=1.0,
    )
    accuracy = 1 - evaluate(cfg, subset, lambda _: create_attacker("pgd", unbounded)).top1_error
    checks.append(
        Check(
            "unbounded epsilon",
            accuracy,
            UNBOUNDED_ACCURACY,
            accuracy > UNBOUNDED_ACCURACY,
            f"untargeted PGD-{UNBOUNDED_ITER} from the clean image over the whole pixel range "
            f"leaves accuracy {accuracy:.3f} on {len(subset)} images (expected ~0: the "
            "gradients do not lead out of the class)",
        )
    )
    # Both figures from the probe (the attack's own view, before any gradient-free attack,
    # over the same images), so that the two differ only by the iterations.
    longer = dataclasses.replace(cfg, attack_iter=2 * cfg.attack_iter)
    longer_counts = evaluate(longer, subset, lambda inner: MaskingProbe(inner, None)).details
    drop = (robust - float(longer_counts["probe_counts"][3])) / max(len(subset), 1)
    checks.append(
        Check(
            "more iterations",
            drop,
            MORE_ITERATIONS_DROP,
            drop > MORE_ITERATIONS_DROP,
            f"{2 * cfg.attack_iter} iterations lower robust accuracy by {drop:.3f} on "
            f"{len(subset)} images (the attack had not converged: raise --attack-iter)",
        )
    )
    return checks


def _gradient_free(cfg: Config) -> Attacker:
    """Square at the check's budget, on the evaluation's threat model."""
    from iat.builders import build_attacker

    checked = dataclasses.replace(cfg, attack=GRADIENT_FREE, queries=GRADIENT_FREE_QUERIES)
    return build_attacker(checked, attack_iter=1, num_classes=cfg.num_classes, name=GRADIENT_FREE)


def _flat_loss(correct: float, flat: float, zero_grad: float) -> Check:
    share = max(flat, zero_grad) / max(correct, 1)
    return Check(
        "flat loss",
        share,
        FLAT_SHARE,
        share > FLAT_SHARE,
        f"on {flat:.0f} of {correct:.0f} correctly classified images the attack did not raise "
        f"the cross-entropy, and {zero_grad:.0f} have a zero input gradient (a layer without "
        "a usable gradient: attack it through BPDA)",
    )


def _gradient_free_success(robust: float, broken: float, ran: bool, attack: str) -> Check:
    if not ran:
        why = (
            "AutoAttack's Square is one of its members"
            if attack == "autoattack"
            else ("no gradient-free attack is registered")
        )
        return Check("gradient-free", 0.0, 0.0, False, f"not run: {why}")
    return Check(
        "gradient-free",
        broken,
        0.0,
        broken > 0,
        f"Square ({GRADIENT_FREE_QUERIES} queries) broke {broken:.0f} of the {robust:.0f} "
        "images every gradient member left correct (the gradients mislead the attack)",
    )
