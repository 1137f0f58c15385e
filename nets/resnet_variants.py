"""ResNet-v2 (pre-activation) and basic-block ResNets: the architectures of the adversarial
logit pairing code (``resnet_v2_50``) and of the NIPS-2018 defense baselines (ResNet-18 on
64x64 Tiny ImageNet), in this project's conventions: float NCHW BGR pixels in [0, 255] in
(the model normalises), TensorFlow ``SAME`` padding, module names that are variable scopes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nets.layers import Conv2dSame, ConvBN, GlobalAvgPool, MaxPool2dSame, Preprocess

V2_EXPANSION = 4  # ResNet-v2 uses v1's bottleneck widths and block counts (nets.NUM_BLOCKS)
# Deep Residual Learning (He et al. 2016), Table 1: basic blocks for depths 18 and 34.
BASIC_NUM_BLOCKS: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
GROUP_STRIDES = (1, 2, 2, 2)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


class PreActBottleneck(nn.Module):
    """He et al. 2016 (Identity Mappings), Fig. 1b / 4e: BN-ReLU before each convolution; the
    shortcut is the identity, or a 1x1 projection of the pre-activated input when the shape
    changes (as TF-slim's ``bottleneck`` in resnet_v2)."""

    def __init__(self, in_channels: int, ch_out: int, stride: int) -> None:
        super().__init__()
        out_channels = V2_EXPANSION * ch_out
        self.preact = _bn(in_channels)
        self.conv1 = ConvBN(in_channels, ch_out, 1)
        self.conv2 = ConvBN(ch_out, ch_out, 3, stride)
        self.conv3 = Conv2dSame(ch_out, out_channels, 1)
        project = in_channels != out_channels or stride != 1
        self.shortcut = Conv2dSame(in_channels, out_channels, 1, stride) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.preact(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        return shortcut + self.conv3(self.conv2(self.conv1(pre)))


class BasicBlock(nn.Module):
    """He et al. 2016, Fig. 2 (left): two 3x3 convolutions; a 1x1 projection when the shape
    changes."""

    def __init__(self, in_channels: int, ch_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(in_channels, ch_out, 3, stride)
        # ImageNet in 1 Hour, Sec 5.1: the block's last BN starts with gamma 0.
        self.conv2 = ConvBN(ch_out, ch_out, 3, relu=False, zero_gamma=True)
        project = in_channels != ch_out or stride != 1
        self.convshortcut = ConvBN(in_channels, ch_out, 1, stride, relu=False) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.convshortcut is None else self.convshortcut(x)
        return F.relu(self.conv2(self.conv1(x)) + shortcut)


def _groups(block, in_channels: int, width: int, num_blocks: Sequence[int], expansion: int):
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for index, (count, stride) in enumerate(zip(num_blocks, GROUP_STRIDES, strict=True)):
        ch_out = width * 2**index
        blocks = OrderedDict()
        for b in range(count):
            blocks[f"block{b}"] = block(in_channels, ch_out, stride if b == 0 else 1)
            in_channels = expansion * ch_out
        layers[f"group{index}"] = nn.Sequential(blocks)
    return layers, in_channels


def _classifier(in_features: int, num_classes: int) -> nn.Linear:
    linear = nn.Linear(in_features, num_classes)
    nn.init.normal_(linear.weight, std=0.01)  # ImageNet in 1 Hour, Sec 5.1
    nn.init.zeros_(linear.bias)
    return linear


class ResNetV2(nn.Sequential):
    """Pre-activation ResNet (ALP's ``resnet_v2_50``): 7x7/2 convolution and 3x3/2 max-pooling
    without BN or ReLU (the blocks pre-activate), four groups of ``PreActBottleneck``, a final
    BN-ReLU (``postnorm``), global average pooling and ``linear``."""

    def __init__(self, num_blocks: Sequence[int], num_classes: int = 1000, width: int = 64):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["preprocess"] = Preprocess()
        layers["conv0"] = Conv2dSame(3, width, 7, stride=2)
        layers["pool0"] = MaxPool2dSame(3, 2)
        groups, channels = _groups(PreActBottleneck, width, width, num_blocks, V2_EXPANSION)
        layers.update(groups)
        layers["postnorm"] = _bn(channels)
        layers["postrelu"] = nn.ReLU()
        layers["gap"] = GlobalAvgPool()
        layers["linear"] = _classifier(channels, num_classes)
        super().__init__(layers)


class ResNetBasic(nn.Sequential):
    """Basic-block ResNet (18 / 34) for small images (Tiny ImageNet, ImageNet 64x64, CIFAR): a
    3x3 stride-1 stem without max-pooling, so a 64x64 input reaches the last group at 8x8."""

    def __init__(self, num_blocks: Sequence[int], num_classes: int = 1000, width: int = 64):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["preprocess"] = Preprocess()
        layers["conv0"] = ConvBN(3, width, 3)
        groups, channels = _groups(BasicBlock, width, width, num_blocks, 1)
        layers.update(groups)
        layers["gap"] = GlobalAvgPool()
        layers["linear"] = _classifier(channels, num_classes)
        super().__init__(layers)
