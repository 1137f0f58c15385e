"""ResNet-v2 (pre-activation) and basic-block ResNets: the architectures of the adversarial
logit pairing code (``resnet_v2_50``) and of the NIPS-2018 defense baselines (ResNet-18 on
64x64 Tiny ImageNet), in this project's conventions: float NCHW BGR pixels in [0, 255] in
(the model normalises), module names that are variable scopes.

``ResNetV2`` is TF-slim's ``nets/resnet_v2.py`` exactly (its padding, strides, biases and
shortcuts), so that ALP's checkpoints convert without changing the logits (``iat.convert.alp``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nets.layers import Conv2dSame, ConvBN, GlobalAvgPool, MaxPool2dSame, Preprocess
from nets.registry import register
from nets.resnet import NUM_BLOCKS

V2_EXPANSION = 4  # ResNet-v2 uses v1's bottleneck widths and block counts (nets.NUM_BLOCKS)
# Deep Residual Learning (He et al. 2016), Table 1: basic blocks for depths 18 and 34.
BASIC_NUM_BLOCKS: dict[int, tuple[int, int, int, int]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
GROUP_STRIDES = (1, 2, 2, 2)  # on the first block of each group
# TF-slim resnet_v2_50 (resnet_v2_block): blocks 1-3 halve the resolution in their LAST unit,
# block4 keeps it (the stem's /4 and these /8 give v1's nominal stride 32).
V2_GROUP_STRIDES = (2, 2, 2, 1)


def _bn(channels: int) -> nn.BatchNorm2d:
    # TF-slim resnet_arg_scope: batch_norm_epsilon=1e-5, batch_norm_scale=True (a gamma).
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


class PreActBottleneck(nn.Module):
    """TF-slim's ``bottleneck`` of resnet_v2 (He et al. 2016, Identity Mappings, Fig. 1b):
    ``preact`` = BN-ReLU of the input; 1x1 conv-BN-ReLU, 3x3 conv-BN-ReLU with the unit's stride
    (``conv2d_same`` padding), 1x1 conv with a bias and no BN; added to the shortcut."""

    def __init__(self, in_channels: int, ch_out: int, stride: int) -> None:
        super().__init__()
        out_channels = V2_EXPANSION * ch_out
        self.stride = stride
        self.preact = _bn(in_channels)
        self.conv1 = ConvBN(in_channels, ch_out, 1)
        self.conv2 = ConvBN(ch_out, ch_out, 3, stride, fixed_padding=True)
        self.conv3 = Conv2dSame(ch_out, out_channels, 1, bias=True)
        # TF-slim decides by the depth alone: an unchanged depth keeps the raw input, subsampled
        # when the unit strides; else a 1x1 projection (with a bias) of the pre-activated input.
        project = in_channels != out_channels
        self.shortcut = (
            Conv2dSame(in_channels, out_channels, 1, stride, bias=True) if project else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.preact(x))
        if self.shortcut is None:
            # resnet_utils.subsample: a 1x1 max-pool with the stride, i.e. every stride-th pixel.
            shortcut = x[..., :: self.stride, :: self.stride]
        else:
            shortcut = self.shortcut(pre)
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


def _first_unit_strides(num_blocks: Sequence[int]) -> list[tuple[int, ...]]:
    """Each block's stride: the first block of a group strides (He et al. 2016, Table 1)."""
    return [
        (stride,) + (1,) * (count - 1)
        for count, stride in zip(num_blocks, GROUP_STRIDES, strict=True)
    ]


def _last_unit_strides(num_blocks: Sequence[int]) -> list[tuple[int, ...]]:
    """Each unit's stride as TF-slim's ``resnet_v2_block``: the last unit of a group strides."""
    return [
        (1,) * (count - 1) + (stride,)
        for count, stride in zip(num_blocks, V2_GROUP_STRIDES, strict=True)
    ]


