"""ResNet-v2 (pre-activation, ALP's resnet_v2_50) and basic-block ResNets for small images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nets
from main import main


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
    v2 = _group_outputs(nets.build_model("ResNetV2", depth=50, num_classes=10), 64)
    assert v2["group3"] == (2048, 2, 2)  # the ImageNet stem: /4, then /2 three times


def test_resnet_v2_blocks_pre_activate() -> None:
    model = nets.build_model("ResNetV2", num_blocks=[2, 1, 1, 1], width=8, num_classes=3).eval()
    first, second = model.group0.block0, model.group0.block1
    assert first.shortcut is not None and second.shortcut is None  # projection only on change
    # Independently: BN-ReLU first, then the residual branch, added to the identity.
    x = torch.randn(2, 32, 8, 8)
    pre = torch.relu(second.preact(x))
    expected = x + second.conv3(second.conv2(second.conv1(pre)))
    assert torch.allclose(second(x), expected)
    assert isinstance(model.postnorm, torch.nn.BatchNorm2d)  # the final BN-ReLU of v2


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
