"""An attack is one unit (iat.attacks): one module registers it with what it is, and the flags,
the validation, the summary line and the record follow from that registration alone."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from iat.attacks import ATTACKS, AttackSettings
from iat.attacks.registry import attack_words, record
from iat.config import Config, choices

EVAL = {"mode": "eval", "load": "w.pt", "data": "imagenet"}


def run_python(code: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(REPO)])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_package_imports_without_adv_model_and_adv_model_reexports_it(tmp_path):
    """No import cycle: iat.attacks stands alone; adv_model (the original's module) gives the
    same objects under the original's names, and every registered attack builds."""
    run = run_python(
        """
        import sys
        import iat.attacks
        assert "adv_model" not in sys.modules
        import adv_model
        assert adv_model.ATTACKS is iat.attacks.ATTACKS
        assert adv_model.PGDAttacker is iat.attacks.pgd.PGDAttacker
        settings = adv_model.AttackSettings(1, 4.0, 1.0)
        for name in adv_model.ATTACKS:
            print(name, type(adv_model.create_attacker(name, settings)).__name__)
        """,
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:-1] == [
        "clean NoOpAttacker", "pgd PGDAttacker", "fgm FGMAttacker", "fgm-minimal FGMAttacker",
        "apgd-ce APGDAttacker", "apgd-t APGDAttacker", "apgd-dlr APGDAttacker",
        "fab-t FABAttacker", "square SquareAttacker", "strong EnsembleAttacker",
        "autoattack EnsembleAttacker", "fgsmrs PGDAttacker", "free FreeAttacker",
    ]  # fmt: skip


def test_each_attack_is_registered_by_its_own_module():
    """The factory of every entry lives in the module of the attack (iat/attacks/<unit>.py)."""
    modules = {name: info.factory.__module__ for name, info in ATTACKS.items()}
    assert all(m.startswith("iat.attacks.") for m in modules.values()), modules
    assert modules["square"] == "iat.attacks.square"
    assert modules["fab-t"] == "iat.attacks.fab"
    assert modules["autoattack"] == "iat.attacks.autoattack"
    assert modules["pgd"] == "iat.attacks.pgd"


def test_the_attacks_share_one_opening():
    """How an attack begins (the call's generator else its own, labels as int64, the images
    detached as float, attack mode) is ``Attacker._opening``'s: no attack module spells it."""
    repeated = ("self.generator if generator is None", "as_float(images)", "labels = labels.long()")
    for path in (REPO / "iat" / "attacks").glob("*.py"):
        if path.name != "core.py":
            assert not [line for line in repeated if line in path.read_text()], path.name


def test_flags_validation_words_and_record_come_from_the_registration():
    """--attack offers the evaluation attacks in registration order; each option is accepted
    exactly where the registration says the attack takes it."""
    evaluation = [name for name, info in ATTACKS.items() if info.evaluation]
    assert list(choices()["attack"]) == evaluation
    for name in evaluation:
        info = ATTACKS[name]
        restarts = {"restarts": 2}
        if info.restarts:
            Config(**EVAL, attack=name, **restarts)
        else:
            with pytest.raises(ValueError, match=f"--restarts 2: only --attack .*{'pgd'}"):
                Config(**EVAL, attack=name, **restarts)
        queries = {"queries": 100}
        if info.queries:
            Config(**EVAL, attack=name, **queries)
        else:
            with pytest.raises(ValueError, match="--queries 100: only --attack square, autoattack"):
                Config(**EVAL, attack=name, **queries)
        if not info.iterations:
            Config(**EVAL, attack=name, attack_iter=0)


def test_the_summary_words_and_record_state_every_setting_taken():
    settings = AttackSettings(10, 16.0, 1.0, target=None, restarts=3, loss="cw", top_k=4)
    assert attack_words("pgd", settings) == (
        "PGD-10 untargeted, L-inf eps=16, step 1.6, CW loss, 3 restarts"
    )
    assert attack_words("apgd-t", settings) == "APGD-T-10 top-4 targets, L-inf eps=16, 3 restarts"
    assert record("pgd", settings) == {
        "epsilon": 16.0, "norm": "inf", "target": "none", "iter": 10, "step_size": 1.6,
        "step_size_requested": 1.0, "loss": "cw", "restarts": 3,
    }  # fmt: skip
    assert record("square", settings) == {
        "epsilon": 16.0, "norm": "inf", "target": "none", "queries": 5000, "p_init": 0.8,
    }  # fmt: skip
    assert record("clean", settings) == {"epsilon": 16.0, "norm": "inf", "target": "none"}


NEW_ATTACK = '''
"""A new attack in one module: uniform noise at the ball's corners (a test's example)."""
import torch

from iat.attacks import AttackSettings, Attacker, no_targets
from iat.attacks.registry import register


class CornerNoise(Attacker):
    def __init__(self, epsilon, generator):
        self.epsilon, self.generator = epsilon, generator

    def attack(self, model, images, labels, generator=None):
        generator = generator or self.generator
        signs = torch.randint(0, 2, images.shape, generator=generator).float() * 2 - 1
        return (images + self.epsilon * signs).clamp(0, 255), no_targets(labels)


@register("corner-noise", "Corner-noise", norms=("inf",), iterations=False, gradient=False)
def corner_noise(settings: AttackSettings) -> Attacker:
    return CornerNoise(settings.epsilon, settings.generator)
'''


def test_a_new_attack_is_one_module_and_its_registration(tmp_path):
    """Measured: a new attack module, imported once, is offered by --attack, validated, built,
    named in the summary line and recorded, with no other file changed."""
    (tmp_path / "corner_noise.py").write_text(NEW_ATTACK)
    run = run_python(
        """
        import corner_noise
        import torch
        from iat.builders import build_attacker
        from iat.app.cli import build_parser, config_from_args
        from iat.eval.evaluate import eval_record, threat_model
        from iat.eval.metrics import EvalResult
        from main import main
        flags = ["--eval", "--load", "w.pt", "--data", "d", "--attack", "corner-noise"]
        cfg = config_from_args(build_parser().parse_args([*flags, "--attack-epsilon", "8"]))
        attacker = build_attacker(cfg, attack_iter=cfg.attack_iter, num_classes=10, name=cfg.attack)
        adv, _ = attacker.attack(None, torch.full((2, 3, 4, 4), 100.0), torch.zeros(2).long())
        assert set((adv - 100).abs().unique().tolist()) == {8.0}
        print(threat_model(cfg))
        result = EvalResult(images=2, top1_error=1.0, top5_error=0.0, attack_success_rate=1.0)
        print(eval_record(cfg, result)["attack"])
        print("refused", main([*flags, "--restarts", "2"]))
        """,
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    words, recorded, refused = run.stdout.split("\n")[:3]
    assert words == "Corner-noise untargeted, L-inf eps=8"
    assert recorded == "{'name': 'corner-noise', 'epsilon': 8.0, 'norm': 'inf', 'target': 'none'}"
    assert refused == "refused 1" and "--restarts 2: only --attack pgd," in run.stderr


FIGURES_ATTACK = NEW_ATTACK.replace(
    '@register("corner-noise", "Corner-noise", norms=("inf",), iterations=False, gradient=False)',
    """def corner_figures(details):
    return f", {details['flipped']} corners flipped"


@register("corner-noise", "Corner-noise", norms=("inf",), iterations=False, gradient=False,
          extra_record=lambda settings: {"corners": "all"}, figures=corner_figures)""",
)


def test_a_new_attacks_own_figures_and_record_reach_every_output(tmp_path):
    """An attack's own figures (``figures=``) and record fields (``extra_record=``) reach the
    summary line, the record and the report's label, from its registration alone."""
    (tmp_path / "corner_noise.py").write_text(FIGURES_ATTACK)
    run = run_python(
        """
        import corner_noise
        from iat.app.report import robust_accuracy_curves
        from iat.config import Config
        from iat.eval.evaluate import eval_record
        from iat.eval.metrics import EvalResult
        from iat.eval.summary import summary_line
        cfg = Config(mode="eval", load="r/w.pt", data="d", attack="corner-noise")
        result = EvalResult(images=2, top1_error=0.5, top5_error=0.0, attack_success_rate=0.5,
                            details={"flipped": 7})
        print(summary_line(cfg, result))
        record = eval_record(cfg, result)
        print(record["attack"]["corners"], record["details"])
        print(list(robust_accuracy_curves([record], "epsilon")))
        """,
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    line, recorded, labels = run.stdout.split("\n")[:3]
    assert line == (
        "Corner-noise untargeted, L-inf eps=16: 2 images, top-1 error 0.5000, top-5 error "
        "0.0000, attack success rate 0.5000, robust accuracy 0.5000, 7 corners flipped"
    )
    assert recorded == "all {'flipped': 7}"
    assert labels == "['r/w.pt: Corner-noise untargeted, L-inf']"


TRAINING_ATTACK = NEW_ATTACK.replace(
    "from iat.attacks.registry import register",
    "import re\n\nfrom iat.attacks.registry import TrainingForm, register",
).replace(
    '@register("corner-noise", "Corner-noise", norms=("inf",), iterations=False, gradient=False)',
    """def corners_spec(text):
    match = re.match(r"^corners_(\\d+)$", text)
    return None if not match else AttackSettings(1, float(match.group(1)), 0.0, target=None)


CORNERS = TrainingForm(
    ("corners_EPS",), corners_spec, soft_target=lambda s, p: (1, s.epsilon, s.epsilon, 0.0),
    warmups=("epsilon",),
)


@register("corner-noise", "Corner-noise", norms=("inf",), iterations=False, gradient=False,
          training=CORNERS)""",
)


def test_a_new_training_attack_is_one_module_and_its_registration(tmp_path):
    """Measured: a training attack from outside the package, registered with its spec form, is
    parsed by --adv-method, listed in its help and errors, warmed up and given its soft-target
    form by its registration alone, and trains a model."""
    (tmp_path / "corner_noise.py").write_text(TRAINING_ATTACK)
    run = run_python(
        """
        import dataclasses
        import corner_noise
        from iat.app.cli import build_parser
        from iat.attacks.spec import parse_attack_spec
        from iat.config import Config
        from iat.train.builders import epoch_attack_spec
        from iat.train.soft_objective import soft_target_attacker
        from main import main
        print(parse_attack_spec("corners_8").name)
        print("corners_EPS" in build_parser().format_help())
        cfg = Config(data="x", adv_method="corners_8", eps_warmup_epochs=4, epochs=8)
        print(epoch_attack_spec(cfg, 3).settings.epsilon)
        soft = soft_target_attacker(parse_attack_spec("corners_8"), 0.5, None)
        print(soft.num_iter, soft.epsilon, soft.step_size)
        tiny = ["--fake", "--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8",
                "--image-size", "32", "--batch", "4", "--steps-per-epoch", "2", "--epochs", "1",
                "--train-eval", "none"]
        print("trained", main([*tiny, "--adv-method", "corners_8", "--logdir", "run"]))
        print("refused", main([*tiny, "--adv-method", "corners_8", "--step-warmup-epochs", "2",
                               "--logdir", "run2"]))
        """,
        tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    printed = [line for line in run.stdout.splitlines() if not line.startswith("epoch ")]
    assert printed == [
        "corner-noise", "True", "4.0", "1 8.0 8.0", "trained 0", "refused 1",
    ]  # fmt: skip
    assert "--step-warmup-epochs: corner-noise's step follows its epsilon" in run.stderr
