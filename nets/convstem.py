"""ConvStem (Singh, Croce & Hein, "Revisiting Adversarial Training for ImageNet: Architectures,
Training and Generalization across Threat Models", NeurIPS 2023, Sec 3.1): a stack of 3x3
convolutions, each followed by LayerNorm and GELU, in place of the patchify stem of ConvNeXt and
ViT. Laid out as the authors' release (nmndeep/revisiting-at, ``rb_architecture_util.py``):
``stem.stem.N`` in a ConvNeXt, ``patch_embed.proj.stem.N`` in a ViT, so their checkpoints load
by name (``python -m iat.convert_checkpoint --source timm --arch convnext_t_cvst``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nets.blocks import LayerNorm2d, scaled_width
from nets.convnext import CONVNEXT_SIZES, convnext_of
from nets.reference_models import TRANSFORMER_OPTIONS, register_reference
from nets.registry import LAYOUTS, Layout
from nets.vit import VIT_SIZES, vit_of

KERNEL = 3

# The authors' model names -> (the timm model whose stem is replaced, each 3x3 convolution's
# output channels and stride, the 1x1 projection's output channels or None). ConvNeXt-T / S:
# two stride-2 convolutions to the first stage's width (their ConvBlock1(48)); B / L: a third,
# stride-1 convolution (ConvBlock3(64), ConvBlock3(96)); ViT: four stride-2 convolutions and a
# 1x1 projection to the embedding width (ConvBlock(48)).
CONVSTEM_SIZES: dict[str, tuple[str, tuple[tuple[int, int], ...], int | None]] = {
    "convnext_t_cvst": ("convnext_tiny", ((48, 2), (96, 2)), None),
    "convnext_s_cvst": ("convnext_small", ((48, 2), (96, 2)), None),
    "convnext_b_cvst": ("convnext_base", ((64, 2), (96, 2), (128, 1)), None),
    "convnext_l_cvst": ("convnext_large", ((96, 2), (144, 2), (192, 1)), None),
    "vit_s_cvst": ("vit_small_patch16_224", ((48, 2), (96, 2), (192, 2), (384, 2)), 384),
    "vit_b_cvst": ("vit_base_patch16_224", ((48, 2), (96, 2), (192, 2), (384, 2)), 768),
}


class ConvStem(nn.Module):
    """3x3 convolutions (padding 1, with bias), each followed by a channels-first LayerNorm and
    GELU, then optionally a 1x1 convolution; module ``stem``."""

    def __init__(self, convs: Sequence[tuple[int, int]], projection: int | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out, stride in convs:
            conv = nn.Conv2d(channels, out, KERNEL, stride, KERNEL // 2)
            layers += [conv, LayerNorm2d(out), nn.GELU()]
            channels = out
        if projection is not None:
            layers.append(nn.Conv2d(channels, projection, 1))
        self.stem = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


def convstem_model_of(
    name: str, blocks: Sequence[int], width: int, classes: int, **options
) -> nn.Module:
    """The timm model CONVSTEM_SIZES names, its stem replaced by a ConvStem (Singh et al.)."""
    base, convs, projection = CONVSTEM_SIZES[name]
    scaled = [(scaled_width(out, width, name), stride) for out, stride in convs]
    stem = ConvStem(scaled, projection and scaled_width(projection, width, name))
    family = vit_of if base in VIT_SIZES else convnext_of
    return family(base, blocks, width, classes, stem=stem, **options)


def _layout(name: str) -> Layout:
    """The base model's layout, the width read from the ConvStem's last convolution."""
    base, convs, projection = CONVSTEM_SIZES[name]
    last = 3 * len(convs) if projection else 3 * (len(convs) - 1)  # conv, LayerNorm, GELU
    prefix = "patch_embed.proj" if base in VIT_SIZES else "stem"
    stem, channels = f"{prefix}.stem.{last}.weight", projection or convs[-1][0]
    return Layout(LAYOUTS[base].source, stem, channels, LAYOUTS[base].block)


def _register_sizes() -> None:
    for name, (base, _, _) in CONVSTEM_SIZES.items():
        blocks = CONVNEXT_SIZES[base][0] if base in CONVNEXT_SIZES else (VIT_SIZES[base][0],)
        layout = _layout(name)
        register_reference(
            convstem_model_of, name, sum(blocks), blocks, layout, TRANSFORMER_OPTIONS
        )


_register_sizes()
