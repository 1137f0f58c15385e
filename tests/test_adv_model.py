"""Attack invariants and attack strength of adv_model on small real models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from digits_model import (
    NUM_CLASSES,
    assert_unchanged,
    eval_logits,
    snapshot,
)
from torch import nn

from adv_model import (
    ATTACKS,
    AttackSettings,
    NoOpAttacker,
    PGDAttacker,
    attack_success,
    create_attacker,
)


class LinearNet(nn.Module):
    """logits = W (x / 255) + b: its input gradient has a closed form."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1) / 255.0)


class ConstantNet(nn.Module):
    """Logits independent of the input: every input gradient is exactly zero."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(-1.0, 1.0, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.0 * x.flatten(1).sum(dim=1, keepdim=True) + self.bias


class ExplodingNet(nn.Module):
    """Wraps a model and raises on its ``fail_at``-th forward call."""

    def __init__(self, inner: nn.Module, fail_at: int) -> None:
        super().__init__()
        self.inner = inner
        self.fail_at = fail_at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return self.inner(x)


class ProbeNet(nn.Module):
    """Wraps a model and records, at every forward call, whether any module was in training
    mode and whether any parameter required a gradient."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = any(m.training for m in self.modules())
        self.seen.append((training, any(p.requires_grad for p in self.parameters())))
        return self.inner(x)


def test_trained_model_is_accurate(digits):
    logits = eval_logits(digits["model"], digits["x"])
    assert (logits.argmax(1) == digits["y"]).float().mean() > 0.9


@pytest.mark.parametrize("target", ["random", "least_likely", None])
def test_iterates_stay_in_ball_and_pixel_range(digits, target):
    x = digits["x"][:64].clone()
    x[:8] = 0.0
    x[8:16] = 255.0
    attacker = PGDAttacker(3, 32.0, 8.0, target=target, generator=torch.Generator().manual_seed(1))
    adv, _ = attacker.attack(digits["model"], x, digits["y"][:64])
    assert (adv - x).abs().max() <= 32.0 + 1e-4
    assert adv.min() >= 0.0 and adv.max() <= 255.0
    assert not adv.requires_grad and adv.grad_fn is None
    assert (adv != x).any()


def test_random_targets_are_uniform_over_wrong_classes():
    labels = torch.arange(NUM_CLASSES).repeat(400)
    model = LinearNet(3 * 2 * 2, NUM_CLASSES)
    images = torch.rand(len(labels), 3, 2, 2) * 255
    for num_classes in (None, NUM_CLASSES):
        attacker = PGDAttacker(
            1, 4.0, 1.0, num_classes=num_classes, generator=torch.Generator().manual_seed(2)
        )
        _, targets = attacker.attack(model, images, labels)
        assert targets.dtype == torch.int64
        assert (targets != labels).all()
        assert ((targets >= 0) & (targets < NUM_CLASSES)).all()
        counts = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
        counts.index_put_((labels, targets), torch.ones_like(labels), accumulate=True)
        off_diagonal = counts[~torch.eye(NUM_CLASSES, dtype=torch.bool)]
        assert (off_diagonal > 0).all()  # every wrong class is eventually drawn
        assert counts.diagonal().sum() == 0


def test_least_likely_target_is_argmin_of_clean_logits(digits):
    model, x, y = digits["model"], digits["x"][:64], digits["y"][:64]
    attacker = PGDAttacker(2, 8.0, 1.0, target="least_likely")
    _, targets = attacker.attack(model, x, y)
    torch.testing.assert_close(targets, eval_logits(model, x).argmin(1))


def test_untargeted_returns_no_targets(digits):
    attacker = PGDAttacker(1, 8.0, 1.0, target=None)
    _, targets = attacker.attack(digits["model"], digits["x"][:5], digits["y"][:5])
    assert targets.dtype == torch.int64
    assert targets.tolist() == [-1] * 5


