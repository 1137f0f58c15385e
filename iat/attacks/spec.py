"""Training-attack specs: the one parser of ``--adv-method`` (Adversarial Logit Pairing's names).

``clean``, ``pgd_EPS_STEP_NITER`` (untargeted), ``pgdll_EPS_STEP_NITER`` (toward the
least-likely class), ``pgdrnd_EPS_STEP_NITER`` (toward a random wrong class), ``fgsmrs_EPS``
(FGSM with a random start, Wong et al. 2020) and ``apgd_EPS_NITER`` (APGD-CE, its own step size:
Singh, Croce & Hein 2023 train with APGD-2), integers in pixel units. Without ``--adv-method``
the original's ``--attack-iter/--attack-epsilon/--attack-step-size/--attack-target`` describe
the attack (random target by default). Each spec names an ``iat.attacks.ATTACKS`` entry and
its ``AttackSettings`` (the attack's one settings type; ``iat.builders`` adds the run's):
``pgd``, ``fgsmrs``, ``apgd-ce`` or ``clean``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from iat.attacks import AttackSettings
from iat.attacks.registry import default_attack

VALID_FORMS = (
    "clean, pgd_EPS_STEP_NITER, pgdll_EPS_STEP_NITER, pgdrnd_EPS_STEP_NITER, fgsmrs_EPS, "
    "apgd_EPS_NITER"
)
# ALP's attack names: the prefix says the target (ALP README, "adv_method" flag).
PGD_TARGETS = {"pgd": None, "pgdll": "least_likely", "pgdrnd": "random"}
_PGD = re.compile(r"^(pgd|pgdll|pgdrnd)_(\d+)_(\d+)_(\d+)$")
_FGSM_RS = re.compile(r"^fgsmrs_(\d+)$")
_APGD = re.compile(r"^apgd_(\d+)_(\d+)$")


@dataclass(frozen=True)
class AttackSpec:
    """One training attack: its registry name and settings (``iat.attacks.create_attacker``)."""

    name: str  # the ATTACKS registry name: "clean", "pgd", "fgsmrs" or "apgd-ce"
    # Iterations (0 for clean, 1 for fgsmrs), L-inf epsilon and step in pixel units (fgsmrs: its
    # step is the attack's own, 1.25 epsilon), target ("random", "least_likely" or None).
    settings: AttackSettings


def parse_attack_spec(text: str) -> AttackSpec:
    """The spec ``text`` names; ValueError (one line listing the valid forms) otherwise."""
    if text == "clean":
        return AttackSpec("clean", AttackSettings(0, 0.0, 0.0, target=None))
    pgd = _PGD.match(text)
    if pgd:
        kind, eps, step, niter = pgd.groups()
        if int(niter) >= 1 and int(step) >= 1:
            settings = AttackSettings(int(niter), float(eps), float(step), target=PGD_TARGETS[kind])
            return AttackSpec("pgd", settings)
    fgsm = _FGSM_RS.match(text)
    if fgsm:
        return AttackSpec("fgsmrs", AttackSettings(1, float(fgsm.group(1)), 0.0, target=None))
    apgd = _APGD.match(text)
    if apgd and int(apgd.group(2)) >= 1:
        eps, niter = apgd.groups()
        return AttackSpec("apgd-ce", AttackSettings(int(niter), float(eps), 0.0, target=None))
    raise ValueError(
        f"--adv-method: {text!r} is not an attack spec; valid forms: {VALID_FORMS} "
        "(integers in pixel units, STEP and NITER >= 1)"
    )


def flags_attack_spec(
    attack_iter: int, epsilon: float, step_size: float, target: str | None
) -> AttackSpec:
    """The original's flags as a spec: PGD-`attack_iter` (0: clean)."""
    settings = AttackSettings(attack_iter, epsilon, step_size, target=target)
    return AttackSpec(default_attack(attack_iter), settings)
