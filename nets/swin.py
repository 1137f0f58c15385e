"""Swin Transformer (Liu, Lin, Cao, Hu, Wei, Zhang, Lin, Guo, "Swin Transformer: Hierarchical
Vision Transformer using Shifted Windows", ICCV 2021) in timm's layout (``patch_embed.proj``,
``layers.1.downsample.reduction``, ``layers.2.blocks.3.attn.relative_position_bias_table``,
``head.fc``): timm's ``swin_tiny_patch4_window7_224`` ... ``swin_large_patch4_window7_224``
state dicts load by name and give timm's logits; fed this project's BGR pixels in [0, 255]
(``preprocess``).

Windows are sized at run time from each stage's resolution, as timm sizes them from its
``img_size``: a stage no larger than the window attends over all of it, unshifted. Such a
smaller window reads the relative position bias of the same offsets from the 7x7 window's table
(timm instead resamples the table when built for such a size); at 224 pixels every stage has
its 7x7 window.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nets.blocks import (
    DropPath,
    ImageNormalize,
    Mlp,
    Stage,
    attention,
    drop_path_rates,
    init_weights,
    merge_heads,
    scaled_width,
    split_heads,
)
from nets.reference_models import TRANSFORMER_OPTIONS, register_reference
from nets.registry import Layout

# Liu et al. 2021, Sec 3.3: blocks per stage, first-stage channels C and heads per stage of
# Swin-T / S / B / L (window 7, ImageNet-1K at 224).
SWIN_SIZES: dict[str, tuple[tuple[int, int, int, int], int, tuple[int, int, int, int]]] = {
    "swin_tiny_patch4_window7_224": ((2, 2, 6, 2), 96, (3, 6, 12, 24)),
    "swin_small_patch4_window7_224": ((2, 2, 18, 2), 96, (3, 6, 12, 24)),
    "swin_base_patch4_window7_224": ((2, 2, 18, 2), 128, (4, 8, 16, 32)),
    "swin_large_patch4_window7_224": ((2, 2, 18, 2), 192, (6, 12, 24, 48)),
}
WINDOW = 7  # Sec 3.3: M = 7
PATCH = 4  # Sec 3.1: 4x4 patches
MLP_RATIO = 4  # Sec 3.3: alpha = 4
MASKED = -100.0  # the attention logit of pairs from different regions of a shifted window


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """[N, N] rows of the (2 * WINDOW - 1)^2 bias table for each pair of a window's N positions
    (Sec 3.2, "Relative position bias": offsets in [-M + 1, M - 1] on each axis)."""
    rows, cols = torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])
    offsets = coords[:, :, None] - coords[:, None, :] + (WINDOW - 1)
    return offsets[0] * (2 * WINDOW - 1) + offsets[1]


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """[B, H, W, C] -> [B * windows, window area, C], windows in row order per image."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window[0], window[0], width // window[1], window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], channels)


def window_reverse(
    x: torch.Tensor, window: tuple[int, int], height: int, width: int
) -> torch.Tensor:
    """The inverse of ``window_partition``: [B * windows, area, C] -> [B, H, W, C]."""
    channels = x.shape[-1]
    x = x.view(-1, height // window[0], width // window[1], window[0], window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def shifted_window_mask(
    size: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """[windows, N, N] additive mask of the shifted windows (Sec 3.2, "Efficient batch
    computation for shifted configuration", Fig. 4): after the cyclic shift a window can hold
    pixels of up to 4 regions that were not adjacent; pairs from different regions get -100."""
    regions = torch.zeros(1, size[0], size[1], 1, device=device)
    label = 0
    for rows in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for cols in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            regions[:, rows[0] : rows[1], cols[0] : cols[1], :] = label
            label += 1
    labels = window_partition(regions, window).squeeze(-1)
    different = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, MASKED)


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows, with a learned bias per head for each relative
    position (Sec 3.2, Eq. 4)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * WINDOW - 1) ** 2, heads))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, window: tuple[int, int], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``x``: [B * windows, N, C]; ``mask``: [windows, N, N] or None."""
        index = relative_position_index(window).to(x.device)
        bias = self.relative_position_bias_table[index].permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            windows, tokens = mask.shape[0], x.shape[1]
            per_window = bias.unsqueeze(1) + mask.view(1, windows, 1, tokens, tokens)
            bias = per_window.expand(x.shape[0] // windows, -1, -1, -1, -1).flatten(0, 1)
        q, k, v = split_heads(self.qkv(x), self.heads)
        return self.proj(merge_heads(attention(q, k, v, bias)))


class SwinBlock(nn.Module):
    """(S)W-MSA and MLP, each pre-normed and residual (Sec 3.1, Eq. 3); ``shifted`` blocks (every
    second one) move the window grid by half a window (Sec 3.2)."""

    def __init__(self, dim: int, heads: int, shifted: bool, drop_path: float = 0.0) -> None:
        super().__init__()
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, MLP_RATIO * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._window_attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1], x.shape[2]
        window = (min(height, WINDOW), min(width, WINDOW))
        shift = tuple(
            0 if not self.shifted or s <= WINDOW else WINDOW // 2 for s in (height, width)
        )
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        pad = (-height % window[0], -width % window[1])
        x = F.pad(x, (0, 0, 0, pad[1], 0, pad[0]))
        size = (height + pad[0], width + pad[1])
        mask = shifted_window_mask(size, window, shift, x.device) if any(shift) else None
        out = self.attn(window_partition(x, window), window, mask)
        x = window_reverse(out, window, *size)[:, :height, :width]
        return torch.roll(x, shifts=shift, dims=(1, 2)) if any(shift) else x


class PatchMerging(nn.Module):
    """Each 2x2 neighbourhood concatenated (4C), normalised and linearly reduced to 2C
    (Sec 3.1, "Patch Merging")."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = x.reshape(batch, (height + 1) // 2, 2, (width + 1) // 2, 2, channels)
        # The original's order x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2].
        x = x.permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


