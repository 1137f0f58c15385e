"""Mixup / CutMix on the device (iat.recipes.mixing) and the soft-target training attack and loss
(iat.train.soft_objective): target mass, the mixed pixels, timm's draws, the attack against the
hard-label PGD, label smoothing composing, and a mixed run resumed bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_resumes_bit_for_bit
from torch import nn

from adv_model import (
    NoOpAttacker,
    PGDAttacker,
    pgd_step_size,
    training_objective,
    training_terms,
)
from iat.recipes.mixing import MixDraw, MixSettings, draw_mix, mix_batch, soft_targets
from iat.train.soft_objective import SoftTargetPGD, soft_training_objective
from main import main

SETTINGS = MixSettings(0.8, 1.0, 1.0, 0.5, 0.1, num_classes=5)


def _batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 8, 8, generator=g) * 255, torch.arange(n) % 5


def test_mixup_blends_with_the_reversed_batch_and_targets_sum_to_one():
    images, labels = _batch()
    mixed, targets = mix_batch(images, labels, SETTINGS, MixDraw(0.3))
    assert torch.allclose(mixed, 0.3 * images + 0.7 * images.flip(0))
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))
    off = 0.1 / 5
    expected = 0.3 * (0.9 + off)
    expected += 0.7 * off if labels[0] != labels[-1] else 0.7 * (0.9 + off)
    assert targets[0, labels[0]].item() == pytest.approx(expected)


def test_cutmix_pastes_the_box_and_lambda_is_the_area_kept():
    images, labels = _batch()
    rng = np.random.default_rng(3)
    cut = MixSettings(0.0, 1.0, 1.0, 0.5, 0.0, num_classes=5)
    draw = draw_mix(cut, 8, 8, rng)
    assert draw.box is not None
    mixed, targets = mix_batch(images, labels, cut, draw)
    from_other = (mixed != images).any(dim=1)[0]  # pixels taken from the mirrored image
    top, bottom, left, right = draw.box
    assert from_other.sum().item() == (bottom - top) * (right - left)
    assert draw.lam == pytest.approx(1 - from_other.float().mean().item())
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))
    assert targets[0, labels[0]].item() == pytest.approx(draw.lam)


def test_draws_follow_the_switch_and_mix_probabilities():
    rng = np.random.default_rng(0)
    never = MixSettings(0.8, 1.0, 0.0, 0.5, 0.1, 5)
    assert all(draw_mix(never, 8, 8, rng) == MixDraw(1.0) for _ in range(20))
    only_cut = MixSettings(0.8, 1.0, 1.0, 1.0, 0.1, 5)
    assert all(draw_mix(only_cut, 8, 8, rng).box is not None for _ in range(20))
    only_mixup = MixSettings(0.8, 0.0, 1.0, 1.0, 0.1, 5)
    lams = [draw_mix(only_mixup, 8, 8, rng) for _ in range(2000)]
    assert all(d.box is None for d in lams)
    assert np.mean([d.lam for d in lams]) == pytest.approx(0.5, abs=0.03)  # Beta(a, a)
    half = [draw_mix(SETTINGS, 8, 8, rng).box is not None for _ in range(2000)]
    assert np.mean(half) == pytest.approx(0.5, abs=0.04)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 5))


def test_soft_attack_on_one_hot_targets_is_the_untargeted_pgd():
    images, labels = _batch()
    model = _net()
    hard = PGDAttacker(3, 8, 2, target=None, generator=torch.Generator().manual_seed(5))
    soft = SoftTargetPGD(3, 8, pgd_step_size(8, 3, 2), 0.0, torch.Generator().manual_seed(5))
    expected, _ = hard.attack(model, images, labels)
    adv = soft.attack(model, images, F.one_hot(labels, 5).float())
    assert torch.equal(adv, expected)
    assert (adv - images).abs().max() <= 8 + 1e-4


def test_label_smoothing_composes_with_the_soft_targets():
    images, labels = _batch()
    model = _net()
    expected, _, _ = training_objective(model, model, NoOpAttacker(), images, labels, 0.1)
    targets = soft_targets(labels, SETTINGS, 1.0)
    clean = SoftTargetPGD(0, 0, 0, 1.0, torch.Generator())
    loss = soft_training_objective(model, model, clean, images, targets).loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_mixed_run_resumes_bit_for_bit(tiny_imagenet, tmp_path):
    mixing = ["--mixup-alpha", "0.8", "--cutmix-alpha", "1.0"]
    assert_resumes_bit_for_bit(tiny_imagenet, tmp_path, "--adv-method", "pgd_8_4_1", *mixing)


def test_mixing_needs_an_untargeted_attack(capsys):
    assert main(["--fake", "--mixup-alpha", "0.8"]) == 1  # the original's random target
    assert capsys.readouterr().err.startswith("error: --mixup-alpha/--cutmix-alpha")


def test_logit_pairing_and_mixed_batches_compose_with_soft_targets():
    images, labels = _batch()
    model = _net()
    noise = NoOpAttacker()
    expected = training_terms(model, model, noise, images, labels, 0.1, 0.5, 0.5)
    clean = SoftTargetPGD(0, 0, 0, 1.0, torch.Generator())
    targets = soft_targets(labels, SETTINGS, 1.0)
    terms = soft_training_objective(model, model, clean, images, targets, 0.5, 0.5)
    assert terms.loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)
    assert torch.equal(terms.adv_logits, expected.adv_logits)
    assert terms.pairing.item() == pytest.approx(expected.pairing.item(), rel=1e-6)
