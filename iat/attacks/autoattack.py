"""AutoAttack (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"), as its authors define its two versions.

* ``standard`` (Sec 5): APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5,000 queries),
  in this order, each on the examples every earlier member left correctly classified; each
  example keeps its worst case (``EnsembleAttacker``), and each member's share is reported.
* ``rand``, for randomised defenses (the authors' code, ``version='rand'``): APGD-CE and
  APGD-DLR, their gradients averaged over 20 draws of the defense (EOT).

``--attack autoattack`` runs ``rand`` when the model is behind a random defense (its attack
averages draws: ``eot_samples`` > 1), else ``standard``; the summary line and the record name
the version. It sets the authors' settings (``STANDARD_SETTINGS``: 100 iterations, 9 targets,
5,000 queries) unless ``--attack-iter``, ``--apgd-targets`` or ``--queries`` are given on the
command line; any change from them makes the version ``custom``, as the authors' code names a
run with its own settings. The standard version scores the clean images twice per batch: passes
that differ (the authors' ``check_randomized``) mean the model is random and needs ``rand``.
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
# The authors' settings (autoattack.py: n_iter=100, n_target_classes=9, Square n_queries=5000),
# as AttackSettings fields; ``--attack autoattack`` sets them unless given.
STANDARD_SETTINGS = {"num_iter": 100, "top_k": 9, "queries": 5000}
RAND_SETTINGS = ("num_iter",)  # the ones the rand version uses


def version(eot_samples: int) -> str:
    """``rand`` when the attack averages draws of a random defense, else ``standard``."""
    return "rand" if eot_samples > 1 else "standard"


def is_custom(settings: AttackSettings) -> bool:
    """Whether ``settings`` change a setting the version uses from the authors'."""
    used = RAND_SETTINGS if version(settings.eot_samples) == "rand" else STANDARD_SETTINGS
    # None: a setting left open (a report's series along it), not a change.
    values = {name: getattr(settings, name) for name in used}
    return any(value not in (None, STANDARD_SETTINGS[name]) for name, value in values.items())


def version_of(settings: AttackSettings) -> str:
    """The version ``settings`` run, as the summary line and the record name it: ``custom``
    when they change the authors' settings, else ``rand`` or ``standard``."""
    return "custom" if is_custom(settings) else version(settings.eot_samples)


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
    queries), L-inf eps=4"; the rand version with its EOT draws; "AutoAttack custom (...; the
    standard version's settings changed)"."""
    k, targets = iteration_words(settings), settings.top_k
    base = version(settings.eot_samples)
    if base == "rand":
        parts = f"APGD-CE{k}, APGD-DLR{k}; EOT over {draws(settings)} draws"
    else:
        parts = (
            f"APGD-CE{k}, APGD-T{k} top-{targets}, FAB-T{k} top-{targets}, "
            f"Square {settings.queries} queries"
        )
    if is_custom(settings):
        parts += f"; the {base} version's settings changed"
    return f"{info.title} {version_of(settings)} ({parts}), {ball_words(settings)}"


def record(settings: AttackSettings) -> dict:
    base = version(settings.eot_samples)
    fields = {"version": version_of(settings), "members": list(members(base))}
    fields["draws"] = draws(settings)
    return {**fields, "based_on": base} if is_custom(settings) else fields


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
    defaults=STANDARD_SETTINGS,
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
    standard = [(name, factory(single)) for name, factory in STANDARD.items()]
    return EnsembleAttacker(standard, check_random=True)