def test_step_size_rule():
    # Feature Denoising, Sec 6.1: 10 iterations at epsilon 16 use step 1.6, longer ones step 1.
    assert PGDAttacker(10, 16.0, 1.0).step_size == pytest.approx(1.6)
    assert PGDAttacker(100, 16.0, 1.0).step_size == pytest.approx(1.0)
    assert PGDAttacker(1, 16.0, 1.0).step_size == pytest.approx(16.0)
    assert PGDAttacker(4, 16.0, 5.0).step_size == pytest.approx(5.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_iter": 0, "epsilon": 16.0, "step_size": 1.0},
        {"num_iter": 5, "epsilon": -1.0, "step_size": 1.0},
        {"num_iter": 5, "epsilon": 16.0, "step_size": 1.0, "prob_start_from_clean": 1.5},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        PGDAttacker(**kwargs)


def test_unknown_target_lists_valid_values():
    with pytest.raises(ValueError, match="least_likely"):
        PGDAttacker(5, 16.0, 1.0, target="most_likely")


def test_model_state_untouched_and_no_parameter_grads(digits):
    model = copy.deepcopy(digits["model"])
    model.train()
    model.bn2.eval()  # a mixed mode must come back as it was
    model.fc.weight.requires_grad_(False)
    before = snapshot(model)
    assert any(before[0]) and not all(before[0])
    PGDAttacker(3, 16.0, 4.0).attack(model, digits["x"][:32], digits["y"][:32])
    assert_unchanged(model, before)


def test_attack_runs_in_inference_mode_with_frozen_parameters(digits):
    model = ProbeNet(copy.deepcopy(digits["model"]))
    model.train()
    PGDAttacker(3, 16.0, 4.0).attack(model, digits["x"][:8], digits["y"][:8])
    assert model.seen == [(False, False)] * 4  # one clean pass for the class count, 3 steps
    assert model.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("fail_at", [1, 3])
def test_model_state_restored_after_exception(digits, fail_at):
    model = ExplodingNet(copy.deepcopy(digits["model"]), fail_at)
    model.train()
    model.inner.bn1.eval()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        PGDAttacker(4, 16.0, 4.0).attack(model, digits["x"][:8], digits["y"][:8])
    assert_unchanged(model, before)


def test_noop_is_identity(digits):
    x, y = digits["x"][:7], digits["y"][:7]
    adv, targets = NoOpAttacker().attack(digits["model"], x, y)
    assert torch.equal(adv, x)
    assert targets.dtype == torch.int64 and targets.tolist() == [-1] * 7


def test_attack_registry():
    assert {"clean", "pgd"} <= set(ATTACKS)
    assert isinstance(create_attacker("clean", AttackSettings(0, 16.0, 1.0)), NoOpAttacker)
    settings = AttackSettings(10, 16.0, 1.0, target=None, prob_start_from_clean=0.2)
    attacker = create_attacker("pgd", settings)
    assert isinstance(attacker, PGDAttacker)
    assert attacker.num_iter == 10 and attacker.target is None
    assert attacker.prob_start_from_clean == 0.2
    assert attacker.step_size == pytest.approx(1.6)
    with pytest.raises(ValueError, match="unknown attack 'pgdd'.*'pgd'"):
        create_attacker("pgdd", settings)


def _linear_input_grad_sign(model: LinearNet, x: torch.Tensor, classes: torch.Tensor):
    """sign of d/dx sum_i CE(W x_i / 255 + b, c_i) = sign(W^T (softmax - onehot(c)))."""
    with torch.no_grad():
        w, b = model.fc.weight, model.fc.bias
        probs = torch.softmax(x.flatten(1) / 255.0 @ w.T + b, dim=1)
        residual = probs - F.one_hot(classes, w.shape[0]).to(probs.dtype)
        return (residual @ w).reshape(x.shape).sign()


@pytest.mark.parametrize("target", ["random", None])
def test_one_step_from_clean_matches_hand_computation(target):
    torch.manual_seed(3)
    model = LinearNet(3 * 4 * 4, 5).double()
    x = torch.rand(16, 3, 4, 4, dtype=torch.float64) * 255
    x[0] = 0.0
    x[1] = 255.0
    y = torch.randint(0, 5, (16,))
    eps = 20.0
    attacker = PGDAttacker(1, eps, 1.0, prob_start_from_clean=1.0, target=target)
    adv, targets = attacker.attack(model, x, y)
    if target is None:
        expected = x + eps * _linear_input_grad_sign(model, x, y)
    else:
        expected = x - eps * _linear_input_grad_sign(model, x, targets)
    assert (expected != x).all()
    torch.testing.assert_close(adv, expected.clamp(0.0, 255.0), rtol=0.0, atol=1e-9)


def test_random_start_is_uniform_in_ball():
    model = ConstantNet(4)  # zero input gradient: PGD stays at its starting point
    x = torch.full((8, 3, 16, 16), 128.0)
    eps = 10.0
    adv, _ = PGDAttacker(2, eps, 1.0, generator=torch.Generator().manual_seed(4)).attack(
        model, x, torch.zeros(8, dtype=torch.int64)
    )
    delta = adv - x
    assert delta.abs().max() <= eps
    assert (delta != 0).float().mean() > 0.99
    assert delta.mean().abs() < 0.2  # uniform on [-eps, eps]: mean 0, std eps / sqrt(3)
    assert delta.std().item() == pytest.approx(eps / 3**0.5, rel=0.05)


def test_random_start_is_clipped_to_pixel_range():
    x = torch.zeros(4, 3, 8, 8)
    x[2:] = 255.0
    adv, _ = PGDAttacker(1, 10.0, 1.0).attack(ConstantNet(3), x, torch.zeros(4, dtype=torch.int64))
    assert adv.min() >= 0.0 and adv.max() <= 255.0
    assert (adv[:2] > 0).any() and (adv[2:] < 255).any()


def test_start_from_clean_is_decided_once_per_batch():
    model = ConstantNet(4)
    x = torch.full((6, 3, 4, 4), 100.0)
    y = torch.zeros(6, dtype=torch.int64)
    always = PGDAttacker(3, 10.0, 1.0, prob_start_from_clean=1.0)
    assert torch.equal(always.attack(model, x, y)[0], x)
    half = PGDAttacker(
        3, 10.0, 1.0, prob_start_from_clean=0.5, generator=torch.Generator().manual_seed(5)
    )
    clean_batches = 0
    for _ in range(200):
        moved = (half.attack(model, x, y)[0] != x).flatten(1).any(dim=1)
        assert moved.all() or not moved.any()  # whole batch or nothing
        clean_batches += int(not moved.any())
    assert 60 < clean_batches < 140


def test_targeted_pgd_succeeds_on_undefended_model(digits):
    model, x, y = digits["model"], digits["x"], digits["y"]
    # 8x8 digits with 16 grey levels are coarse: epsilon 64 (4 grey levels) is needed here.
    attacker = PGDAttacker(10, 64.0, 1.0, generator=torch.Generator().manual_seed(6))
    adv, targets = attacker.attack(model, x, y)
    logits = eval_logits(model, adv)
    success = attack_success(logits, y, targets).float().mean()
    assert success > 0.8  # on clean images about (1 - accuracy) / 9
    torch.testing.assert_close(success, (logits.argmax(1) == targets).float().mean())


def test_untargeted_pgd_drops_accuracy(digits):
    model, x, y = digits["model"], digits["x"], digits["y"]
    clean_acc = (eval_logits(model, x).argmax(1) == y).float().mean()
    adv, targets = PGDAttacker(10, 48.0, 1.0, target=None).attack(model, x, y)
    adv_acc = (eval_logits(model, adv).argmax(1) == y).float().mean()
    assert clean_acc > 0.9 and adv_acc < 0.2
    success = attack_success(eval_logits(model, adv), y, targets).float().mean()
    torch.testing.assert_close(success, 1.0 - adv_acc)


def test_attack_success_hand_example():
    logits = torch.tensor(
        [
            [3.0, 1.0, 0.0],  # pred 0
            [0.0, 2.0, 1.0],  # pred 1
            [0.0, 1.0, 5.0],  # pred 2
            [4.0, 0.0, 1.0],  # pred 0
            [0.0, 0.0, 9.0],  # pred 2
        ]
    )
    labels = torch.tensor([0, 0, 1, 0, 1])
    targets = torch.tensor([2, 1, -1, -1, 0])
    expected = [False, True, True, False, False]
    assert attack_success(logits, labels, targets).tolist() == expected


def test_attack_works_under_no_grad_and_inference_mode(digits):
    model, x, y = digits["model"], digits["x"][:16], digits["y"][:16]
    attacker = PGDAttacker(2, 16.0, 8.0, target=None, generator=torch.Generator().manual_seed(7))
    reference, _ = attacker.attack(model, x, y)
    for context in (torch.no_grad, torch.inference_mode):
        attacker.generator.manual_seed(7)
        with context():
            adv, _ = attacker.attack(model, x, y)
        torch.testing.assert_close(adv, reference, rtol=0.0, atol=0.0)


def test_seeded_generator_is_deterministic(digits):
    model, x, y = digits["model"], digits["x"][:32], digits["y"][:32]

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return PGDAttacker(3, 16.0, 4.0, prob_start_from_clean=0.5, generator=gen).attack(
            model, x, y
        )

    adv_a, t_a = run(8)
    adv_b, t_b = run(8)
    adv_c, t_c = run(9)
    assert torch.equal(adv_a, adv_b) and torch.equal(t_a, t_b)
    assert not (torch.equal(adv_a, adv_c) and torch.equal(t_a, t_c))
