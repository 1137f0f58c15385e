"""AutoAttack (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"), as its authors define its two versions.

* ``standard`` (Sec 5): APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5,000 queries),
  in this order, each on the examples every earlier member left correctly classified; each
  example keeps its worst case (``EnsembleAttacker``), and each member's share is reported.
* ``rand``, for randomised defenses (the authors' code, ``version='rand'``): APGD-CE and
  APGD-DLR, their gradients averaged over 20 draws of the defense (EOT).

``--attack autoattack`` runs ``rand`` when the model is behind a random defense (its attack
averages draws: ``eot_samples`` > 1), else ``standard``; the summary line and the record name
the version. ``--attack-iter`` is APGD's and FAB's iterations (the authors: 100), ``--queries``
Square's, ``--apgd-targets`` the target classes of APGD-T and FAB-T.
"""

from __future__ import annotations

import dataclasses

from iat.attacks.apgd import apgd_ce, apgd_from_settings, apgd_t
from iat.attacks.core import AttackSettings
from iat.attacks.ensemble import EnsembleAttacker, member_figures
from iat.attacks.fab import fab_from_settings
from iat.attacks.registry import AttackInfo, ball_words, iteration_words, register
from iat.attacks.square import square_from_settings

STANDARD = {  # registry name -> factory, in the authors' order
    "apgd-ce": apgd_ce,
    "apgd-t": apgd_t,
    "fab-t": fab_from_settings,
    "square": square_from_settings,
}
STANDARD_MEMBERS = tuple(STANDARD)
RAND_MEMBERS = ("apgd-ce", "apgd-dlr")
RAND_EOT_SAMPLES = 20  # the authors' version='rand': eot_iter = 20


def version(eot_samples: int) -> str:
    """``rand`` when the attack averages draws of a random defense, else ``standard``."""
    return "rand" if eot_samples > 1 else "standard"


def rand_eot_samples(eot_samples: int) -> int:
    """The draws the rand version averages: the authors' 20, or more if asked."""
    return max(eot_samples, RAND_EOT_SAMPLES)


def members(version_name: str) -> tuple[str, ...]:
    return RAND_MEMBERS if version_name == "rand" else STANDARD_MEMBERS


def draws(settings: AttackSettings) -> int:
    """The draws of a random defense the version for ``settings`` averages per gradient."""
    rand = version(settings.eot_samples) == "rand"
    return rand_eot_samples(settings.eot_samples) if rand else settings.eot_samples


def words(info: AttackInfo, settings: AttackSettings) -> str:
    """ "AutoAttack standard (APGD-CE-100, APGD-T-100 top-9, FAB-T-100 top-9, Square 5000
    queries), L-inf eps=4"; the rand version with its EOT draws."""
    k, targets = iteration_words(settings), settings.top_k
    if version(settings.eot_samples) == "rand":
        parts = f"rand (APGD-CE{k}, APGD-DLR{k}; EOT over {draws(settings)} draws)"
    else:
        parts = (
            f"standard (APGD-CE{k}, APGD-T{k} top-{targets}, FAB-T{k} top-{targets}, "
            f"Square {settings.queries} queries)"
        )
    return f"{info.title} {parts}, {ball_words(settings)}"


def record(settings: AttackSettings) -> dict:
    name = version(settings.eot_samples)
    return {"version": name, "members": list(members(name)), "draws": draws(settings)}


@register(
    "autoattack",
    "AutoAttack",
    norms=("inf", "2"),
    queries=True,
    top_k=True,
    checked=True,
    words=words,
    extra_record=record,
    figures=member_figures,
    draws=draws,
)
def autoattack_from_settings(settings: AttackSettings) -> EnsembleAttacker:
    """AutoAttack's version for ``settings.eot_samples``, at its norm, ε, iterations, targets
    and queries; one run of each member (the authors' restarts: 1)."""
    single = dataclasses.replace(settings, restarts=1)
    if version(settings.eot_samples) == "rand":
        drawn = dataclasses.replace(single, eot_samples=rand_eot_samples(settings.eot_samples))
        attackers = [
            apgd_from_settings(drawn, targeted=False, loss="ce"),
            apgd_from_settings(drawn, targeted=False, loss="dlr"),
        ]
        return EnsembleAttacker(list(zip(RAND_MEMBERS, attackers, strict=True)))
    return EnsembleAttacker([(name, factory(single)) for name, factory in STANDARD.items()])