def swin_stage(
    in_dim: int, dim: int, heads: int, rates: Sequence[float], checkpointed: bool
) -> Stage:
    """Patch merging (not in the first stage), then blocks alternating W-MSA and SW-MSA."""
    downsample = PatchMerging(in_dim) if in_dim != dim else nn.Identity()
    blocks = nn.Sequential(
        *(SwinBlock(dim, heads, i % 2 == 1, rate) for i, rate in enumerate(rates))
    )
    return Stage(downsample, blocks, checkpointed)


class PatchEmbed(nn.Module):
    """4x4 patches linearly embedded and normalised, channels last: [B, H/4, W/4, C]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH, PATCH)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinHead(nn.Module):
    """Global average pooling of the channels-last map, then the classifier ``fc``."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(1, 2)))


class SwinTransformer(nn.Module):
    """Swin fed float NCHW BGR images in [0, 255]; returns logits.

    Args:
        depths: blocks per stage.
        dim: first-stage channels (doubled by each patch merging).
        heads: attention heads per stage.
        num_classes: outputs of ``head.fc``.
        drop_path: the last block's stochastic-depth rate (linear from 0).
        grad_checkpointing: recompute each block's activations in the backward pass.
    """

    # Sharded training (iat.train.fsdp): each block, and each stage's patch merging.
    shard_units = ("layers.*.downsample", "layers.*.blocks.*")

    def __init__(
        self,
        depths: Sequence[int],
        dim: int,
        heads: Sequence[int],
        num_classes: int = 1000,
        drop_path: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        dims = [dim * 2**i for i in range(len(depths))]
        if any(d % h for d, h in zip(dims, heads, strict=True)):
            raise ValueError(f"Swin: stage widths {dims} are not divisible by heads {list(heads)}")
        self.preprocess = ImageNormalize()
        self.patch_embed = PatchEmbed(dim)
        rates = drop_path_rates(drop_path, depths)
        in_dims = (dims[0], *dims[:-1])
        self.layers = nn.Sequential(
            *(
                swin_stage(*args, grad_checkpointing)
                for args in zip(in_dims, dims, heads, rates, strict=True)
            )
        )
        self.norm = nn.LayerNorm(dims[-1])
        self.head = SwinHead(dims[-1], num_classes)
        init_weights(self)
        for stage in self.layers:
            for block in stage.blocks:
                nn.init.trunc_normal_(block.attn.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.layers(self.patch_embed(self.preprocess(x))))
        return self.head(x)


# timm's tensor names: the patch projection gives the width, a block's name its stage and index.
SWIN_STEM = "patch_embed.proj.weight"
SWIN_BLOCK = re.compile(r"layers\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\.")


def swin_of(name: str, blocks: Sequence[int], width: int, classes: int, **options) -> nn.Module:
    """The Swin SWIN_SIZES names with `blocks` per stage, scaled by `width` / 64."""
    _, dim, heads = SWIN_SIZES[name]
    return SwinTransformer(blocks, scaled_width(dim, width, name), heads, classes, **options)


def _register_sizes() -> None:
    for name, (blocks, dim, _) in SWIN_SIZES.items():
        layout = Layout("timm", SWIN_STEM, dim, SWIN_BLOCK)
        register_reference(swin_of, name, sum(blocks), blocks, layout, TRANSFORMER_OPTIONS)


_register_sizes()
