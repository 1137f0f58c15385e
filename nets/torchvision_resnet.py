"""ResNet-50/101/152 and Wide-ResNet-50-2 in torchvision's layout (``conv1``, ``bn1``,
``layer3.5.conv2``, ``layer1.0.downsample.0``, ``fc``): torchvision's ``resnet50`` ...
``wide_resnet50_2`` state dicts (and RobustBench's ImageNet ResNets, which are them) load by name
and give torchvision's logits; fed this project's BGR pixels in [0, 255] (``preprocess``).

Unlike ``nets.ResNet`` (the original's TensorFlow ``SAME`` padding) every convolution and the
max-pool pad symmetrically, as torchvision does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from nets.blocks import ImageNormalize
from nets.reference_models import register_reference
from nets.registry import Layout

# He et al. 2016, Table 1 (50 / 101 / 152 layers); Zagoruyko & Komodakis 2016 via torchvision:
# Wide-ResNet-50-2 has ResNet-50's blocks with bottlenecks twice as wide.
TORCHVISION_RESNETS: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "resnet50": ((3, 4, 6, 3), 1),
    "resnet101": ((3, 4, 23, 3), 1),
    "resnet152": ((3, 8, 36, 3), 1),
    "wide_resnet50_2": ((3, 4, 6, 3), 2),
}
EXPANSION = 4


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return [conv, nn.BatchNorm2d(out_channels)]


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (with the stride: "ResNet v1.5", ImageNet in 1 Hour Sec 5.1) -> 1x1 to
    4 * planes; a 1x1 projection shortcut (``downsample``) when the shape changes."""

    def __init__(self, in_channels: int, planes: int, stride: int, widen: int) -> None:
        super().__init__()
        mid, out = planes * widen, planes * EXPANSION
        self.conv1, self.bn1 = _conv_bn(in_channels, mid, 1)
        self.conv2, self.bn2 = _conv_bn(mid, mid, 3, stride)
        self.conv3, self.bn3 = _conv_bn(mid, out, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(*_conv_bn(in_channels, out, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(y + shortcut)


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet with bottleneck blocks.

    Args:
        num_blocks: blocks per stage (``layer1`` ... ``layer4``).
        num_classes: outputs of ``fc``.
        width: planes of ``layer1`` (64: the published models), doubled per stage.
        widen: the bottleneck's width over ``planes`` (2 for Wide-ResNet-50-2).
    """

    shard_units = ("layer*.*",)  # sharded training (iat.train.fsdp): each bottleneck block

    def __init__(
        self, num_blocks: Sequence[int], num_classes: int = 1000, width: int = 64, widen: int = 1
    ) -> None:
        super().__init__()
        self.preprocess = ImageNormalize()
        self.conv1, self.bn1 = _conv_bn(3, width, 7, 2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = width
        for index, count in enumerate(num_blocks):
            planes, stride = width * 2**index, 1 if index == 0 else 2
            blocks = []
            for b in range(count):
                blocks.append(Bottleneck(channels, planes, stride if b == 0 else 1, widen))
                channels = planes * EXPANSION
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.preprocess(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


# torchvision's tensor names: conv1 gives the width, a block's name its stage and index.
TORCHVISION_LAYOUT = Layout(
    "torchvision", "conv1.weight", 64, re.compile(r"layer(?P<stage>\d+)\.(?P<block>\d+)\.")
)


def torchvision_resnet_of(
    name: str, blocks: Sequence[int], width: int, classes: int
) -> TorchvisionResNet:
    """The ResNet TORCHVISION_RESNETS names with `blocks` per stage and `width` stem channels."""
    return TorchvisionResNet(blocks, classes, width, TORCHVISION_RESNETS[name][1])


def _register_sizes() -> None:
    for name, (blocks, _) in TORCHVISION_RESNETS.items():
        depth = int(name.removeprefix("wide_").removeprefix("resnet").split("_")[0])
        register_reference(torchvision_resnet_of, name, depth, blocks, TORCHVISION_LAYOUT)


_register_sizes()
