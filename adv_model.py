"""White-box attackers used for adversarial training and robustness evaluation.

The original's module: its names (``Attacker``, ``NoOpAttacker``, ``PGDAttacker``, ...) are
re-exported from the ``iat.attacks`` package, which owns the attack zoo and its registry
(``ATTACKS``: name -> ``AttackInfo``), and the loss adversarial training minimises
(``training_objective``) from ``iat.train.objective``.
"""

from __future__ import annotations

from iat.attacks import ATTACKS, AttackInfo, attack_info, create_attacker
from iat.attacks.core import (
    ATTACK_LOSSES,
    DEFAULT_QUERIES,
    FP16_LOSS_SCALE,
    NO_TARGET,
    NORMS,
    PIXEL_MAX,
    PIXEL_MIN,
    TARGET_MODES,
    Attacker,
    AttackSettings,
    NoOpAttacker,
    Objective,
    attack_mode,
    attack_success,
    autocast_dtype,
    choose_targets,
    has_native_low_precision,
    no_targets,
    pgd_step_size,
    random_wrong_labels,
)
from iat.attacks.pgd import PGDAttacker
from iat.attacks.registry import default_attack, register
from iat.attacks.training import FGSM_RS_STEP, FreeAttacker
from iat.train.objective import (
    TrainingTerms,
    logit_pairing_loss,
    mixed_batch,
    paired_terms,
    training_objective,
    training_terms,
)

__all__ = [
    "ATTACKS",
    "ATTACK_LOSSES",
    "DEFAULT_QUERIES",
    "FGSM_RS_STEP",
    "FP16_LOSS_SCALE",
    "NORMS",
    "NO_TARGET",
    "PIXEL_MAX",
    "PIXEL_MIN",
    "TARGET_MODES",
    "AttackInfo",
    "AttackSettings",
    "Attacker",
    "FreeAttacker",
    "NoOpAttacker",
    "Objective",
    "PGDAttacker",
    "TrainingTerms",
    "attack_info",
    "attack_mode",
    "attack_success",
    "autocast_dtype",
    "choose_targets",
    "create_attacker",
    "default_attack",
    "has_native_low_precision",
    "logit_pairing_loss",
    "mixed_batch",
    "no_targets",
    "paired_terms",
    "pgd_step_size",
    "random_wrong_labels",
    "register",
    "training_objective",
    "training_terms",
]
