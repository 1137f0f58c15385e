"""The fast attack (--use-fp16xla): autocast + torch.compile keep the attack's guarantees and
its strength. CPU runs exercise the CPU twin (bf16 autocast, inductor); CUDA-only options (fp16
loss scaling, CUDA graphs) are selected by device in adv_model."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from digits_model import assert_unchanged, eval_logits, snapshot

import nets
from adv_model import (
    AttackSettings,
    PGDAttacker,
    attack_mode,
    attack_success,
    autocast_dtype,
    create_attacker,
)
from iat.attacks.core import build_objective


@pytest.fixture()
def graph_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile with AOTAutograd but without inductor's code generation: the same graph
    capture, guards and input-gradient backward graph, in seconds instead of a minute."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


def test_autocast_dtype_follows_the_device():
    assert autocast_dtype(torch.device("cuda", 0)) == torch.float16
    assert autocast_dtype(torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype(torch.device("cuda", 0), torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float16, 128.0), (torch.bfloat16, 1.0)])
def test_the_fast_objective_scales_fp16_only_and_computes_in_its_type(dtype, scale):
    """fp16's loss is scaled by 128 against underflow of the input gradient (the original's
    --use-fp16xla); bf16 has fp32's range and is not. Checked against the loss computed by hand
    in that type."""
    model = torch.nn.Linear(6, 3)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])
    seen = []

    def loss(m, adv, goal):
        logits = m(adv)
        seen.append(logits.dtype)
        return F.cross_entropy(logits, goal, reduction="sum")

    cpu = torch.device("cpu")
    value = build_objective(loss, cpu, True, False, dtype)(model, x, y)
    by_hand = F.cross_entropy(
        (x.to(dtype) @ model.weight.to(dtype).T + model.bias.to(dtype)).float(), y, reduction="sum"
    )
    assert seen == [dtype] and value.dtype == torch.float32
    torch.testing.assert_close(value, scale * by_hand, rtol=2e-2, atol=0.0)


def test_build_attacker_fast_means_autocast_and_compiled():
    fast = create_attacker("pgd", AttackSettings(3, 16.0, 1.0, autocast=True, compiled=True))
    assert fast.autocast and fast.compiled
    plain = create_attacker("pgd", AttackSettings(3, 16.0, 1.0))
    assert not plain.autocast and not plain.compiled


def test_fast_attack_keeps_the_guarantees_and_compiles_once(digits):
    model = copy.deepcopy(digits["model"])
    model.train()
    model.bn2.eval()  # a mixed mode must come back as it was
    before = snapshot(model)
    x, y = digits["x"][:64].clone(), digits["y"][:64]
    x[:8], x[8:16] = 0.0, 255.0
    gen = torch.Generator().manual_seed(1)
    attacker = PGDAttacker(3, 32.0, 8.0, autocast=True, compiled=True, generator=gen)
    adv, _ = attacker.attack(model, x, y)
    assert adv.dtype == torch.float32
    assert (adv - x).abs().max() <= 32.0 + 1e-4
    assert adv.min() >= 0.0 and adv.max() <= 255.0
    assert not adv.requires_grad and adv.grad_fn is None
    assert (adv != x).any()
    assert_unchanged(model, before)
    # Static shapes: the next batch of the same shape reuses the compiled graph.
    with torch._dynamo.config.patch(error_on_recompile=True):
        attacker.attack(model, digits["x"][64:128], digits["y"][64:128])
    assert_unchanged(model, before)


def test_fast_attack_is_as_effective_as_fp32(digits):
    model, x, y = digits["model"], digits["x"], digits["y"]
    rates = []
    for fast in (False, True):
        # 8x8 digits with 16 grey levels are coarse: epsilon 48 (3 grey levels), 10 steps.
        gen = torch.Generator().manual_seed(6)
        attacker = PGDAttacker(10, 48.0, 1.0, autocast=fast, compiled=fast, generator=gen)
        adv, targets = attacker.attack(model, x, y)
        rates.append(attack_success(eval_logits(model, adv), y, targets).float().mean().item())
    fp32, fast = rates
    assert 0.3 < fp32 < 0.95, rates  # a strength where a weaker attack would show
    assert abs(fast - fp32) <= 0.03, rates


def test_fast_input_gradient_agrees_with_fp32_on_resnet(graph_compiler):
    torch.manual_seed(0)
    model = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=10)
    for module in model.modules():  # non-trivial residual branches (zero-gamma starts at 0)
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255
    y = torch.arange(8)
    signs = {}
    for fast in (False, True):
        attacker = PGDAttacker(1, 8.0, 1.0, target=None, autocast=fast, compiled=fast)
        objective = attacker.objective(x.device)
        with attack_mode(model), torch.enable_grad():
            adv = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(model, adv, y), adv)
        assert all(p.grad is None for p in model.parameters())
        signs[fast] = grad.sign()
    agreement = (signs[True] == signs[False]).float().mean()
    assert agreement > 0.9


def test_fast_attack_on_resnet_stays_in_ball_and_nears_target(graph_compiler):
    torch.manual_seed(0)
    model = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=10)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255
    y = torch.arange(4)
    attacker = PGDAttacker(2, 8.0, 4.0, num_classes=10, autocast=True, compiled=True)
    adv, targets = attacker.attack(model, x, y)
    step = (adv - x).abs()
    assert step.max() <= 8.0 + 1e-4
    assert ((targets != y) & (targets >= 0)).all()
    assert F.cross_entropy(eval_logits(model, adv), targets) < F.cross_entropy(
        eval_logits(model, x), targets
    )
