"""The attack registry: what each attack is, said once, beside its code.

Each attack module registers its factory with ``register`` and the traits the rest of the
project asks about: the norms it supports, the settings it takes (iterations, step, loss,
restarts, queries, target classes), what it aims at, whether it reads gradients, how a summary
line names it and its own figures, and which fields its record adds. ``iat.config``
(validation, ``--attack`` choices), ``iat.eval.summary`` (summary line), ``iat.eval.evaluate``
(JSON record) and ``iat.eval.masking`` ask here; ``create_attacker`` builds one from
``AttackSettings``. What still names attacks: the training side's rules in ``iat.config``
(which training attacks take Mixup or warm-ups: ``clean``, ``pgd``, ``fgsmrs``; ``--benchmark``
runs ``autoattack``), ``iat.train.builders`` (``free``) and ``iat.eval.masking``'s protocol (it
runs ``pgd`` and ``square``); the evaluator names none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from iat.attacks.core import Attacker, AttackSettings, pgd_step_size

AttackFactory = Callable[[AttackSettings], Attacker]
TARGET_KINDS = ("flag", "top-k", "none")
NORM_NAMES = {"inf": "L-inf", "2": "L2", "1": "L1"}
TARGET_WORDS = {"random": "random target", "least_likely": "least-likely target"}


@dataclass(frozen=True)
class TrainingForm:
    """What an attack is as a training attack (``--adv-method``): its spec forms, and what the
    training recipes may do with it."""

    forms: tuple[str, ...]  # its spec forms in words ("fgsmrs_EPS"), for help and errors
    parse: Callable[[str], AttackSettings | None]  # the settings a spec names; None: not its form
    # Its stand-in on Mixup / CutMix's soft targets, a sign-gradient ascent of the soft target's
    # loss: (iterations, epsilon, step, chance of a clean start) from its settings and
    # --prob-start-from-clean; None: it has none.
    soft_target: Callable[[AttackSettings, float], tuple[int, float, float, float]] | None = None
    warmups: tuple[str, ...] = ()  # the warm-ups that scale it: "epsilon", "step"


@dataclass(frozen=True)
class AttackInfo:
    """One registered attack: its factory and what it is."""

    name: str  # the registry name (--attack NAME)
    factory: AttackFactory  # settings -> attacker
    title: str  # how a summary line names it ("APGD-CE")
    norms: tuple[str, ...] = ("inf",)  # threat-model norms it supports
    iterations: bool = True  # takes --attack-iter (>= 1)
    step: bool = False  # takes --attack-step-size (a fixed step; raised by pgd_step_size)
    loss: bool = False  # takes --attack-loss ("ce" or "cw")
    restarts: bool = False  # takes --restarts
    queries: bool = False  # takes --queries (a score-based member's budget)
    top_k: bool = False  # takes --apgd-targets (the K likeliest wrong classes)
    # What success means: "flag": --attack-target's target (or any wrong class for "none");
    # "top-k": a wrong class, aimed at through each of the top-K classes; "none": any wrong class.
    targets: str = "none"
    gradient: bool = True  # reads input gradients (BPDA / EOT apply to a defense)
    perturbs: bool = True  # False for the clean evaluation alone
    evaluation: bool = True  # offered by --attack (False: a training-only attack)
    checked: bool = False  # --eval runs iat.eval.masking's attack-failure checks with it
    # The summary line's words for the attack and its ball (``describe`` below by default).
    words: Callable[[AttackInfo, AttackSettings], str] | None = None
    extra_record: Callable[[AttackSettings], dict] | None = None  # fields only it records
    # The summary line's words for its own figures (``Attacker.describe_stats``), after commas.
    figures: Callable[[dict], str] | None = None
    # The draws of a random defense it averages per gradient (None: settings.eot_samples).
    draws: Callable[[AttackSettings], int] | None = None
    training: TrainingForm | None = None  # as --adv-method names it; None: not a training attack


ATTACKS: dict[str, AttackInfo] = {}


def register(name: str, title: str, **traits: object) -> Callable[[AttackFactory], AttackFactory]:
    """Decorator adding an attack factory to ``ATTACKS`` under ``name`` with its ``traits``
    (``AttackInfo``'s fields)."""

    def add(factory: AttackFactory) -> AttackFactory:
        if name in ATTACKS:
            raise ValueError(f"attack {name!r} is registered twice")
        info = AttackInfo(name=name, factory=factory, title=title, **traits)
        if info.targets not in TARGET_KINDS:
            raise ValueError(f"attack {name!r}: targets {info.targets!r} not in {TARGET_KINDS}")
        ATTACKS[name] = info
        return factory

    return add


def attack_info(name: str) -> AttackInfo:
    """The registered attack ``name``; ValueError naming the registered ones otherwise."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; registered: {sorted(ATTACKS)}")
    return ATTACKS[name]


def create_attacker(name: str, settings: AttackSettings) -> Attacker:
    """The attacker registered as ``name``, built from ``settings``."""
    info = attack_info(name)
    if settings.norm not in info.norms:
        raise ValueError(f"attack {name!r} supports norms {info.norms}, not {settings.norm!r}")
    return info.factory(settings)


def default_attack(num_iter: int) -> str:
    """The attack of the original's flags: PGD-``num_iter``, no attack (clean) for 0."""
    return "pgd" if num_iter else "clean"


def evaluation_attacks() -> tuple[str, ...]:
    """The names ``--attack`` offers: every registered attack but the training-only ones."""
    return tuple(name for name, info in ATTACKS.items() if info.evaluation)


def training_forms() -> tuple[str, ...]:
    """Every --adv-method spec form, in registration order."""
    return tuple(form for info in ATTACKS.values() if info.training for form in info.training.forms)


def parse_training_spec(text: str) -> tuple[str, AttackSettings] | None:
    """The training attack a spec names, with its settings; None when no attack's form fits."""
    for info in ATTACKS.values():
        settings = None if info.training is None else info.training.parse(text)
        if settings is not None:
            return info.name, settings
    return None


def takes(trait: str) -> tuple[str, ...]:
    """The evaluation attacks with ``trait`` (an ``AttackInfo`` flag), for error messages."""
    return tuple(n for n in evaluation_attacks() if getattr(ATTACKS[n], trait))


# --- what summaries and records say --------------------------------------------------------
def target_name(info: AttackInfo, settings: AttackSettings) -> str:
    """What the attack aims at, as records name it: the target mode ("random",
    "least_likely", "none"), "top-K", or "none" (any wrong class)."""
    if info.targets == "flag":
        return settings.target or "none"
    return f"top-{settings.top_k}" if info.targets == "top-k" else "none"


def goal_words(info: AttackInfo, settings: AttackSettings) -> str:
    target = target_name(info, settings)
    if target.startswith("top-"):
        return f"{target} targets"
    return TARGET_WORDS.get(target, "untargeted")


# Words for settings whose epsilon or iterations are open (None: a series along that setting,
# ``settings_of_record``) leave them out, and the step that follows from them.
def ball_words(settings: AttackSettings) -> str:
    radius = "" if settings.epsilon is None else f" eps={settings.epsilon:g}"
    return NORM_NAMES[settings.norm] + radius


def iteration_words(settings: AttackSettings) -> str:
    """ "-10" after an attack's name; empty where the iterations are open."""
    return "" if settings.num_iter is None else f"-{settings.num_iter}"


def step_words(settings: AttackSettings) -> str:
    """ ", step 1.6": the step PGD takes; empty where epsilon or the iterations are open."""
    if settings.epsilon is None or settings.num_iter is None:
        return ""
    return f", step {pgd_step_size(settings.epsilon, settings.num_iter, settings.step_size):g}"


def option_words(info: AttackInfo, settings: AttackSettings) -> str:
    """The settings that change the number besides iterations and ball, after commas."""
    words = ""
    if info.step:
        words += step_words(settings)
    if info.loss and settings.loss == "cw":
        words += ", CW loss"
    if info.restarts and settings.restarts > 1:
        words += f", {settings.restarts} restarts"
    return words


def describe(info: AttackInfo, settings: AttackSettings) -> str:
    """The default words: "PGD-10 random target, L-inf eps=16, step 1.6", "Square 5000 queries
    untargeted, L2 eps=600"."""
    head = info.title + (iteration_words(settings) if info.iterations else "")
    head += f" {settings.queries} queries" if info.queries else ""
    return f"{head} {goal_words(info, settings)}, {ball_words(settings)}" + option_words(
        info, settings
    )


def attack_words(name: str, settings: AttackSettings) -> str:
    """How the summary line names attack ``name`` under ``settings`` (defense words aside)."""
    info = attack_info(name)
    return (info.words or describe)(info, settings)


def figure_words(name: str, details: dict) -> str:
    """The summary line's words for attack ``name``'s own figures (``details``), after commas;
    empty for an attack without figures."""
    info = attack_info(name)
    return info.figures(details) if info.figures is not None and details else ""


def draws(name: str, settings: AttackSettings) -> int:
    """The draws of a random defense attack ``name`` averages per gradient."""
    info = attack_info(name)
    return info.draws(settings) if info.draws else settings.eot_samples


def record(name: str, settings: AttackSettings) -> dict:
    """The settings attack ``name`` uses, as the JSON result names them: every setting it takes,
    the step it actually takes beside the one asked for, and its own fields."""
    info = attack_info(name)
    fields: dict = {
        "epsilon": settings.epsilon,
        "norm": settings.norm,
        "target": target_name(info, settings),
    }
    if info.iterations:
        fields["iter"] = settings.num_iter
    if info.step:
        fields["step_size"] = pgd_step_size(settings.epsilon, settings.num_iter, settings.step_size)
        fields["step_size_requested"] = settings.step_size
    settings_taken = {"loss": "loss", "restarts": "restarts", "top_k": "apgd_targets"}
    for trait, key in settings_taken.items():
        if getattr(info, trait):
            fields[key] = getattr(settings, trait)
    if info.queries:
        fields["queries"] = settings.queries
    return {**fields, **(info.extra_record(settings) if info.extra_record else {})}


RECORD_SETTINGS = {  # a record's key -> the AttackSettings field it holds
    "epsilon": "epsilon",
    "norm": "norm",
    "iter": "num_iter",
    "step_size_requested": "step_size",
    "loss": "loss",
    "restarts": "restarts",
    "apgd_targets": "top_k",
    "queries": "queries",
    "eps_step": "eps_step",
    "draws": "eot_samples",  # autoattack's: the draws its version averages
}


def settings_of_record(attack: dict, open_key: str | None = None) -> AttackSettings:
    """The settings a record's ``attack`` (``record``'s fields and its name) was evaluated
    with, for its words; the record key `open_key` ("epsilon" or "iter") left open (None)."""
    fields = {field: attack[key] for key, field in RECORD_SETTINGS.items() if key in attack}
    target = attack.get("target", "none")
    fields["target"] = None if target == "none" or target.startswith("top-") else target
    settings = AttackSettings(**{"num_iter": None, "epsilon": None, "step_size": 0.0, **fields})
    if open_key is None:
        return settings
    return dataclasses.replace(settings, **{RECORD_SETTINGS[open_key]: None})
