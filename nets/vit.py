"""Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021) in the
DeiT / timm layout (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.3.attn.qkv``,
``norm``, ``head``): timm's ``vit_small_patch16_224`` ... ``vit_large_patch16_224``,
``vit_huge_patch14_224`` and ``vit_giant_patch14_224`` state dicts load by name and give timm's
logits; fed this project's BGR pixels in [0, 255] (``preprocess``)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nets.blocks import (
    LAYER_NORM_EPS,
    DropPath,
    ImageNormalize,
    Mlp,
    attention,
    drop_path_rates,
    init_weights,
    merge_heads,
    run_blocks,
    scaled_width,
    split_heads,
)
from nets.reference_models import TRANSFORMER_OPTIONS, register_reference
from nets.registry import Layout

PATCH = 16
TRAIN_SIZE = 224  # the checkpoints' resolution: pos_embed holds (224 / patch)^2 + 1 positions
MLP_RATIO = 4.0  # Sec 3.1: MLP hidden width 4x (Table 1: 1536 / 384, 3072 / 768, 4096 / 1024)


class ViTSize(NamedTuple):
    """A published ViT's size, as timm's model function gives it."""

    depth: int  # transformer blocks
    dim: int  # embedding width
    heads: int  # attention heads
    patch: int = PATCH  # side of the square patches, in pixels
    mlp_ratio: float = MLP_RATIO  # MLP hidden width / dim (timm's Block: int(dim * mlp_ratio))


VIT_SIZES: dict[str, ViTSize] = {
    # Dosovitskiy et al. 2021, Table 1 (Base, Large) and DeiT (Touvron et al. 2021, Table 1,
    # Small): ViT-S/16, ViT-B/16, ViT-L/16.
    "vit_small_patch16_224": ViTSize(12, 384, 6),
    "vit_base_patch16_224": ViTSize(12, 768, 12),
    "vit_large_patch16_224": ViTSize(24, 1024, 16),
    # Dosovitskiy et al. 2021, Table 1 (Huge: 32 layers, width 1280, MLP 5120, 16 heads) at the
    # patch size of its best models (Table 2, ViT-H/14).
    "vit_huge_patch14_224": ViTSize(32, 1280, 16, patch=14),
    # Zhai et al., "Scaling Vision Transformers", CVPR 2022, ViT-g/14: 40 layers, width 1408,
    # MLP 6144, 16 heads. timm states the MLP as the ratio 48 / 11 (6144 / 1408) and takes
    # int(dim * ratio); kept as that float so that every --width rounds as timm's does (at
    # --width 40, int(880 * (48 / 11)) = 3839, not 3840).
    "vit_giant_patch14_224": ViTSize(40, 1408, 16, patch=14, mlp_ratio=48 / 11),
}


class Attention(nn.Module):
    """Multi-head self-attention: one ``qkv`` projection (with bias), ``proj`` after."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(self.qkv(x), self.heads)
        return self.proj(merge_heads(attention(q, k, v)))


class Block(nn.Module):
    """Pre-norm transformer block (Sec 3.1, Eq. 2-3): x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self, dim: int, heads: int, drop_path: float = 0.0, mlp_ratio: float = MLP_RATIO
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # timm's rounding of the hidden width
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping `patch` x `patch` patches, each linearly projected (Sec 3.1), or another
    ``proj`` of that stride (``nets.convstem.ConvStem``, 16): the [B, dim, H / patch,
    W / patch] map of tokens (rounded down, as a strided convolution does)."""

    def __init__(self, dim: int, proj: nn.Module | None = None, patch: int = PATCH) -> None:
        super().__init__()
        self.proj = proj or nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The patch positions of ``pos_embed`` (class token first) resampled to ``grid`` (bicubic,
    as timm's ``resample_abs_pos_embed``; Sec 3.2 "Fine-tuning and higher resolution": 2D
    interpolation of the pre-trained position embeddings); unchanged when it already fits."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    side = math.isqrt(patch_pos.shape[1])
    if (side, side) == grid:
        return pos_embed
    patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", antialias=True)
    return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)


class VisionTransformer(nn.Module):
    """ViT fed float NCHW BGR images in [0, 255]; returns logits from the class token.

    Any input size (divisible by the patch, else the last pixels are unused): the position
    embeddings of the 224-pixel grid are interpolated to its grid.

    Args:
        depth: transformer blocks.
        dim: embedding width.
        heads: attention heads.
        num_classes: outputs of ``head``.
        drop_path: the last block's stochastic-depth rate (linear from 0).
        grad_checkpointing: recompute each block's activations in the backward pass.
        stem: replaces the patch projection (``nets.convstem.ConvStem``, stride 16, to ``dim``).
        patch: side of the square patches (16; 14 for ViT-H/14 and ViT-g/14).
        mlp_ratio: MLP hidden width / ``dim``; the hidden width is ``int(dim * mlp_ratio)``.
    """

    shard_units = ("blocks.*",)  # sharded training (iat.train.fsdp): each transformer block

    def __init__(
        self,
        depth: int,
        dim: int,
        heads: int,
        num_classes: int = 1000,
        drop_path: float = 0.0,
        grad_checkpointing: bool = False,
        stem: nn.Module | None = None,
        patch: int = PATCH,
        mlp_ratio: float = MLP_RATIO,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT: width {dim} is not divisible by its {heads} heads")
        self.preprocess = ImageNormalize()
        self.patch_embed = PatchEmbed(dim, stem, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (TRAIN_SIZE // patch) ** 2 + 1, dim))
        (rates,) = drop_path_rates(drop_path, [depth])
        self.blocks = nn.Sequential(*(Block(dim, heads, rate, mlp_ratio) for rate in rates))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(dim, num_classes)
        self.checkpointed = grad_checkpointing
        init_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.patch_embed(self.preprocess(x))
        grid = (features.shape[2], features.shape[3])
        tokens = features.flatten(2).transpose(1, 2)
        # Sec 3.1, Eq. 1: a learnable class token before the patches, position embeddings added.
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + resize_pos_embed(self.pos_embed, grid)
        tokens = self.norm(run_blocks(self.blocks, tokens, self.checkpointed))
        return self.head(tokens[:, 0])  # Eq. 4: the class token's final state classifies


# timm's tensor names: the patch projection gives the width, a block's name its index.
VIT_STEM = "patch_embed.proj.weight"
VIT_BLOCK = re.compile(r"blocks\.(?P<block>\d+)\.")


def vit_of(name: str, blocks: Sequence[int], width: int, classes: int, **options) -> nn.Module:
    """The ViT VIT_SIZES names with ``blocks[0]`` blocks, scaled by `width` / 64."""
    size = VIT_SIZES[name]
    dim = scaled_width(size.dim, width, name)
    return VisionTransformer(
        blocks[0], dim, size.heads, classes, patch=size.patch, mlp_ratio=size.mlp_ratio, **options
    )


def _register_sizes() -> None:
    for name, size in VIT_SIZES.items():
        layout = Layout("timm", VIT_STEM, size.dim, VIT_BLOCK)
        register_reference(vit_of, name, size.depth, (size.depth,), layout, TRANSFORMER_OPTIONS)


_register_sizes()
