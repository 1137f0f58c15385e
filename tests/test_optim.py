"""Optimizers and LR schedules (iat.recipes.optim): closed forms, the weight-decay rule, clipping,
and a run with AdamW + cosine + clipping resumed bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_resumes_bit_for_bit
from torch import nn

from iat.config import Config
from iat.train.builders import build_optimizer, learning_rate
from main import main


def test_cosine_with_warmup_equals_its_closed_form():
    cfg = Config(
        data="x", lr_schedule="cosine", base_lr=1e-3, warmup_epochs=20, warmup_factor=1e-4,
        min_lr_factor=0.005, epochs=300,
    )  # fmt: skip
    total = 512  # peak 2e-3
    peak = 2e-3
    for t in (0.0, 0.5, 7.25, 19.999):  # linear from 1e-4 x peak, per iteration
        assert learning_rate(t, cfg, total) == pytest.approx(peak * (1e-4 + (1 - 1e-4) * t / 20))
    for t in (20.0, 100.0, 222.5, 300.0):
        cos = 0.5 * (1 + math.cos(math.pi * (t - 20) / 280))
        assert learning_rate(t, cfg, total) == pytest.approx(peak * (0.005 + 0.995 * cos))
    assert learning_rate(300, cfg, total) == pytest.approx(peak * 0.005)


def test_cyclic_is_wong_et_al_triangle_or_the_given_knots():
    cfg = Config(data="x", lr_schedule="cyclic", epochs=10, base_lr=0.2)
    peak = 0.2 * 512 / 256
    expected = {0: 0.0, 2: 0.5, 4: 1.0, 7: 0.5, 10: 0.0}  # 0 -> 1 at 2/5 of the run -> 0
    for t, factor in expected.items():
        assert learning_rate(t, cfg, 512) == pytest.approx(peak * factor)
    # fast_adversarial ImageNet/configs_fast_4px_phase{1,2,3}.yml: 0 -> 0.4 -> 0.04 -> ...
    knots = (0, 0, 1, 1, 6, 0.1, 12, 0.01, 15, 0.001)
    fast = Config(data="x", lr_schedule="cyclic", epochs=15, base_lr=0.2, lr_knots=knots)
    values = {0.5: 0.2, 1: 0.4, 3.5: 0.22, 6: 0.04, 13.5: 0.0022, 15: 0.0004}
    for t, lr in values.items():
        assert learning_rate(t, fast, 512) == pytest.approx(lr)


def test_warmup_factor_warms_up_the_step_schedule_from_that_fraction():
    cfg = Config(data="x", warmup_factor=0.0, warmup_epochs=2, lr_decay_epochs=(5,))
    assert learning_rate(0, cfg, 256) == 0.0
    assert learning_rate(1, cfg, 256) == pytest.approx(0.05)
    assert learning_rate(3, cfg, 256) == pytest.approx(0.1)
    assert learning_rate(5, cfg, 256) == pytest.approx(0.01)


class TinyViT(nn.Module):
    """The parameters a vision transformer has: tokens, position embedding, norms, biases."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.patch = nn.Conv2d(3, 4, 2)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)
        self.gamma = nn.Parameter(torch.ones(4))  # a layer scale


def test_adamw_decays_only_kernels_and_matrices():
    model = TinyViT()
    model.head.bias.requires_grad_(False)
    cfg = Config(data="x", optimizer="adamw", weight_decay=0.05, adam_betas=(0.9, 0.95))
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, kept = (g["params"] for g in optimizer.param_groups)
    assert {id(p) for p in decayed} == {id(model.patch.weight), id(model.head.weight)}
    assert {id(p) for p in kept} == {
        id(p) for n, p in model.named_parameters() if n not in ("patch.weight", "head.weight")
    } - {id(model.head.bias)}  # frozen: left out
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_bad_schedule_flags_are_one_line(capsys):
    for flags, said in (
        (["--lr-knots", "0", "0", "1"], "--lr-knots"),
        (["--lr-schedule", "cosine", "--lr-knots", "0", "0", "1", "1"], "--lr-knots"),
        (["--clip-grad", "0"], "--clip-grad"),
        (["--warmup-factor", "2"], "--warmup-factor"),
    ):
        assert main(["--fake", *flags]) == 1
        assert capsys.readouterr().err.startswith(f"error: {said}")


def test_adamw_cosine_with_clipping_resumes_bit_for_bit(tiny_imagenet, tmp_path):
    whole = assert_resumes_bit_for_bit(
        tiny_imagenet, tmp_path, "--attack-iter", "1", "--attack-epsilon", "8",
        "--optimizer", "adamw", "--lr-schedule", "cosine", "--base-lr", "1e-3",
        "--warmup-epochs", "1", "--warmup-factor", "0.01", "--weight-decay", "0.05",
        "--clip-grad", "0.5",
    )  # fmt: skip
    moments = whole["optimizer"]["state"]
    assert moments and all("exp_avg_sq" in s for s in moments.values())


def test_clip_grad_bounds_the_global_norm_and_none_leaves_it():
    from iat.recipes.optim import clip_gradients

    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))]
    params[0].grad, params[1].grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    clip_gradients(params, None)
    assert params[0].grad[0] == 3.0
    clip_gradients(params, 1.0)
    norm = torch.cat([p.grad for p in params]).norm()
    assert norm == pytest.approx(1.0, rel=1e-5)
