"""No attack: the clean evaluation (and clean training), registered as ``clean``."""

from __future__ import annotations

from iat.attacks.core import NORMS, AttackSettings, NoOpAttacker
from iat.attacks.registry import AttackInfo, TrainingForm, register


def clean_words(info: AttackInfo, settings: AttackSettings) -> str:
    return info.title


def clean_spec(text: str) -> AttackSettings | None:
    return AttackSettings(0, 0.0, 0.0, target=None) if text == "clean" else None


# Clean training under Mixup / CutMix: no step, every image clean.
CLEAN_TRAINING = TrainingForm(("clean",), clean_spec, soft_target=lambda _s, _p: (0, 0.0, 0.0, 1.0))


@register(
    "clean",
    "clean",
    norms=NORMS,
    iterations=False,
    gradient=False,
    perturbs=False,
    words=clean_words,
    training=CLEAN_TRAINING,
)
def no_attack(settings: AttackSettings) -> NoOpAttacker:
    return NoOpAttacker()
