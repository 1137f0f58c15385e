"""Model zoo: registry, TensorFlow SAME layers, denoising ops, initialisation, forward/backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import nets
from nets.blocks import ImageNormalize
from nets.layers import (
    Conv2dSame,
    MaxPool2dSame,
    Preprocess,
    bgr_pixels_to_unit_rgb,
    same_padding,
    unit_rgb_to_bgr_pixels,
)

TINY = {"num_blocks": [1, 1, 1, 1], "num_classes": 7, "width": 8}


def _tf_same_total(size: int, kernel: int, stride: int) -> int:
    """TensorFlow's documented SAME formula, written in its own (modulo) form."""
    if size % stride == 0:
        return max(kernel - stride, 0)
    return max(kernel - size % stride, 0)


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- registry and build_model ---


def test_registry_lists_the_architectures():
    assert nets.available_architectures() == [
        "ResNeXtDenoiseAll", "ResNet", "ResNetBasic", "ResNetDenoise", "ResNetV2",
        "convnext_b_cvst", "convnext_base", "convnext_l_cvst", "convnext_large",
        "convnext_s_cvst", "convnext_small", "convnext_t_cvst", "convnext_tiny",
        "resnet101", "resnet152", "resnet50",
        "swin_base_patch4_window7_224", "swin_large_patch4_window7_224",
        "swin_small_patch4_window7_224", "swin_tiny_patch4_window7_224",
        "vit_b_cvst", "vit_base_patch16_224", "vit_giant_patch14_224", "vit_huge_patch14_224",
        "vit_large_patch16_224", "vit_s_cvst", "vit_small_patch16_224",
        "wide_resnet50_2",
    ]  # fmt: skip
    assert set(nets.ARCHITECTURES) == set(nets.available_architectures())


@pytest.mark.parametrize(
    ("depth", "blocks"), [(50, (3, 4, 6, 3)), (101, (3, 4, 23, 3)), (152, (3, 8, 36, 3))]
)
def test_depth_sets_blocks_per_group(depth, blocks):
    with torch.device("meta"):
        model = nets.build_model("ResNet", depth=depth)
    assert tuple(len(getattr(model, f"group{i}")) for i in range(4)) == blocks


def test_num_blocks_overrides_depth_layout():
    model = nets.build_model("ResNet", num_blocks=[2, 1, 3, 1], num_classes=5, width=4)
    groups = [model.group0, model.group1, model.group2, model.group3]
    assert [len(group) for group in groups] == [2, 1, 3, 1]
    assert model.conv0.out_channels == 4
    assert model.linear.in_features == 4 * 8 * 4
    assert model.linear.out_features == 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "VGG", "depth": 50}, "'VGG'.*ResNeXtDenoiseAll, ResNet, ResNetBasic"),
        ({"arch": "ResNet", "depth": 34}, "34.*50, 101, 152"),
        ({"arch": "ResNet"}, "exactly one of depth and num_blocks"),
        ({"arch": "ResNet", "depth": 50, "num_blocks": [1, 1, 1, 1]}, "exactly one"),
        ({"arch": "ResNet", "num_blocks": [1, 1, 1]}, r"num_blocks.*\[1, 1, 1\]"),
        ({"arch": "ResNet", "num_blocks": [1, 0, 1, 1]}, "positive integers"),
        ({"arch": "ResNet", "depth": 50, "width": 0}, "width"),
        ({"arch": "ResNet", "depth": 50, "num_classes": 0}, "num_classes"),
        ({"arch": "ResNeXtDenoiseAll", "depth": 50, "width": 12}, "width=12"),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nets.build_model(**kwargs)


def test_register_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="'ResNet' is already registered"):
        nets.register("ResNet", depths=nets.NUM_BLOCKS)(nets.ARCHITECTURES["ResNet"])


# --- TensorFlow SAME layers ---


def test_same_padding_matches_tensorflow_formula():
    for size in range(1, 40):
        for kernel in (1, 2, 3, 5, 7):
            for stride in (1, 2, 3):
                before, after = same_padding(size, kernel, stride)
                assert before + after == _tf_same_total(size, kernel, stride)
                assert after - before in (0, 1)
    assert same_padding(224, 7, 2) == (2, 3)
    assert same_padding(112, 3, 2) == (0, 1)


@pytest.mark.parametrize("size", [8, 9, 50, 51])
@pytest.mark.parametrize(
    ("kernel", "stride", "groups"), [(7, 2, 1), (3, 2, 2), (3, 1, 1), (1, 2, 1)]
)
def test_conv2d_same_equals_explicit_tensorflow_padding(size, kernel, stride, groups):
    conv = Conv2dSame(4, 6, kernel, stride, groups)
    x = _random(2, 4, size, size + 1)
    pad_h = _tf_same_total(size, kernel, stride)
    pad_w = _tf_same_total(size + 1, kernel, stride)
    padded = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    expected = F.conv2d(padded, conv.weight, stride=stride, groups=groups)
    actual = conv(x)
    assert actual.shape[-2:] == (math.ceil(size / stride), math.ceil((size + 1) / stride))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [6, 7, 50, 51])
