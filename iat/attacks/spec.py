"""Training-attack specs: the one parser of ``--adv-method`` (Adversarial Logit Pairing's names).

Each training attack registers its spec forms with its entry (``registry.TrainingForm``):
``clean``, ``pgd_EPS_STEP_NITER`` (untargeted), ``pgdll_EPS_STEP_NITER`` (toward the
least-likely class), ``pgdrnd_EPS_STEP_NITER`` (toward a random wrong class), ``apgd_EPS_NITER``
(APGD-CE, its own step size) and ``fgsmrs_EPS`` (FGSM with a random start, Wong et al. 2020),
integers in pixel units. Without ``--adv-method`` the original's
``--attack-iter/--attack-epsilon/--attack-step-size/--attack-target`` describe the attack (random
target by default). Each spec names an ``iat.attacks.ATTACKS`` entry and its ``AttackSettings``
(the attack's one settings type; ``iat.builders`` adds the run's).
"""

from __future__ import annotations

from dataclasses import dataclass

from iat.attacks import AttackSettings
from iat.attacks.registry import default_attack, parse_training_spec, training_forms


@dataclass(frozen=True)
class AttackSpec:
    """One training attack: its registry name and settings (``iat.attacks.create_attacker``)."""

    name: str  # the ATTACKS registry name of an attack registered with a training form
    # Iterations (0 for clean, 1 for fgsmrs), L-inf epsilon and step in pixel units (fgsmrs: its
    # step is the attack's own, 1.25 epsilon), target ("random", "least_likely" or None).
    settings: AttackSettings


def valid_forms() -> str:
    return ", ".join(training_forms())


def parse_attack_spec(text: str) -> AttackSpec:
    """The spec ``text`` names; ValueError (one line listing the valid forms) otherwise."""
    parsed = parse_training_spec(text)
    if parsed is None:
        raise ValueError(
            f"--adv-method: {text!r} is not an attack spec; valid forms: {valid_forms()} "
            "(integers in pixel units, STEP and NITER >= 1)"
        )
    return AttackSpec(*parsed)


def flags_attack_spec(
    attack_iter: int, epsilon: float, step_size: float, target: str | None
) -> AttackSpec:
    """The original's flags as a spec: PGD-`attack_iter` (0: clean)."""
    settings = AttackSettings(attack_iter, epsilon, step_size, target=target)
    return AttackSpec(default_attack(attack_iter), settings)
