"""ResNet-v2 (pre-activation, ALP's resnet_v2_50) and basic-block ResNets for small images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nets
from main import main
from nets.layers import Conv2dSame


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("depth", "expected"), [(18, 11_681_832), (34, 21_789_992)])
def test_basic_resnets_have_the_reference_size(depth: int, expected: int) -> None:
    # Independently: torchvision's resnet18 / resnet34 (11,689,512 / 21,797,672 parameters)
    # less their 7x7 stem convolution (9,408), plus this 3x3 stem for small images (1,728).
    model = nets.build_model("ResNetBasic", depth=depth, num_classes=1000)
    assert _parameters(model) == expected


def test_depths_are_per_architecture() -> None:
    assert nets.depths_of("ResNetBasic") == (18, 34)
    assert nets.depths_of("ResNetV2") == (50, 101, 152)
    assert nets.num_blocks_of("ResNetV2", 101) == (3, 4, 23, 3)
    with pytest.raises(ValueError, match="unknown depth 50 for ResNetBasic; valid depths: 18, 34"):
        nets.build_model("ResNetBasic", depth=50)


def _group_outputs(model: torch.nn.Module, size: int) -> dict[str, tuple[int, ...]]:
    shapes = {}

    def record(name: str):
        def hook(_module, _inputs, output) -> None:
            shapes[name] = tuple(output.shape[1:])

        return hook

    hooks = [
        getattr(model, f"group{g}").register_forward_hook(record(f"group{g}")) for g in range(4)
    ]
    model(torch.rand(1, 3, size, size) * 255)
    for hook in hooks:
        hook.remove()
    return shapes


def test_small_image_stem_keeps_resolution() -> None:
    shapes = _group_outputs(nets.build_model("ResNetBasic", depth=18, num_classes=10), 64)
    assert shapes == {
        "group0": (64, 64, 64), "group1": (128, 32, 32),
        "group2": (256, 16, 16), "group3": (512, 8, 8),
    }  # fmt: skip


def test_resnet_v2_strides_in_the_last_unit_of_groups_0_to_2() -> None:
    # TF-slim resnet_v2_50 at 64x64: the root's /4 gives 16x16; block1-3 halve it in their last
    # unit (16 -> 8 -> 4 -> 2), block4 keeps 2x2.
    v2 = _group_outputs(nets.build_model("ResNetV2", depth=50, num_classes=10), 64)
    assert v2 == {
        "group0": (256, 8, 8), "group1": (512, 4, 4),
        "group2": (1024, 2, 2), "group3": (2048, 2, 2),
    }  # fmt: skip
    model = nets.build_model("ResNetV2", num_blocks=[2, 2, 1, 1], width=8, num_classes=3)
    assert [b.stride for b in model.group0] == [1, 2] and [b.stride for b in model.group1] == [1, 2]
    assert model.group3.block0.stride == 1


def test_resnet_v2_has_the_slim_variables() -> None:
    # resnet_v2_50's variable count: conv1 and logits (weights, biases); per unit preact, conv1
    # and conv2 BN (4 each), three convolution kernels, conv3's biases; plus the shortcut
    # projection (weights, biases) of each group's first unit; postnorm (4).
    model = nets.build_model("ResNetV2", depth=50)
    tensors = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    units = sum(nets.num_blocks_of("ResNetV2", 50))
    assert len(tensors) == 2 + 2 + units * (3 * 4 + 3 + 1) + 4 * 2 + 4
    assert model.conv0.bias is not None and model.group0.block0.conv3.bias is not None
    assert model.group0.block0.conv2.bias is None  # a BN follows
    # Independently, by hand from resnet_v2.py: slim's resnet_v2_50 with 1000 classes has
    # 25,568,360 trainable parameters.
    assert _parameters(model) == 25_568_360


def test_resnet_v2_blocks_pre_activate() -> None:
    model = nets.build_model("ResNetV2", num_blocks=[2, 1, 1, 1], width=8, num_classes=3).eval()
    first, second = model.group0.block0, model.group0.block1
    assert first.shortcut is not None and second.shortcut is None  # projection only on new depth
    # Independently: BN-ReLU first, then the residual branch, added to the raw input,
    # subsampled by the unit's stride (the second unit of group0 strides 2).
    x = torch.randn(2, 32, 8, 8)
    pre = torch.relu(second.preact(x))
    expected = x[:, :, ::2, ::2] + second.conv3(second.conv2(second.conv1(pre)))
    assert torch.allclose(second(x), expected)
    assert isinstance(model.postnorm, torch.nn.BatchNorm2d)  # the final BN-ReLU of v2


def test_conv2d_same_pads_like_slim() -> None:
    # resnet_utils.conv2d_same: 3x3 stride 2 on an even size pads 1 before and 1 after (TF's
    # SAME would pad 0 before and 1 after), so output pixel 0 sees input pixels -1, 0 and 1.
    conv = Conv2dSame(1, 1, 3, stride=2, fixed_padding=True)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 1, 3).expand(1, 1, 3, 3))
    x = torch.zeros(1, 1, 4, 4)
    x[..., 1, :] = torch.arange(1.0, 5.0)  # one row, columns 1..4
    row = conv(x)[0, 0, 0]  # output row 0 covers input rows -1, 0, 1
    assert row.tolist() == [0 * 1 + 1 * 10 + 2 * 100, 2 * 1 + 3 * 10 + 4 * 100]


@pytest.mark.parametrize(("arch", "size"), [("ResNetBasic", ["-d", "18"]), ("ResNetV2", [])])
def test_train_then_evaluate_from_the_recorded_architecture(
    arch: str, size: list[str], tiny_imagenet: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    flags = size or ["--num-blocks", "1", "1", "1", "1"]
    assert main(["--data", str(tiny_imagenet), "--logdir", str(run), "--arch", arch, *flags,
                 "--width", "8", "--image-size", "32", "--batch", "4", "--workers", "0",
                 "--loader", "local", "--attack-iter", "1", "--steps-per-epoch", "1",
                 "--epochs", "1", "--train-eval", "none"]) == 0  # fmt: skip
    out = tmp_path / "eval.json"
    assert main(["--eval", "--load", str(run / "checkpoint-epoch0001.pt"), "--data",
                 str(tiny_imagenet), "--image-size", "32", "--workers", "0", "--attack-iter",
                 "0", "--eval-output", str(out)]) == 0  # fmt: skip
    record = json.loads(out.read_text())
    assert record["arch"] == arch and record["images"] == 7
    model = nets.build_model(arch, **({"depth": 18} if size else {"num_blocks": [1, 1, 1, 1]}),
                             width=8, num_classes=3)  # fmt: skip
    nets.load_weights(model, run / "checkpoint-epoch0001.pt")  # the same names, strictly
    exported = tmp_path / "weights.npz"
    nets.save_npz(model, exported)  # and the original format round-trips
    again = nets.build_model(arch, **({"depth": 18} if size else {"num_blocks": [1, 1, 1, 1]}),
                             width=8, num_classes=3)  # fmt: skip
    nets.load_weights(again, exported)
    restored = again.state_dict()
    for name, value in model.state_dict().items():
        if not name.endswith("num_batches_tracked"):  # not a variable of the original format
            assert torch.equal(value, restored[name]), name