def _groups(block, in_channels: int, width: int, strides: list[tuple[int, ...]], expansion: int):
    """``group{i}/block{j}`` modules, block j of group i with stride ``strides[i][j]``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for index, group_strides in enumerate(strides):
        ch_out = width * 2**index
        blocks = OrderedDict()
        for b, stride in enumerate(group_strides):
            blocks[f"block{b}"] = block(in_channels, ch_out, stride)
            in_channels = expansion * ch_out
        layers[f"group{index}"] = nn.Sequential(blocks)
    return layers, in_channels


def _classifier(in_features: int, num_classes: int) -> nn.Linear:
    linear = nn.Linear(in_features, num_classes)
    nn.init.normal_(linear.weight, std=0.01)  # ImageNet in 1 Hour, Sec 5.1
    nn.init.zeros_(linear.bias)
    return linear


class ResNetV2(nn.Sequential):
    """TF-slim's ``resnet_v2`` (ALP's ``resnet_v2_50`` at depth 50, width 64): the root block
    ``conv0`` (slim's ``conv1``: 7x7/2, ``conv2d_same`` padding, a bias, no BN or ReLU) and 3x3/2
    max-pooling (``SAME``, as resnet_arg_scope sets it); four groups of ``PreActBottleneck``,
    the last unit of groups 0-2 striding; ``postnorm`` BN-ReLU, the spatial mean and ``linear``
    (slim's 1x1 ``logits`` convolution with a bias)."""

    shard_units = ("group*.block*",)  # sharded training (iat.train.fsdp): each residual unit

    def __init__(self, num_blocks: Sequence[int], num_classes: int = 1000, width: int = 64):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["preprocess"] = Preprocess()
        layers["conv0"] = Conv2dSame(3, width, 7, stride=2, bias=True, fixed_padding=True)
        layers["pool0"] = MaxPool2dSame(3, 2)
        strides = _last_unit_strides(num_blocks)
        groups, channels = _groups(PreActBottleneck, width, width, strides, V2_EXPANSION)
        layers.update(groups)
        layers["postnorm"] = _bn(channels)
        layers["postrelu"] = nn.ReLU()
        layers["gap"] = GlobalAvgPool()
        layers["linear"] = _classifier(channels, num_classes)
        super().__init__(layers)


class ResNetBasic(nn.Sequential):
    """Basic-block ResNet (18 / 34) for small images (Tiny ImageNet, ImageNet 64x64, CIFAR): a
    3x3 stride-1 stem without max-pooling, so a 64x64 input reaches the last group at 8x8."""

    shard_units = ("group*.block*",)  # sharded training (iat.train.fsdp): each residual block

    def __init__(self, num_blocks: Sequence[int], num_classes: int = 1000, width: int = 64):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["preprocess"] = Preprocess()
        layers["conv0"] = ConvBN(3, width, 3)
        strides = _first_unit_strides(num_blocks)
        groups, channels = _groups(BasicBlock, width, width, strides, 1)
        layers.update(groups)
        layers["gap"] = GlobalAvgPool()
        layers["linear"] = _classifier(channels, num_classes)
        super().__init__(layers)


@register("ResNetV2", depths=NUM_BLOCKS)
def resnet_v2(
    num_blocks: Sequence[int], num_classes: int = 1000, width: int = 64, denoise: None = None
) -> ResNetV2:
    """Pre-activation ResNet (Identity Mappings, He et al. 2016), ALP's ``resnet_v2_50``."""
    return ResNetV2(num_blocks, num_classes, width)


@register("ResNetBasic", depths=BASIC_NUM_BLOCKS)
def resnet_basic(
    num_blocks: Sequence[int], num_classes: int = 1000, width: int = 64, denoise: None = None
) -> ResNetBasic:
    """Basic-block ResNet (18 / 34) with a stem for small images (64x64 and below)."""
    return ResNetBasic(num_blocks, num_classes, width)
