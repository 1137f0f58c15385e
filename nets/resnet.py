"""ResNet / ResNeXt backbones with optional denoising blocks, registered as ``ResNet``,
``ResNetDenoise`` and ``ResNeXtDenoiseAll`` (``nets.registry``).

Module names follow the original TensorFlow variable scopes (``conv0``, ``group2/block5/conv3``,
``group1_denoise``, ``group3/block0/non_local``, ``linear``) so that checkpoints map one-to-one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nets.denoise import Denoise, DenoisingBlock
from nets.layers import ConvBN, GlobalAvgPool, MaxPool2dSame, Preprocess
from nets.registry import register

NUM_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
GROUP_STRIDES = (1, 2, 2, 2)
BOTTLENECK_EXPANSION = 4
# ResNeXt 32x8d (Feature Denoising, Sec 6.2): 32 groups of 8 channels at width 64, i.e. the
# bottleneck is 32 * 8 / 64 = 4 times wider than ResNet's (original: res2_bottleneck * group / 64).
RESNEXT_GROUPS = 32
RESNEXT_WIDTH_FACTOR = 4
# The original's denoising operations (Feature Denoising, Sec 6): non-local means with an
# embedded Gaussian (softmax) affinity after each group; dot product without embedding in the
# ResNeXt's every block (Sec 6.2).
NONLOCAL_GAUSSIAN = Denoise("embedded_gaussian")
NONLOCAL_DOT_PRODUCT = Denoise("dot_product")


class BlockFactory(Protocol):
    """Builds one residual block: ``factory(in_channels, ch_out, stride)``."""

    def __call__(self, in_channels: int, ch_out: int, stride: int) -> nn.Module: ...


class Bottleneck(nn.Module):
    """Bottleneck residual block: 1x1 -> 3x3 (grouped for ResNeXt) -> 1x1 to 4 * ch_out."""

    def __init__(
        self, in_channels: int, ch_out: int, stride: int, groups: int = 1, width_factor: int = 1
    ) -> None:
        super().__init__()
        mid = ch_out * width_factor
        out_channels = BOTTLENECK_EXPANSION * ch_out
        self.conv1 = ConvBN(in_channels, mid, 1)
        # ImageNet in 1 Hour, Sec 5.1: the stride sits on the 3x3 convolution, not on the 1x1.
        self.conv2 = ConvBN(mid, mid, 3, stride, groups)
        self.conv3 = ConvBN(mid, out_channels, 1, relu=False, zero_gamma=True)
        self.convshortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv3(self.conv2(self.conv1(x)))
        return F.relu(residual.add_(self.convshortcut(x)), inplace=True)


class DenoisedBottleneck(Bottleneck):
    """Bottleneck followed by a denoising block (``non_local``; the original: dot product without
    embedding).

    Feature Denoising, Sec 6.2: the winning ResNeXt101-32x8 entry adds non-local denoising
    blocks to all residual blocks.
    """

    def __init__(
        self,
        in_channels: int,
        ch_out: int,
        stride: int,
        groups: int = 1,
        width_factor: int = 1,
        denoise: Denoise = NONLOCAL_DOT_PRODUCT,
    ) -> None:
        super().__init__(in_channels, ch_out, stride, groups, width_factor)
        channels = BOTTLENECK_EXPANSION * ch_out
        self.non_local = DenoisingBlock(channels, denoise.op, denoise.window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.non_local(super().forward(x))


class ResNet(nn.Sequential):
    """ResNet backbone fed float NCHW BGR images in [0, 255]; returns logits.

    Args:
        num_blocks: residual blocks in each of the four groups.
        block: factory of one residual block.
        num_classes: outputs of the final ``linear`` layer.
        width: stem channels; the groups use ch_out = width * (1, 2, 4, 8).
        group_denoise: add a denoising block with this operation after each group
            (``groupN_denoise``; Feature Denoising, Sec 6: after res2, res3, res4 and res5).
    """

    # Sharded training (iat.train.fsdp): each residual block (its denoising block inside), and
    # each group's denoising block.
    shard_units = ("group*.block*", "group*_denoise")

    def __init__(
        self,
        num_blocks: Sequence[int],
        block: BlockFactory,
        num_classes: int = 1000,
        width: int = 64,
        group_denoise: Denoise | None = None,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["preprocess"] = Preprocess()
        layers["conv0"] = ConvBN(3, width, 7, stride=2)
        layers["pool0"] = MaxPool2dSame(3, 2)
        channels = width
        for index, (count, stride) in enumerate(zip(num_blocks, GROUP_STRIDES, strict=True)):
            ch_out = width * 2**index
            layers[f"group{index}"] = _group(block, channels, ch_out, count, stride)
            channels = BOTTLENECK_EXPANSION * ch_out
            if group_denoise is not None:
                denoise = DenoisingBlock(channels, group_denoise.op, group_denoise.window)
                layers[f"group{index}_denoise"] = denoise
        layers["gap"] = GlobalAvgPool()
        layers["linear"] = _classifier(channels, num_classes)
        super().__init__(layers)


@register("ResNet", depths=NUM_BLOCKS)
def resnet(
    num_blocks: Sequence[int], num_classes: int = 1000, width: int = 64, denoise: None = None
) -> ResNet:
    """Plain ResNet with bottleneck blocks."""
    return ResNet(num_blocks, Bottleneck, num_classes, width)


@register("ResNetDenoise", depths=NUM_BLOCKS, denoise_op=NONLOCAL_GAUSSIAN.op)
def resnet_denoise(
    num_blocks: Sequence[int],
    num_classes: int = 1000,
    width: int = 64,
    denoise: Denoise = NONLOCAL_GAUSSIAN,
) -> ResNet:
    """ResNet with a denoising block after each group (Feature Denoising, Sec 6); originally
    non-local means with an embedded Gaussian (softmax) affinity."""
    return ResNet(num_blocks, Bottleneck, num_classes, width, group_denoise=denoise)


@register("ResNeXtDenoiseAll", depths=NUM_BLOCKS, denoise_op=NONLOCAL_DOT_PRODUCT.op)
def resnext_denoise_all(
    num_blocks: Sequence[int],
    num_classes: int = 1000,
    width: int = 64,
    denoise: Denoise = NONLOCAL_DOT_PRODUCT,
) -> ResNet:
    """ResNeXt 32x8d with a denoising block after every block (Sec 6.2); originally dot-product
    non-local means without embedding."""
    if (RESNEXT_WIDTH_FACTOR * width) % RESNEXT_GROUPS:
        raise ValueError(
            f"ResNeXtDenoiseAll needs {RESNEXT_WIDTH_FACTOR} * width divisible by "
            f"{RESNEXT_GROUPS}, got width={width}"
        )
    block = partial(
        DenoisedBottleneck,
        groups=RESNEXT_GROUPS,
        width_factor=RESNEXT_WIDTH_FACTOR,
        denoise=denoise,
    )
    return ResNet(num_blocks, block, num_classes, width)


def _group(
    block: BlockFactory, in_channels: int, ch_out: int, count: int, stride: int
) -> nn.Sequential:
    """``count`` blocks named ``block0``...; only the first one strides."""
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    for index in range(count):
        blocks[f"block{index}"] = block(in_channels, ch_out, stride if index == 0 else 1)
        in_channels = BOTTLENECK_EXPANSION * ch_out
    return nn.Sequential(blocks)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Projection (1x1 conv + BN, gamma 1) when the channel count changes, else the identity.

    Like the original, the choice depends on the channels only.
    """
    if in_channels != out_channels:
        return ConvBN(in_channels, out_channels, 1, stride, relu=False)
    if stride != 1:
        raise ValueError(
            f"identity shortcut cannot stride ({in_channels} channels, stride {stride})"
        )
    return nn.Identity()


def _classifier(in_features: int, num_classes: int) -> nn.Linear:
    linear = nn.Linear(in_features, num_classes)
    # ImageNet in 1 Hour, Sec 5.1: the fully-connected layer is drawn from N(0, 0.01^2).
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return linear
