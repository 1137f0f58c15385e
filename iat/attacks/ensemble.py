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
    attacking,
    no_targets,
)
from iat.attacks.ops import worst_case
from iat.attacks.pgd import pgd_from_settings
from iat.attacks.registry import AttackInfo, ball_words, iteration_words, register, step_words


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
        opening = self._opening(model, images, labels, generator)
        with opening as (clean, labels, generator), torch.no_grad():
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
