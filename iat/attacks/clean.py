"""No attack: the clean evaluation (and clean training), registered as ``clean``."""

from __future__ import annotations

from iat.attacks.core import NORMS, AttackSettings, NoOpAttacker
from iat.attacks.registry import AttackInfo, register


def clean_words(info: AttackInfo, settings: AttackSettings) -> str:
    return info.title


@register(
    "clean",
    "clean",
    norms=NORMS,
    iterations=False,
    gradient=False,
    perturbs=False,
    words=clean_words,
)
def no_attack(settings: AttackSettings) -> NoOpAttacker:
    return NoOpAttacker()