def test_max_pool_same_ignores_padding_like_tensorflow(size):
    x = -1.0 - _random(1, 2, size, size).abs()  # all negative: zero padding would win the max
    actual = MaxPool2dSame(3, 2)(x)
    top, _ = same_padding(size, 3, 2)
    out = math.ceil(size / 2)
    expected = torch.empty(1, 2, out, out)
    for i in range(out):
        for j in range(out):
            rows = slice(max(2 * i - top, 0), 2 * i - top + 3)
            cols = slice(max(2 * j - top, 0), 2 * j - top + 3)
            expected[:, :, i, j] = x[:, :, rows, cols].amax(dim=(2, 3))
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_preprocess_maps_pixels_to_unit_range_and_rejects_bad_input():
    x = torch.tensor([0.0, 127.5, 255.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(Preprocess()(x).flatten(), torch.tensor([-1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"3 \(BGR\) channels.*\(1, 1, 4, 4\)"):
        Preprocess()(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="torch.uint8"):
        Preprocess()(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


# --- denoising ops against naive einsum references (float64 references, float32 inputs) ---


def _naive_softmax(theta, phi, g):
    theta, phi, g = theta.double(), phi.double(), g.double()
    affinity = torch.einsum("nchw,ncyx->nhwyx", theta, phi) / math.sqrt(theta.shape[1])
    n, h, w = affinity.shape[:3]
    weights = affinity.reshape(n, h * w, h * w).softmax(dim=-1).reshape(affinity.shape)
    return torch.einsum("nhwyx,ncyx->nchw", weights, g)


def _naive_dot_product(theta, phi, g):
    theta, phi, g = theta.double(), phi.double(), g.double()
    affinity = torch.einsum("nchw,ncyx->nhwyx", theta, phi)
    return torch.einsum("nhwyx,ncyx->nchw", affinity, g) / (g.shape[2] * g.shape[3])


@pytest.mark.parametrize(("channels", "height", "width"), [(16, 3, 3), (6, 5, 7), (8, 1, 1)])
def test_softmax_nonlocal_equals_naive(channels, height, width):
    theta = _random(2, channels // 2, height, width, seed=1)
    phi = _random(2, channels // 2, height, width, seed=2)
    g = _random(2, channels, height, width, seed=3)
    actual = nets.softmax_nonlocal(theta, phi, g)
    torch.testing.assert_close(actual.double(), _naive_softmax(theta, phi, g), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("channels", "height", "width"),
    [(16, 3, 3), (40, 6, 6), (4, 5, 5), (9, 3, 3), (12, 4, 5)],
    ids=["C>HW", "C>HW-large", "C<HW", "C=HW", "C<HW-rect"],
)
def test_dot_product_nonlocal_equals_naive_in_both_orders(channels, height, width):
    x = _random(2, channels, height, width, seed=4)
    theta, phi = _random(2, 3, height, width, seed=5), _random(2, 3, height, width, seed=6)
    for inputs in ((x, x, x), (theta, phi, x)):
        actual = nets.dot_product_nonlocal(*inputs)
        expected = _naive_dot_product(*inputs)
        torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)


def _randomise_bn(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(7)
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            for tensor in (bn.weight.data, bn.bias.data, bn.running_mean):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=generator) + 0.5)


def _naive_block_output(block: nets.DenoisingBlock, x: torch.Tensor) -> torch.Tensor:
    softmax = block.op in ("embedded_gaussian", "gaussian")
    if block.embed:
        theta, phi = block.embedding_theta(x), block.embedding_phi(x)
        f = _naive_softmax(theta, phi, x) if softmax else _naive_dot_product(theta, phi, x)
    else:
        f = _naive_softmax(x, x, x) if softmax else _naive_dot_product(x, x, x)
    conv, bn = block.conv, block.conv.bn
    y = F.conv2d(f.float(), conv.weight)
    y = (y - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        bn.running_var.view(1, -1, 1, 1) + 1e-5
    )
    return x + y * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize(
    "op", ["embedded_gaussian", "gaussian", "dot_product", "embedded_dot_product"]
)
def test_denoising_block_wiring(op):
    block = nets.DenoisingBlock(12, op).eval()
    x = _random(2, 12, 5, 4, seed=8)
    assert torch.equal(block(x), x)  # zero-initialised BN gamma: the block starts as identity
    _randomise_bn(block)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _naive_block_output(block, x), rtol=1e-4, atol=1e-5)


def test_embedded_denoising_needs_even_channels():
    with pytest.raises(ValueError, match="even channel count, got 7"):
        nets.DenoisingBlock(7, "embedded_gaussian")


# --- structure and initialisation ---


def test_resnext_block_is_grouped_and_denoised():
    model = nets.build_model("ResNeXtDenoiseAll", num_blocks=[2, 1, 1, 1], width=16)
    block = model.group1.block0
    assert block.conv2.groups == 32
    assert block.conv1.out_channels == 4 * 32 and block.conv3.out_channels == 4 * 32
    assert isinstance(block.non_local, nets.DenoisingBlock) and not block.non_local.embed
    assert isinstance(model.group0.block1.convshortcut, torch.nn.Identity)


def test_stride_is_on_the_3x3_convolution():
    model = nets.build_model("ResNet", **TINY)
    block = model.group2.block0
    strides = [conv.stride for conv in (block.conv1, block.conv2, block.conv3, block.convshortcut)]
    assert strides == [(1, 1), (2, 2), (1, 1), (2, 2)]


def test_initialisation_follows_the_original():
    model = nets.build_model("ResNetDenoise", num_blocks=[1, 1, 1, 1])
    block = model.group3.block0
    assert not block.conv3.bn.weight.any()  # zero gamma on each block's last BN
    assert torch.equal(block.convshortcut.bn.weight, torch.ones(2048))
    assert torch.equal(block.conv2.bn.weight, torch.ones(512))
    assert not model.group3_denoise.conv.bn.weight.any()
    fan_out = 3 * 3 * 512  # He normal, fan_out mode: std sqrt(2 / fan_out)
    assert block.conv2.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)
    assert model.group3_denoise.embedding_theta.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert model.linear.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert not model.linear.bias.any()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.bias is None for conv in convs)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all((bn.eps, bn.momentum) == (1e-5, 0.1) for bn in norms)


# --- forward and backward of every registered architecture ---


@pytest.mark.parametrize("size", [64, 50])
@pytest.mark.parametrize("arch", nets.available_architectures())
def test_forward_backward(arch, size):
    torch.manual_seed(0)
    blocks = (1,) * nets.num_groups_of(arch)  # ViT: one stack of blocks
    model = nets.build_model(arch, **{**TINY, "num_blocks": blocks})
    _randomise_bn(model)  # zero gammas would otherwise hide the gradients of inner layers
    images = torch.rand(2, 3, size, size) * 255
    logits = model(images)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_eval_mode_is_deterministic_and_batch_independent():
    model = nets.build_model("ResNetDenoise", **TINY).eval()
    _randomise_bn(model)
    images = torch.rand(3, 3, 50, 50) * 255
    with torch.no_grad():
        together = model(images)
        alone = model(images[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [8, 9, 33])
def test_max_pool_in_channels_last_gives_the_nchw_kernels_values_and_gradients(size, dtype):
    """MaxPool2dSame pools an NCHW CPU tensor in channels-last (PyTorch's NCHW kernel is slow
    there): values and input gradients equal the NCHW kernel's, also where a window holds the
    maximum twice (ReLU's zeros, integer pixels) and the first one must get the gradient."""
    g = torch.Generator().manual_seed(size)
    for x in (
        torch.relu(torch.randn(2, 5, size, size, generator=g)),
        torch.randint(0, 3, (2, 5, size, size), generator=g).float(),
    ):
        x = x.to(dtype).requires_grad_(True)
        upstream = torch.randn(2, 5, math.ceil(size / 2), math.ceil(size / 2), generator=g)
        actual = MaxPool2dSame(3, 2)(x)
        assert type(actual.grad_fn).__name__ == "ChannelsLastMaxPoolBackward"
        (grad,) = torch.autograd.grad(actual, x, upstream.to(dtype))
        pad = _tf_same_total(size, 3, 2)
        padding = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)
        padded = F.pad(x, padding, value=float("-inf"))
        expected = torch.nn.functional.max_pool2d(padded, 3, 2)  # the NCHW kernel
        (expected_grad,) = torch.autograd.grad(expected, x, upstream.to(dtype))
        assert actual.is_contiguous() and grad.is_contiguous()
        assert torch.equal(actual, expected) and torch.equal(grad, expected_grad)


def test_one_bgr_pixels_to_unit_rgb_conversion() -> None:
    """The reference models' normalisation and the RobustBench adapters convert alike."""
    bgr = torch.randint(0, 256, (2, 3, 5, 4)).float()
    rgb = bgr_pixels_to_unit_rgb(bgr)
    assert torch.equal(rgb[:, 0], bgr[:, 2] / 255) and rgb.min() >= 0 and rgb.max() <= 1
    assert torch.equal(ImageNormalize(mean=(0, 0, 0), std=(1, 1, 1))(bgr), rgb)
    assert torch.allclose(unit_rgb_to_bgr_pixels(rgb), bgr)
