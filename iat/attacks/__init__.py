"""The attack zoo: one interface (``Attacker``), one settings type (``AttackSettings``), one
registry (``ATTACKS``).

An attack is one module here that registers its factory and says what it is
(``iat.attacks.registry.register``): adding one is a new module, its line below and its tests.
The modules, in the order ``--attack`` lists them:

* ``clean``: no attack;
* ``pgd``: the original's PGD (training and evaluation), with L2, the CW loss and restarts;
* ``fgm``: the fast gradient method under L-inf, L2, L1, and its minimal-perturbation mode;
* ``apgd``: APGD-CE, APGD-DLR and APGD-T (Croce & Hein 2020);
* ``fab``: FAB-T (Croce & Hein, ICML 2020);
* ``square``: the Square Attack (Andriushchenko et al., ECCV 2020), score-based;
* ``ensemble``: ``strong``, the worst case over APGD-CE, APGD-T and targeted PGD;
* ``autoattack``: AutoAttack's standard and rand versions (``custom`` when its settings change);
* ``training``: free adversarial training and FGSM-RS (``--adv-method`` only).

``adv_model`` re-exports the original's names from here.
"""

# isort: off
# Each module registers its attacks on import, in this order: the order --attack lists them.
from iat.attacks import clean, pgd, fgm, apgd, fab, square, ensemble, autoattack  # noqa: F401
from iat.attacks import training  # noqa: F401

# isort: on
from iat.attacks.core import (
    ATTACK_LOSSES,
    DEFAULT_QUERIES,
    NORMS,
    PIXEL_MAX,
    PIXEL_MIN,
    TARGET_MODES,
    Attacker,
    AttackSettings,
    NoOpAttacker,
    attack_mode,
    attack_success,
    no_targets,
)
from iat.attacks.registry import ATTACKS, AttackInfo, attack_info, create_attacker

__all__ = [
    "ATTACKS",
    "ATTACK_LOSSES",
    "DEFAULT_QUERIES",
    "NORMS",
    "PIXEL_MAX",
    "PIXEL_MIN",
    "TARGET_MODES",
    "AttackInfo",
    "AttackSettings",
    "Attacker",
    "NoOpAttacker",
    "attack_info",
    "attack_mode",
    "attack_success",
    "create_attacker",
    "no_targets",
]
