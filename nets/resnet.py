"""ResNet / ResNeXt backbones with optional denoising blocks, and the architecture registry.

Module names follow the original TensorFlow variable scopes (``conv0``, ``group2/block5/conv3``,
``group1_denoise``, ``group3/block0/non_local``, ``linear``) so that checkpoints map one-to-one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nets.denoise import DEFAULT_WINDOW, DenoisingBlock, check_denoise_op
from nets.layers import ConvBN, GlobalAvgPool, MaxPool2dSame, Preprocess

NUM_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
GROUP_STRIDES = (1, 2, 2, 2)
BOTTLENECK_EXPANSION = 4
MODEL_OPTIONS = ("drop_path", "grad_checkpointing")  # keyword options a builder may take
# ResNeXt 32x8d (Feature Denoising, Sec 6.2): 32 groups of 8 channels at width 64, i.e. the
# bottleneck is 32 * 8 / 64 = 4 times wider than ResNet's (original: res2_bottleneck * group / 64).
RESNEXT_GROUPS = 32
RESNEXT_WIDTH_FACTOR = 4


class BlockFactory(Protocol):
    """Builds one residual block: ``factory(in_channels, ch_out, stride)``."""

    def __call__(self, in_channels: int, ch_out: int, stride: int) -> nn.Module: ...


@dataclass(frozen=True)
class Denoise:
    """The denoising operation of an architecture's blocks (a ``nets.denoise.DENOISE_OPS`` name)
    and its window size (local ops only)."""

    op: str
    window: int = DEFAULT_WINDOW


ModelBuilder = Callable[..., nn.Module]  # (num_blocks, num_classes, width, denoise, **options)
ARCHITECTURES: dict[str, ModelBuilder] = {}
DEPTHS: dict[str, dict[int, tuple[int, ...]]] = {}  # arch -> depth -> num_blocks
# The keyword options each builder takes besides the four (e.g. "drop_path",
# "grad_checkpointing"); build_model refuses an option the architecture lacks.
OPTIONS: dict[str, tuple[str, ...]] = {}
# Each architecture's original denoising operation (None: it has no denoising blocks); old
# checkpoints were trained with it, so it stays the default.
DEFAULT_DENOISE_OPS: dict[str, str | None] = {}


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
        denoise: Denoise = Denoise("dot_product"),
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


def register(
    name: str,
    denoise_op: str | None = None,
    depths: Mapping[int, tuple[int, ...]] = NUM_BLOCKS,
    options: Sequence[str] = (),
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding a model builder ``(num_blocks, num_classes, width, denoise) -> model``;
    `denoise_op` is its original denoising operation (None: no denoising blocks, and the builder
    always receives ``denoise=None``); `depths` maps each ``-d`` to its blocks per group (every
    entry with the same number of groups); `options` the keyword options it also takes
    (``MODEL_OPTIONS``)."""

    def add(builder: ModelBuilder) -> ModelBuilder:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        unknown = set(options) - set(MODEL_OPTIONS)
        if unknown:
            raise ValueError(f"architecture {name!r}: unknown options {sorted(unknown)}")
        ARCHITECTURES[name] = builder
        DEFAULT_DENOISE_OPS[name] = denoise_op
        DEPTHS[name] = dict(depths)
        OPTIONS[name] = tuple(options)
        return builder

    return add


def num_groups_of(arch: str) -> int:
    """How many counts ``--num-blocks`` takes for `arch` (its groups or stages)."""
    return len(next(iter(DEPTHS[arch].values())))


def options_of(arch: str) -> tuple[str, ...]:
    """The ``MODEL_OPTIONS`` `arch` takes."""
    return OPTIONS[arch]


def depths_of(arch: str) -> tuple[int, ...]:
    """The depths ``-d`` accepts for `arch`."""
    return tuple(DEPTHS[arch])


def num_blocks_of(arch: str, depth: int) -> tuple[int, ...]:
    """Blocks per group of `arch` at `depth`; ValueError naming the valid depths."""
    if depth not in DEPTHS[arch]:
        valid = ", ".join(map(str, DEPTHS[arch]))
        raise ValueError(f"unknown depth {depth!r} for {arch}; valid depths: {valid}")
    return DEPTHS[arch][depth]


def available_architectures() -> list[str]:
    """Names accepted by ``build_model``."""
    return sorted(ARCHITECTURES)


@register("ResNet")
def resnet(
    num_blocks: Sequence[int], num_classes: int = 1000, width: int = 64, denoise: None = None
) -> ResNet:
    """Plain ResNet with bottleneck blocks."""
    return ResNet(num_blocks, Bottleneck, num_classes, width)


