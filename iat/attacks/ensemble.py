"""The per-example worst case over several attacks (``EnsembleAttacker``), and ``strong``: APGD-CE,
APGD-T and the original's PGD toward a random wrong class, each run only on the examples the
previous ones left unbroken.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from iat.attacks.apgd import apgd_from_settings
from iat.attacks.core import (
    Attacker,
    AttackSettings,
    no_targets,
    scored_logits,
)
from iat.attacks.ops import per_example
from iat.attacks.pgd import pgd_from_settings
from iat.attacks.registry import AttackInfo, ball_words, iteration_words, register, step_words


class EnsembleAttacker(Attacker):
    """The per-example worst case over ``members`` (name, attacker), AutoAttack-style: the
    examples the model misclassifies keep the clean image, then each member attacks only the
    examples the previous ones left classified correctly. Success is misclassification
    (``target_labels`` are -1), also for targeted members.

    Success is what the score says: after each member, the whole batch with its images is
    scored as evaluation scores it (``scored_logits``); an image that does not hold there (a
    member's point on the decision boundary) is not kept and its example stays in play for the
    next member, as the authors' code recomputes its robust flags after each attack. An example
    no member breaks keeps the first member's image. The returned images are scored once more,
    and the counts are those of that scoring: they equal the evaluation's.

    With ``check_random`` the clean images are scored twice per batch: passes that differ mean
    a random model (the authors' ``check_randomized``), counted in ``randomized``.

    Statistics per batch: ``broken`` = [misclassified clean, then the examples each member
    broke], ``attacked`` = the examples each member attacked, ``randomized`` = batches whose
    two clean passes differed. The first member's share is its own success rate; each later
    one's is what it adds to the ensemble. ``image_results`` names, per example of the last
    batch, the member whose image broke it ("clean" when misclassified clean; None: unbroken).
    """

    def __init__(self, members: Sequence[tuple[str, Attacker]], check_random: bool = False) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)
        self.check_random = check_random
        self._broken = torch.zeros(len(self.members) + 1, dtype=torch.float64)
        self._attacked = torch.zeros(len(self.members), dtype=torch.float64)
        self._randomized = torch.zeros((), dtype=torch.float64)
        self._owner = torch.zeros(0, dtype=torch.int64)

    def attack(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        clean, labels, generator = self._inputs(images, labels, generator)
        logits = scored_logits(model, clean)
        if self.check_random:
            differ = not torch.equal(logits, scored_logits(model, clean))
            self._randomized = torch.tensor(float(differ), dtype=torch.float64, device=clean.device)
        # owner: 0 misclassified clean, k broken by member k (1-based), -1 not broken (yet).
        owner = torch.where(logits.argmax(dim=1) != labels, 0, -1)
        adv, attacked = clean.clone(), []
        for k, (_, attacker) in enumerate(self.members, start=1):
            todo = (owner < 0).nonzero().squeeze(1)
            attacked.append(todo.numel())
            if todo.numel() == 0:
                continue
            found, _ = attacker.attack(model, clean[todo], labels[todo], generator=generator)
            candidate = adv.clone()
            candidate[todo] = found.detach().to(adv.dtype)
            newly = (scored_logits(model, candidate).argmax(dim=1) != labels) & (owner < 0)
            keep = (owner < 0) if k == 1 else newly  # unbroken ones keep the first member's
            adv = torch.where(per_example(keep, adv), candidate, adv)
            owner = torch.where(newly, k, owner)
        # The images returned, scored as the evaluation will: the counts are this scoring's.
        wrong = scored_logits(model, adv).argmax(dim=1) != labels
        holder = torch.where(owner < 0, 1, owner)  # whose image each example holds
        self._owner = torch.where(wrong, holder, -1)
        counts = torch.stack([(self._owner == k).sum() for k in range(len(self.members) + 1)])
        self._broken = counts.double()
        self._attacked = torch.tensor(attacked, dtype=torch.float64, device=counts.device)
        return adv, no_targets(labels)

    def image_results(self) -> dict[str, list]:
        names = ["clean", *(name for name, _ in self.members)]
        return {"broken_by": [names[k] if k >= 0 else None for k in self._owner.tolist()]}

    def stats_template(self, device: torch.device) -> dict[str, Tensor]:
        members = len(self.members)
        zeros = partial(torch.zeros, dtype=torch.float64, device=device)
        stats = {"broken": zeros(members + 1), "attacked": zeros(members)}
        return {**stats, "randomized": zeros(())} if self.check_random else stats

    def batch_stats(self) -> dict[str, Tensor]:
        stats = {"broken": self._broken, "attacked": self._attacked}
        return {**stats, "randomized": self._randomized} if self.check_random else stats

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
        described = {
            "clean_wrong": broken[0],
            "members": members,
            "ensemble_success_rate": sum(broken) / max(images, 1),
        }
        if "randomized" in stats:
            described["randomized_batches"] = int(round(stats["randomized"].item()))
        return described


STRONG_MEMBERS = ("apgd-ce", "apgd-t", "pgd-target")


def strong_words(info: AttackInfo, settings: AttackSettings) -> str:
    """ "strong (worst case of APGD-CE-10, APGD-T-10 top-9, PGD-10 random target, step 1.6),
    L-inf eps=16"."""
    k, step = iteration_words(settings), step_words(settings)
    restarts = f", {settings.restarts} restarts" if settings.restarts > 1 else ""
    members = f"APGD-CE{k}, APGD-T{k} top-{settings.top_k}, PGD{k} random target{step}{restarts}"
    return f"{info.name} (worst case of {members}), {ball_words(settings)}"


def member_figures(details: dict) -> str:
    """What each member broke, in order, and the ensemble's success."""
    members = [
        f"{name} broke {m['broken']} of {m['attacked']} attacked ({m['success_rate']:.4f})"
        for name, m in details["members"].items()
    ]
    return (
        f"; clean wrong {details['clean_wrong']}, then {', then '.join(members)}; "
        f"ensemble success {details['ensemble_success_rate']:.4f}"
    )


@register(
    "strong",
    "strong",
    step=True,
    restarts=True,
    top_k=True,
    checked=True,
    words=strong_words,
    figures=member_figures,
)
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
