"""Checks that an evaluation's attack failed rather than the model resisted (gradient masking).

Carlini et al. 2019 ("On Evaluating Adversarial Robustness", Sec 5) and Pintor et al. (NeurIPS
2022, "Indicators of Attack Failure") list the signs; these four run with every ``strong`` or
``autoattack`` evaluation, on the first ``--masking-checks`` images the evaluation attacks (a
subsample: the first images of each process), after its result is printed. The evaluation's
attack is never run again: the probe watches it, and the checks' own attacks run only on the
probed images it left correct:

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
from collections.abc import Callable
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
)
from iat.attacks.core import as_float, attacking
from iat.config import Config, eval_attack

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
    """`inner`'s attack, unchanged (its images, targets and statistics), watched on the first
    `limit` images it attacks (all when None): the flat-loss figures of those, which stay
    correct, and the images themselves, for the checks that follow (`run_checks`).

    Statistics (summed over batches and ranks, ``totals`` after the evaluation): ``[correct on
    clean, no loss increase, zero input gradient, correct after inner, probed]``."""

    def __init__(self, inner: Attacker | None, limit: int | None = None) -> None:
        self.inner, self.limit = inner, limit
        self.seen = 0
        self._stats = torch.zeros(5, dtype=torch.float64)
        self.totals: list[float] = [0.0] * 5
        self.kept: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # images, labels, masks

    def attack(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        adv, targets = self.inner.attack(model, images, labels, generator=generator)
        room = len(images) if self.limit is None else max(0, self.limit - self.seen)
        n = min(len(images), room)
        self.seen += len(images)
        self._stats = torch.zeros(5, dtype=torch.float64, device=images.device)
        if n > 0:
            self._probe(model, images[:n], labels[:n].long(), adv[:n])
        return adv, targets

    def _probe(self, model: nn.Module, images: Tensor, labels: Tensor, adv: Tensor) -> None:
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
        counts = [correct, flat, zero_grad, robust, torch.ones_like(correct)]
        self._stats = torch.stack([c.sum() for c in counts]).double()
        self.kept.append((images.detach().cpu(), labels.cpu(), correct.cpu(), robust.cpu()))

    def kept_images(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """This process's probed images, their labels, and which were correct / robust."""
        if not self.kept:
            empty = torch.zeros(0, dtype=torch.bool)
            return torch.zeros(0), torch.zeros(0, dtype=torch.long), empty, empty
        return tuple(torch.cat(parts) for parts in zip(*self.kept, strict=True))

    def watch(self, inner: Attacker) -> MaskingProbe:
        """Watch `inner` (the evaluation's attacker, built after the probe)."""
        self.inner = inner
        return self

    def stats_template(self, device: torch.device) -> dict[str, Tensor]:
        probe = torch.zeros(5, dtype=torch.float64, device=device)
        return {**self.inner.stats_template(device), "probe": probe}

    def batch_stats(self) -> dict[str, Tensor]:
        return {**self.inner.batch_stats(), "probe": self._stats}

    def describe_stats(self, stats: dict[str, Tensor], images: int) -> dict[str, object]:
        self.totals = [float(v) for v in stats["probe"].tolist()]
        inner = {k: v for k, v in stats.items() if k != "probe"}
        return self.inner.describe_stats(inner, images)


# Runs an attacker on images and labels (this process's; none is fine) and returns which stay
# correctly classified.
Attack = Callable[[Attacker, Tensor, Tensor], Tensor]


def run_checks(
    cfg: Config, probe: MaskingProbe, attack: Attack, total: Callable[[float], float] = float
) -> list[Check]:
    """The four checks of `cfg`'s attack from its evaluation's `probe` (flat loss) and three
    cheap attacks on the probed images only (`attack`; `total` sums a count over processes).

    Nothing the evaluation ran is run again: the gradient-free attack and twice the iterations
    attack only the probed images the evaluation left correct, the unbounded attack only those
    correct on clean."""
    images, labels, correct, robust = probe.kept_images()
    n_correct, flat, zero_grad, n_robust, probed = probe.totals

    def still_correct(attacker: Attacker, keep: Tensor) -> float:
        return total(float(attack(attacker, images[keep], labels[keep]).sum()))

    checks = [_flat_loss(n_correct, flat, zero_grad)]
    # An attack with a score-based member (AutoAttack's Square) has run one: a second run would
    # only measure its randomness.
    free = None if attack_info(eval_attack(cfg)).queries else _gradient_free(cfg)
    broken_free = 0.0 if free is None else n_robust - still_correct(free, robust)
    checks.append(_gradient_free_success(n_robust, broken_free, free is not None, eval_attack(cfg)))
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
    accuracy = still_correct(create_attacker("pgd", unbounded), correct) / max(probed, 1)
    checks.append(
        Check(
            "unbounded epsilon",
            accuracy,
            UNBOUNDED_ACCURACY,
            accuracy > UNBOUNDED_ACCURACY,
            f"untargeted PGD-{UNBOUNDED_ITER} from the clean image over the whole pixel range "
            f"leaves accuracy {accuracy:.3f} on {probed:.0f} images (expected ~0: the "
            "gradients do not lead out of the class)",
        )
    )
    # Twice the iterations, on the images the evaluation's attack left correct: the drop in
    # robust accuracy is what they break.
    from iat.builders import build_attacker

    longer_cfg = dataclasses.replace(cfg, attack_iter=2 * cfg.attack_iter)
    longer = build_attacker(
        longer_cfg, attack_iter=longer_cfg.attack_iter, num_classes=cfg.num_classes,
        name=eval_attack(cfg),
    )  # fmt: skip
    drop = (n_robust - still_correct(longer, robust)) / max(probed, 1)
    checks.append(
        Check(
            "more iterations",
            drop,
            MORE_ITERATIONS_DROP,
            drop > MORE_ITERATIONS_DROP,
            f"{2 * cfg.attack_iter} iterations lower robust accuracy by {drop:.3f} on "
            f"{probed:.0f} images (the attack had not converged: raise --attack-iter)",
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
