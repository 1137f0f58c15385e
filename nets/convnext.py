"""ConvNeXt (Liu, Mao, Wu, Feichtenhofer, Darrell, Xie, "A ConvNet for the 2020s", CVPR 2022) in
timm's layout (``stem.0``, ``stages.1.downsample.1``, ``stages.2.blocks.4.conv_dw``,
``head.fc``): timm's ``convnext_tiny`` ... ``convnext_large`` state dicts load by name and give
timm's logits; fed this project's BGR pixels in [0, 255] (``preprocess``)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from nets.blocks import (
    LAYER_NORM_EPS,
    DropPath,
    ImageNormalize,
    LayerNorm2d,
    Mlp,
    Stage,
    drop_path_rates,
    init_weights,
    scaled_width,
)
from nets.reference_models import TRANSFORMER_OPTIONS, register_reference
from nets.registry import Layout

# Liu et al. 2022, Sec 2.2 / Table 9: blocks per stage and first-stage channels (doubled at each
# stage) of ConvNeXt-T / S / B / L.
CONVNEXT_SIZES: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "convnext_tiny": ((3, 3, 9, 3), 96),
    "convnext_small": ((3, 3, 27, 3), 96),
    "convnext_base": ((3, 3, 27, 3), 128),
    "convnext_large": ((3, 3, 27, 3), 192),
}
LAYER_SCALE_INIT = 1e-6  # Sec 2.6 / Appendix A.1: layer scale (Touvron et al. 2021) at 1e-6
KERNEL = 7  # Sec 2.5: 7x7 depthwise convolution
MLP_RATIO = 4  # Sec 2.4: inverted bottleneck, 4x wider
PATCH = 4  # Sec 2.2: "patchify" stem, 4x4 non-overlapping convolution


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv -> LayerNorm -> 1x1 (linear) 4x expansion -> GELU -> 1x1 back, scaled
    per channel by ``gamma`` (layer scale) and added to the input (Liu et al. 2022, Fig. 4)."""

    def __init__(self, dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, KERNEL, padding=KERNEL // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, MLP_RATIO * dim)
        self.gamma = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # channels last for the norm and the MLP
        y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)
        return x + self.drop_path(y.mul(self.gamma.reshape(1, -1, 1, 1)))


def convnext_stage(in_dim: int, dim: int, rates: Sequence[float], checkpointed: bool) -> Stage:
    """A downsampling layer (LayerNorm + 2x2 stride-2 conv, Sec 2.6; none in the first stage)
    and the stage's blocks."""
    downsample: nn.Module = nn.Identity()
    if in_dim != dim:
        downsample = nn.Sequential(LayerNorm2d(in_dim), nn.Conv2d(in_dim, dim, 2, 2))
    blocks = nn.Sequential(*(ConvNeXtBlock(dim, rate) for rate in rates))
    return Stage(downsample, blocks, checkpointed)


class ConvNeXtHead(nn.Module):
    """Global average pooling, LayerNorm, the classifier ``fc`` (timm's NormMlpClassifierHead)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x.mean(dim=(2, 3))))


class ConvNeXt(nn.Module):
    """ConvNeXt fed float NCHW BGR images in [0, 255]; returns logits.

    Args:
        depths: blocks per stage.
        dims: channels per stage.
        num_classes: outputs of ``head.fc``.
        drop_path: the last block's stochastic-depth rate (linear from 0).
        grad_checkpointing: recompute each block's activations in the backward pass.
        stem: replaces the patchify stem (``nets.convstem.ConvStem``); it must bring the image
            to ``dims[0]`` channels at a quarter of its side.
    """

    # Sharded training (iat.train.fsdp): each block, and each stage's downsampling layer.
    shard_units = ("stages.*.downsample", "stages.*.blocks.*")

    def __init__(
        self,
        depths: Sequence[int],
        dims: Sequence[int],
        num_classes: int = 1000,
        drop_path: float = 0.0,
        grad_checkpointing: bool = False,
        stem: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.preprocess = ImageNormalize()
        self.stem = stem or nn.Sequential(nn.Conv2d(3, dims[0], PATCH, PATCH), LayerNorm2d(dims[0]))
        rates = drop_path_rates(drop_path, depths)
        in_dims = (dims[0], *dims[:-1])
        self.stages = nn.Sequential(
            *(
                convnext_stage(i, d, r, grad_checkpointing)
                for i, d, r in zip(in_dims, dims, rates, strict=True)
            )
        )
        self.head = ConvNeXtHead(dims[-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(self.preprocess(x))))


# timm's tensor names: the stem's convolution gives the width, a block's name its stage and index.
CONVNEXT_STEM = "stem.0.weight"
CONVNEXT_BLOCK = re.compile(r"stages\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\.")


def convnext_of(name: str, blocks: Sequence[int], width: int, classes: int, **options) -> ConvNeXt:
    """The ConvNeXt CONVNEXT_SIZES names with `blocks` per stage, scaled by `width` / 64."""
    dim = scaled_width(CONVNEXT_SIZES[name][1], width, name)
    return ConvNeXt(blocks, [dim * 2**i for i in range(len(blocks))], classes, **options)


def _register_sizes() -> None:
    for name, (blocks, channels) in CONVNEXT_SIZES.items():
        layout = Layout("timm", CONVNEXT_STEM, channels, CONVNEXT_BLOCK)
        register_reference(convnext_of, name, sum(blocks), blocks, layout, TRANSFORMER_OPTIONS)


_register_sizes()
