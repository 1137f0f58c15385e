"""BatchNorm folded into its convolution during attacks (issue 24): the same function up to
float rounding, only inside ``attack_mode``, and never seen by training or checkpoints."""

from __future__ import annotations

import pytest
import torch

import nets
from adv_model import PGDAttacker, attack_mode
from nets.layers import ConvBN


def _randomise_batchnorms(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones are the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(0.2 + torch.rand(n, generator=g) * 2)


def _small_resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = nets.build_model("ResNet", num_blocks=(1, 1, 1, 1), num_classes=10, width=8)
    _randomise_batchnorms(model, 1)
    return model


def _conv_bns(model: torch.nn.Module) -> list[ConvBN]:
    return [m for m in model.modules() if isinstance(m, ConvBN)]


@pytest.mark.parametrize(
    ("kernel", "stride", "groups", "side"),
    [(3, 2, 1, 10), (7, 2, 1, 9), (3, 1, 4, 8), (1, 2, 1, 6)],
)
def test_a_folded_convbn_computes_its_eval_mode_function(kernel, stride, groups, side):
    torch.manual_seed(2)
    layer = ConvBN(8, 12, kernel, stride, groups)
    _randomise_batchnorms(layer, 3)
    layer.eval()
    x = torch.randn(3, 8, side, side) * 20
    with torch.no_grad():
        expected = layer(x)
        layer.fold_batchnorm()
        folded = layer(x)
    assert layer.folded is not None
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-4)
    # An independent computation: convolution, then the affine map of the statistics.
    bn = layer.bn
    with torch.no_grad():
        conv = torch.nn.functional.conv2d(
            torch.nn.functional.pad(x, _tf_same(side, kernel, stride)), layer.weight, None,
            stride, 0, 1, groups,
        )  # fmt: skip
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        by_hand = (conv - bn.running_mean[:, None, None]) * scale[:, None, None]
        by_hand = torch.relu(by_hand + bn.bias[:, None, None])
    torch.testing.assert_close(folded, by_hand, rtol=1e-5, atol=1e-4)


def _tf_same(side: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TensorFlow's SAME padding (left, right, top, bottom), computed independently."""
    out = -(-side // stride)
    total = max((out - 1) * stride + kernel - side, 0)
    return total // 2, total - total // 2, total // 2, total - total // 2


def test_folding_happens_inside_attack_mode_only_and_leaves_no_state():
    model = _small_resnet()
    keys, buffers = list(model.state_dict()), len(list(model.buffers()))
    model.train()
    with attack_mode(model):
        assert all(m.folded is not None for m in _conv_bns(model))
        with attack_mode(model):  # nested: the outer fold stays
            pass
        assert all(m.folded is not None for m in _conv_bns(model))
    assert all(m.folded is None for m in _conv_bns(model))
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert list(model.state_dict()) == keys and len(list(model.buffers())) == buffers


def test_the_attack_is_unchanged_within_rounding_and_training_sees_the_batchnorm(monkeypatch):
    model = _small_resnet()
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 255
    labels = torch.arange(6) % 10

    def run() -> torch.Tensor:
        attacker = PGDAttacker(4, 8.0, 2.0, target=None, generator=torch.Generator().manual_seed(5))
        return attacker.attack(model, images, labels)[0]

    folded = run()
    with monkeypatch.context() as m:
        m.setattr(ConvBN, "fold_batchnorm", lambda self, low_precision=None: None)
        plain = run()
    differ = (folded != plain).float().mean().item()
    assert differ < 0.001, f"{differ:.2%} of the pixels differ"  # sign flips of ~0 gradients
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(folded), model(plain), rtol=0, atol=1e-3)

    # Training mode after the attack: batch statistics, and the running ones updated.
    model.train()
    before = [m.bn.running_mean.clone() for m in _conv_bns(model)]
    model(images)
    after = [m.bn.running_mean for m in _conv_bns(model)]
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_each_attack_folds_the_current_weights():
    """Each entry folds anew: after the weights and the statistics change (a training step),
    the attack sees the new ones."""
    model = _small_resnet()
    x = torch.rand(2, 3, 32, 32) * 255
    with attack_mode(model):
        pass
    _randomise_batchnorms(model, 7)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    with torch.no_grad(), attack_mode(model):
        folded = model(x)
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-3)


def test_folding_under_inference_mode_then_attacking_with_gradients():
    """A fold inside torch.inference_mode makes ordinary tensors: an attack that needs
    gradients runs after it without error."""
    model = _small_resnet()
    images, labels = torch.rand(2, 3, 32, 32) * 255, torch.tensor([1, 2])
    with torch.inference_mode(), attack_mode(model):
        model(images)
    attacker = PGDAttacker(2, 8.0, 4.0, target=None, generator=torch.Generator().manual_seed(0))
    adv, _ = attacker.attack(model, images, labels)
    assert (adv - images).abs().max() <= 8 + 1e-4


def test_an_autocast_attack_casts_the_folded_weights_once():
    """attack_mode(model, bf16) keeps bf16 copies of the folded weights: forward passes under
    autocast use them (the values autocast's own cast would give: the logits are identical),
    fp32 passes the fp32 ones."""
    model = _small_resnet()
    x = torch.rand(2, 3, 32, 32) * 255
    with torch.no_grad(), attack_mode(model, torch.bfloat16):
        layer = _conv_bns(model)[0]
        assert layer.folded_low[0].dtype == torch.bfloat16
        assert layer.folded[0].dtype == torch.float32
        fp32 = model(x)
        assert fp32.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer._folded_for(x) is layer.folded_low
            cast_once = model(x)
            for m in _conv_bns(model):
                m.folded_low = None  # autocast casts the fp32 folded weights itself
            cast_each_call = model(x)
    assert torch.equal(cast_once, cast_each_call)
    torch.testing.assert_close(cast_once.float(), fp32, rtol=0.05, atol=0.5)
    assert all(m.folded_low is None and m.folded is None for m in _conv_bns(model))
