"""Schedules by epoch: the training attack's epsilon and step warm-ups (ARES's ramp), and
progressive resizing (Wong et al.'s phases), in closed form and in a run resumed bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_resumes_bit_for_bit

from adv_model import PGDAttacker
from iat.builders import FP32_EAGER, AttackPrecision, attack_settings, training_attack_settings
from iat.config import Config, epoch_value
from iat.data.sources import resize_batch
from iat.train.builders import build_epoch_attacker, epoch_attack_spec, warmup_factor
from iat.train.overfit_guard import GuardFigures, OverfitGuard
from iat.train.soft_objective import SoftTargetPGD
from main import main

ARES_ATTACK = dict(attack_iter=3, attack_epsilon=4.0, attack_step_size=8 / 3, attack_target="none")


def test_warmup_is_ares_ramp_of_the_zero_based_epoch():
    assert [warmup_factor(5, e) for e in range(1, 8)] == [0, 0.2, 0.4, 0.6, 0.8, 1, 1]
    assert warmup_factor(0, 1) == 1


def test_the_step_ramps_and_epsilon_stays_under_a_step_warmup():
    cfg = Config(data="x", step_warmup_epochs=5, **ARES_ATTACK)
    for epoch, factor in ((1, 0.0), (3, 0.4), (6, 1.0), (50, 1.0)):
        spec = epoch_attack_spec(cfg, epoch)
        assert spec.settings.epsilon == 4.0
        assert spec.settings.step_size == pytest.approx(8 / 3 * factor)
    fgsm = Config(data="x", adv_method="fgsmrs_8", eps_warmup_epochs=4)
    assert [epoch_attack_spec(fgsm, e).settings.epsilon for e in (1, 2, 5)] == [0.0, 2.0, 8.0]


def test_the_soft_attack_takes_the_ramped_step_and_the_hard_pgd_its_floor():
    generator = torch.Generator()
    build = dict(
        num_classes=5, precision=AttackPrecision(False, False, "fp32"), generator=generator
    )
    mixed = Config(data="x", step_warmup_epochs=5, mixup_alpha=0.8, **ARES_ATTACK)
    soft = build_epoch_attacker(mixed, 2, **build)
    assert isinstance(soft, SoftTargetPGD) and soft.step_size == pytest.approx(8 / 3 * 0.2)
    hard = build_epoch_attacker(Config(data="x", step_warmup_epochs=5, **ARES_ATTACK), 2, **build)
    assert isinstance(hard, PGDAttacker) and hard.step_size == pytest.approx(4 / 3)  # eps / iter


def test_training_settings_are_the_epoch_spec_and_evaluation_the_flags():
    """Built once each: the training attack's from its epoch's spec (never the evaluation's
    settings overwritten), the evaluation attack's from the --attack-* flags."""
    cfg = Config(data="x", eps_warmup_epochs=4, prob_start_from_clean=0.25, **ARES_ATTACK)
    generator = torch.Generator()
    spec = epoch_attack_spec(cfg, 3)
    training = training_attack_settings(
        cfg, spec, num_classes=5, precision=FP32_EAGER, generator=generator
    )
    assert (training.num_iter, training.epsilon, training.target) == (3, 2.0, None)
    assert training.step_size == spec.settings.step_size
    assert training.prob_start_from_clean == 0.25 and training.generator is generator
    evaluation = attack_settings(cfg, attack_iter=10, num_classes=5)
    assert (evaluation.num_iter, evaluation.epsilon, evaluation.target) == (10, 4.0, None)
    assert evaluation.prob_start_from_clean == 0.0 and not evaluation.autocast


def test_size_schedule_picks_the_phase_of_the_epoch():
    phases = (1, 128, 7, 224, 13, 288)  # fast_adversarial ImageNet, 4px
    assert [epoch_value(phases, e) for e in (1, 6, 7, 12, 13, 15)] == [128] * 2 + [224] * 2 + [
        288
    ] * 2
    assert epoch_value(None, 3) is None
    images = torch.rand(2, 3, 32, 32) * 255
    assert resize_batch(images, 16).shape == (2, 3, 16, 16)


def test_bad_schedule_flags_are_one_line(capsys):
    for flags, said in (
        (["--size-schedule", "2", "64"], "--size-schedule"),
        (["--size-schedule", "1", "300"], "--size-schedule"),
        (["--step-warmup-epochs", "2", "--adv-method", "fgsmrs_4"], "--step-warmup-epochs"),
        (["--eps-warmup-epochs", "2", "--attack-iter", "0"], "--eps-warmup-epochs"),
    ):
        assert main(["--fake", *flags]) == 1
        assert capsys.readouterr().err.startswith(f"error: {said}"), flags


def test_warmed_up_progressively_resized_run_resumes_bit_for_bit(tiny_imagenet, tmp_path):
    assert_resumes_bit_for_bit(
        tiny_imagenet, tmp_path, "--adv-method", "fgsmrs_8", "--eps-warmup-epochs", "2",
        "--size-schedule", "1", "16", "2", "32",
    )  # fmt: skip


class ScriptedGuard(OverfitGuard):
    """The guard with its held-out figures given, epoch after epoch."""

    def __init__(self, figures: list[GuardFigures]) -> None:
        super().__init__(torch.zeros(1, 3, 8, 8), torch.zeros(1), 8.0, 0.2, 0)
        self.script = iter(figures)

    def figures(self, model):
        return next(self.script)


def test_the_guard_rolls_back_when_pgd_collapses_while_fgsm_rises():
    model = torch.nn.Linear(2, 2)
    guard = ScriptedGuard(
        [GuardFigures(0.3, 0.4), GuardFigures(0.35, 0.5), GuardFigures(0.1, 0.45),
         GuardFigures(0.02, 0.9)]
    )  # fmt: skip
    guard.remember(model)
    assert not guard.collapsed(model)[0]  # up
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not guard.collapsed(model)[0]  # PGD down 0.25 but FGSM down too: kept
    with torch.no_grad():
        model.weight.add_(1.0)
    collapsed, figures = guard.collapsed(model)  # PGD 0.1 -> 0.02 is no collapse (0.08)...
    assert not collapsed and figures.pgd == 0.02
    guard.last = GuardFigures(0.5, 0.5)  # ... from 0.5 it is, with FGSM up
    guard.script = iter([GuardFigures(0.1, 0.8)])
    with torch.no_grad():
        model.weight.add_(1.0)
    assert guard.collapsed(model)[0]
    guard.roll_back(model)
    assert torch.equal(model.weight, before["weight"] + 2)  # the last kept weights


def test_a_guarded_fgsm_run_logs_its_checks_and_resumes_bit_for_bit(tiny_imagenet, tmp_path):
    assert_resumes_bit_for_bit(
        tiny_imagenet, tmp_path, "--adv-method", "fgsmrs_8", "--overfit-guard", "0.2"
    )
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").open()]
    checks = [r for r in records if r["phase"] == "guard"]
    assert [r["epoch"] for r in checks] == [1, 2]
    assert all(0 <= r["guard/pgd_accuracy"] <= 1 for r in checks)