@register("ResNetDenoise", denoise_op="embedded_gaussian")
def resnet_denoise(
    num_blocks: Sequence[int],
    num_classes: int = 1000,
    width: int = 64,
    denoise: Denoise = Denoise("embedded_gaussian"),
) -> ResNet:
    """ResNet with a denoising block after each group (Feature Denoising, Sec 6); originally
    non-local means with an embedded Gaussian (softmax) affinity."""
    return ResNet(num_blocks, Bottleneck, num_classes, width, group_denoise=denoise)


@register("ResNeXtDenoiseAll", denoise_op="dot_product")
def resnext_denoise_all(
    num_blocks: Sequence[int],
    num_classes: int = 1000,
    width: int = 64,
    denoise: Denoise = Denoise("dot_product"),
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


def build_model(
    arch: str,
    depth: int | None = None,
    num_blocks: Sequence[int] | None = None,
    num_classes: int = 1000,
    width: int = 64,
    denoise_op: str | None = None,
    denoise_window: int = DEFAULT_WINDOW,
    drop_path: float = 0.0,
    grad_checkpointing: bool = False,
) -> nn.Module:
    """Builds a registered architecture; give exactly one of ``depth`` and ``num_blocks``.

    ``denoise_op`` (a ``nets.DENOISE_OPS`` name) replaces the denoising operation of an
    architecture with denoising blocks (None: its original one, ``DEFAULT_DENOISE_OPS``);
    ``denoise_window`` is the window of the local ops (bilateral, mean, median);
    ``drop_path`` (the last block's stochastic-depth rate) and ``grad_checkpointing`` only for
    architectures that take them (``options_of``)."""
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {arch!r}; available: {', '.join(available_architectures())}"
        )
    blocks = _resolve_num_blocks(arch, depth, num_blocks)
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("width", width)
    denoise = resolve_denoise(arch, denoise_op, denoise_window)
    options = model_options(arch, drop_path, grad_checkpointing)
    return ARCHITECTURES[arch](blocks, num_classes, width, denoise, **options)


def model_options(
    arch: str | None, drop_path: float = 0.0, grad_checkpointing: bool = False
) -> dict[str, object]:
    """The options set (not at their defaults), as `arch`'s builder takes them; ValueError for
    an option `arch` lacks (None: not known yet, not checked) or a rate outside [0, 1)."""
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"the drop rate must be in [0, 1), got {drop_path}")
    given = {"drop_path": drop_path, "grad_checkpointing": grad_checkpointing}
    given = {name: value for name, value in given.items() if value}
    lacking = [name for name in given if arch is not None and name not in OPTIONS[arch]]
    if lacking:
        takers = [name for name, options in sorted(OPTIONS.items()) if lacking[0] in options]
        raise ValueError(
            f"{arch} has no {lacking[0].replace('_', ' ')} option; "
            f"architectures with it: {', '.join(takers)}"
        )
    return given


def resolve_denoise(arch: str, denoise_op: str | None, denoise_window: int) -> Denoise | None:
    """The denoising `arch` gets: `denoise_op` or its original op; None for an architecture
    without denoising blocks. ValueError for an op given to such an architecture, an unknown op
    or a bad window."""
    default = DEFAULT_DENOISE_OPS[arch]
    if default is None:
        if denoise_op is not None or denoise_window != DEFAULT_WINDOW:
            with_blocks = [name for name, op in sorted(DEFAULT_DENOISE_OPS.items()) if op]
            raise ValueError(
                f"{arch} has no denoising blocks to set an operation for; "
                f"use one of {', '.join(with_blocks)}"
            )
        return None
    op = denoise_op or default
    check_denoise_op(op, denoise_window)
    return Denoise(op, denoise_window)


def _resolve_num_blocks(
    arch: str, depth: int | None, num_blocks: Sequence[int] | None
) -> tuple[int, ...]:
    if (depth is None) == (num_blocks is None):
        raise ValueError(
            f"give exactly one of depth and num_blocks, got depth={depth}, num_blocks={num_blocks}"
        )
    if num_blocks is None:
        return num_blocks_of(arch, depth)
    blocks = tuple(num_blocks)
    valid = all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in blocks)
    groups = num_groups_of(arch)
    if len(blocks) != groups or not valid:
        raise ValueError(
            f"num_blocks of {arch} must be {groups} positive integers, got {list(num_blocks)}"
        )
    return blocks


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


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


# Registered here (not in nets/resnet_variants.py) so that the registry is complete on import.
from nets.resnet_variants import (  # noqa: E402
    BASIC_NUM_BLOCKS,
    ResNetBasic,
    ResNetV2,
)


@register("ResNetV2")
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


# The architectures in timm's and torchvision's layouts, under those libraries' names.
import nets.reference_models  # noqa: E402, F401
