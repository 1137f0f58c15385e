"""The evaluation summary line: the one place a threat model and its result are put in words.

``threat_model`` names what an evaluation measures (the attack registry's words for the attack
and its ball, then the defense, the frontend and which weights); ``summary_line`` adds the
numbers and the attacker's own figures (each attack's ``figures`` in ``iat.attacks.registry``).
``--eval``, ``--watch``, the in-training evaluations, the demo's table and every record's
``threat_model`` (which ``--report`` reads) use them.
"""

from __future__ import annotations

from iat.attacks import AttackSettings, attack_info, registry
from iat.builders import attack_settings
from iat.config import Config, eval_attack, fit_defense, predict_defense
from iat.defenses import transforms as defenses
from iat.defenses.registry import parse_frontend
from iat.eval.metrics import EvalResult


def random_draws(cfg: Config) -> int:
    """The draws of --defense an evaluation attack averages per gradient: --eot-samples behind a
    random defense, else 1 (as ``defenses.eot_samples`` gives the attack built for it)."""
    random = any(t.random for t in defenses.build_transforms(predict_defense(cfg)))
    return cfg.eot_samples if random else 1


def eval_settings(cfg: Config) -> AttackSettings:
    """--eval's attack settings, as ``evaluate_attack`` builds its attacker from them."""
    return attack_settings(
        cfg, attack_iter=cfg.attack_iter, num_classes=cfg.num_classes, eot_samples=random_draws(cfg)
    )


def threat_model(cfg: Config) -> str:
    """--eval's attack in words: attack, iterations, target, norm, epsilon, every option that
    changes the number (the registry's words), then the defense, the frontend and which
    weights (the averaged ones with --eval-ema)."""
    attack = eval_attack(cfg)
    ema = ", EMA weights (--eval-ema)" if cfg.eval_ema else ""
    return registry.attack_words(attack, eval_settings(cfg)) + _defense_words(cfg, attack) + ema


def _defense_words(cfg: Config, attack: str) -> str:
    """The defense and the model-level defense, and how a gradient attack sees them (a
    query attack, Square, sees their forward pass as it is), after commas; empty without
    either."""
    info = attack_info(attack)
    attacked = info.perturbs and info.gradient
    draws = registry.draws(attack, eval_settings(cfg)) if attacked else cfg.eot_samples
    words = [defenses.describe(predict_defense(cfg), draws, attacked=attacked)]
    if fit_defense(cfg) and predict_defense(cfg) is None:
        words.append(f"trained behind {cfg.defense} (--defense-apply fit), evaluated without it")
    if cfg.frontend is not None:
        defense, _ = parse_frontend(cfg.frontend)
        words.append(defense.attack_words(cfg.frontend_gradient) if attacked else defense.title)
    return "".join(f", {w}" for w in words if w)


def summary_line(cfg: Config, r: EvalResult) -> str:
    """The evaluation's one line: its threat model, images, errors, and for an attack its
    success rate, robust accuracy and own figures."""
    skipped = f" ({r.skipped} unreadable skipped)" if r.skipped else ""
    line = (
        f"{threat_model(cfg)}: {r.images} images{skipped}, top-1 error {r.top1_error:.4f}, "
        f"top-5 error {r.top5_error:.4f}"
    )
    if not attack_info(eval_attack(cfg)).perturbs:
        return line
    line += (
        f", attack success rate {r.attack_success_rate:.4f}, "
        f"robust accuracy {r.robust_accuracy:.4f}"
    )
    return line + registry.figure_words(eval_attack(cfg), r.details)
