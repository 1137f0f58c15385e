"""Registers the architectures written in other libraries' layouts under those libraries' own
model names (timm: ``convnext_tiny``, ``vit_small_patch16_224``, ``swin_tiny_patch4_window7_224``;
torchvision: ``resnet50``, ``wide_resnet50_2``), so that ``--arch`` and
``python -m iat.convert_checkpoint --arch`` name a model the same way.

Each takes the registry's arguments: ``-d`` is its total block count (``--num-blocks`` sets the
blocks per stage, one count for ViT), ``--width`` scales every layer by width / 64 (64: the
published model; the attention heads keep their number), ``--drop-path`` and
``--grad-checkpointing`` (not the torchvision ResNets).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from nets.blocks import scaled_width
from nets.convnext import CONVNEXT_SIZES, ConvNeXt
from nets.convstem import CONVSTEM_SIZES, ConvStem
from nets.resnet import register
from nets.swin import SWIN_SIZES, SwinTransformer
from nets.torchvision_resnet import TORCHVISION_RESNETS, TorchvisionResNet
from nets.vit import VIT_SIZES, VisionTransformer

TRANSFORMER_OPTIONS = ("drop_path", "grad_checkpointing")
SOURCES = ("timm", "torchvision")


@dataclass(frozen=True)
class Layout:
    """How a registered name's state dicts are laid out, for reading a checkpoint's size."""

    source: str  # the library whose model name it is (SOURCES)
    stem: str  # the first layer's weight: its output channels give the width
    channels: int  # those channels in the published model (width 64)
    block: re.Pattern  # a block's tensor names: its stage (absent: one stack) and its index

    def size_of(self, keys: Sequence[str], shapes: dict) -> tuple[tuple[int, ...], int] | None:
        """(blocks per stage, width) of a state dict with `keys` (`shapes`: key -> shape), or
        None when its stem or blocks are not found."""
        counts: dict[int, int] = {}
        for key in keys:
            found = self.block.match(key)
            if found:
                stage = int(found.groupdict().get("stage") or 0)
                counts[stage] = max(counts.get(stage, 0), int(found["block"]) + 1)
        stem = shapes.get(self.stem)
        if not counts or stem is None or (stem[0] * 64) % self.channels:
            return None
        return tuple(counts[stage] for stage in sorted(counts)), stem[0] * 64 // self.channels


_CONVNEXT_BLOCK = re.compile(r"stages\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\.")
_VIT_BLOCK = re.compile(r"blocks\.(?P<block>\d+)\.")
_SWIN_BLOCK = re.compile(r"layers\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\.")
_TORCHVISION_BLOCK = re.compile(r"layer(?P<stage>\d+)\.(?P<block>\d+)\.")
_PATCH_EMBED = "patch_embed.proj.weight"
# Every registered name of another library's layout.
LAYOUTS: dict[str, Layout] = {
    **{
        n: Layout("timm", "stem.0.weight", c, _CONVNEXT_BLOCK)
        for n, (_, c) in CONVNEXT_SIZES.items()
    },
    **{n: Layout("timm", _PATCH_EMBED, c, _VIT_BLOCK) for n, (_, c, _) in VIT_SIZES.items()},
    **{n: Layout("timm", _PATCH_EMBED, c, _SWIN_BLOCK) for n, (_, c, _) in SWIN_SIZES.items()},
    **{
        n: Layout("torchvision", "conv1.weight", 64, _TORCHVISION_BLOCK)
        for n in TORCHVISION_RESNETS
    },
}


def _convstem_layout(name: str) -> Layout:
    """The base model's layout, the width read from the ConvStem's last convolution."""
    base, convs, projection = CONVSTEM_SIZES[name]
    last = 3 * len(convs) if projection else 3 * (len(convs) - 1)  # conv, LayerNorm, GELU
    prefix = "patch_embed.proj" if base in VIT_SIZES else "stem"
    stem, channels = f"{prefix}.stem.{last}.weight", projection or convs[-1][0]
    return Layout(LAYOUTS[base].source, stem, channels, LAYOUTS[base].block)


LAYOUTS.update({name: _convstem_layout(name) for name in CONVSTEM_SIZES})
# (name, blocks per stage, width, classes, options) -> model
Family = Callable[..., nn.Module]


def _convnext(name: str, blocks: Sequence[int], width: int, classes: int, **options) -> ConvNeXt:
    dim = scaled_width(CONVNEXT_SIZES[name][1], width, name)
    return ConvNeXt(blocks, [dim * 2**i for i in range(len(blocks))], classes, **options)


def _vit(name: str, blocks: Sequence[int], width: int, classes: int, **options) -> nn.Module:
    _, dim, heads = VIT_SIZES[name]
    return VisionTransformer(blocks[0], scaled_width(dim, width, name), heads, classes, **options)


def _swin(name: str, blocks: Sequence[int], width: int, classes: int, **options) -> nn.Module:
    _, dim, heads = SWIN_SIZES[name]
    return SwinTransformer(blocks, scaled_width(dim, width, name), heads, classes, **options)


def _convstem(name: str, blocks: Sequence[int], width: int, classes: int, **options) -> nn.Module:
    """The timm model CONVSTEM_SIZES names, its stem replaced by a ConvStem (Singh et al.)."""
    base, convs, projection = CONVSTEM_SIZES[name]
    scaled = [(scaled_width(out, width, name), stride) for out, stride in convs]
    stem = ConvStem(scaled, projection and scaled_width(projection, width, name))
    family = _vit if base in VIT_SIZES else _convnext
    return family(base, blocks, width, classes, stem=stem, **options)


def _torchvision(name: str, blocks: Sequence[int], width: int, classes: int) -> nn.Module:
    return TorchvisionResNet(blocks, classes, width, TORCHVISION_RESNETS[name][1])


def _builder(family: Family, name: str) -> Callable[..., nn.Module]:
    """The registry's builder ``(num_blocks, num_classes, width, denoise, **options)``."""

    def build(
        num_blocks: Sequence[int],
        num_classes: int = 1000,
        width: int = 64,
        denoise: None = None,
        **options: object,
    ) -> nn.Module:
        return family(name, num_blocks, width, num_classes, **options)

    return build


def _register(family: Family, name: str, depth: int, blocks: tuple[int, ...], options=()) -> None:
    register(name, depths={depth: blocks}, options=options)(_builder(family, name))


for _name, (_blocks, _) in CONVNEXT_SIZES.items():
    _register(_convnext, _name, sum(_blocks), _blocks, TRANSFORMER_OPTIONS)
for _name, (_depth, _, _) in VIT_SIZES.items():
    _register(_vit, _name, _depth, (_depth,), TRANSFORMER_OPTIONS)
for _name, (_blocks, _, _) in SWIN_SIZES.items():
    _register(_swin, _name, sum(_blocks), _blocks, TRANSFORMER_OPTIONS)
for _name, (_base, _, _) in CONVSTEM_SIZES.items():
    _blocks = CONVNEXT_SIZES[_base][0] if _base in CONVNEXT_SIZES else (VIT_SIZES[_base][0],)
    _register(_convstem, _name, sum(_blocks), _blocks, TRANSFORMER_OPTIONS)
for _name, (_blocks, _) in TORCHVISION_RESNETS.items():
    _depth = int(_name.removeprefix("wide_").removeprefix("resnet").split("_")[0])
    _register(_torchvision, _name, _depth, _blocks)
