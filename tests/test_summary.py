"""One summary line (iat.eval.summary): --eval, the in-training evaluations' log, the report's
labels and the demo's table name the same threat model for the same settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from iat.app.demo import column_legend
from iat.app.report import robust_accuracy_curves
from iat.config import Config
from iat.eval.evaluate import eval_record
from iat.eval.metrics import EvalResult
from iat.eval.summary import summary_line, threat_model
from iat.runs.state import Progress
from iat.train.trainer import log_eval

EVAL = {"mode": "eval", "load": "run/w.pt", "data": "d", "attack_epsilon": 8.0, "attack_iter": 10}
RESULT = EvalResult(images=4, top1_error=0.5, top5_error=0.25, attack_success_rate=0.5)
BPDA = "defense jpeg:75, attacked through BPDA (identity backward) for jpeg:75"
# (settings, threat model, report label along epsilon, along iterations, whether training and
# the demo's table take these settings: norm and restarts are --eval's alone)
CASES = [
    ({"attack_target": "none"}, "PGD-10 untargeted, L-inf eps=8, step 1",
     "PGD-10 untargeted, L-inf", "PGD untargeted, L-inf eps=8", True),
    ({"attack_target": "random"}, "PGD-10 random target, L-inf eps=8, step 1",
     "PGD-10 random target, L-inf", "PGD random target, L-inf eps=8", True),
    ({"attack_target": "none", "defense": "jpeg:75"},
     f"PGD-10 untargeted, L-inf eps=8, step 1, {BPDA}",
     "PGD-10 untargeted, L-inf, defense jpeg:75", "PGD untargeted, L-inf eps=8, defense jpeg:75",
     True),
    ({"attack_target": "none", "norm": "2", "attack_epsilon": 600.0},
     "PGD-10 untargeted, L2 eps=600, step 60", "PGD-10 untargeted, L2",
     "PGD untargeted, L2 eps=600", False),
    ({"attack_target": "none", "restarts": 3}, "PGD-10 untargeted, L-inf eps=8, step 1, 3 restarts",
     "PGD-10 untargeted, L-inf, 3 restarts", "PGD untargeted, L-inf eps=8, 3 restarts", False),
]  # fmt: skip


class Recorder:
    """A run logger that keeps what it was given."""

    def log(self, step: int, scalars: dict, **fields: object) -> None:
        self.scalars, self.fields = scalars, fields


@pytest.mark.parametrize("settings,words,along_epsilon,along_iter,in_training", CASES)
def test_every_output_names_the_same_threat_model(
    settings: dict, words: str, along_epsilon: str, along_iter: str, in_training: bool, capsys
) -> None:
    cfg = Config(**{**EVAL, **settings})
    assert threat_model(cfg) == words
    line = summary_line(cfg, RESULT)
    assert line.startswith(f"{words}: 4 images, top-1 error 0.5000")
    record = eval_record(cfg, RESULT)
    assert record["threat_model"] == words
    assert list(robust_accuracy_curves([record], "epsilon")) == [f"run/w.pt: {along_epsilon}"]
    assert list(robust_accuracy_curves([record], "iter")) == [f"run/w.pt: {along_iter}"]
    if not in_training:
        return
    point = dataclasses.replace(cfg, mode="train", load=None)
    logger = Recorder()
    capsys.readouterr()
    log_eval(logger, "eval-10step", RESULT, Progress(1, 2), point)
    assert capsys.readouterr().out == f"epoch 1 eval-10step: {line}\n"
    assert logger.fields["threat_model"] == words
    assert logger.scalars["eval-10step/attack_success_rate"] == 0.5
    heading = "PGD-10 untargeted" if settings["attack_target"] == "none" else "PGD-10 rand-target"
    legend = column_legend(cfg, Path("run/w.pt")).splitlines()
    assert f"{heading}: {words}" in legend


def test_the_clean_evaluation_names_no_attack_figures(capsys) -> None:
    """Whether a line reports attack figures is the registry's (the attack perturbs), not a
    name: the in-training clean evaluation logs no attack success."""
    cfg = Config(**{**EVAL, "attack_iter": 0})
    line = summary_line(cfg, RESULT)
    assert line == "clean: 4 images, top-1 error 0.5000, top-5 error 0.2500"
    logger = Recorder()
    log_eval(logger, "eval-0step", RESULT, Progress(1, 2), dataclasses.replace(cfg, mode="train"))
    assert capsys.readouterr().out == f"epoch 1 eval-0step: {line}\n"
    assert list(logger.scalars) == ["eval-0step/top1_error", "eval-0step/top5_error"]
