"""Layers shared by the architectures written in timm's and torchvision's layouts (ConvNeXt, ViT,
Swin, torchvision's ResNet): the input normalisation that lets them take this project's BGR
pixels, channels-first LayerNorm, stochastic depth, the transformer MLP and attention, and
gradient checkpointing over a stack of blocks.

Module and parameter names are those of the reference definitions (``mlp.fc1``, ``attn.qkv``),
so that their state dicts load by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nets.layers import bgr_pixels_to_unit_rgb, check_pixels

# The ImageNet statistics of RGB images in [0, 1] (torchvision's and timm's default).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYER_NORM_EPS = 1e-6  # timm's ConvNeXt, ViT (DeiT) and Swin (Swin: 1e-5, see nets.swin)
INIT_STD = 0.02  # truncated normal init of linear and convolution weights (timm)


class ImageNormalize(nn.Module):
    """BGR pixels in [0, 255] (this project's input) -> what the reference models were fed: RGB,
    scaled to [0, 1], minus ``mean``, divided by ``std`` (per RGB channel, on the [0, 1] scale).

    ``mean`` and ``std`` are buffers in the state dict, so a converted checkpoint carries the
    input convention its weights were trained with."""

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_pixels(x)
        rgb = bgr_pixels_to_unit_rgb(x)
        return (rgb - self.mean) / self.std


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (ConvNeXt's "channels_first" LayerNorm,
    Liu et al. 2022, Sec 2.6), as timm computes it: on the channels-last view."""

    def __init__(self, channels: int, eps: float = LAYER_NORM_EPS) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): in training, a residual branch is dropped for each
    sample with probability ``rate`` and the kept ones are scaled by 1 / (1 - rate)."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Each block's stochastic-depth rate, rising linearly from 0 to ``rate`` over all blocks
    (Huang et al. 2016, Sec 3 "linear decay"; ConvNeXt Sec 2.1 and DeiT's recipe), per stage."""
    total = sum(depths)
    rates = [rate * i / max(total - 1, 1) for i in range(total)]
    stages, start = [], 0
    for depth in depths:
        stages.append(rates[start : start + depth])
        start += depth
    return stages


class Mlp(nn.Module):
    """Linear -> GELU -> linear (the transformer feed-forward block; ConvNeXt's inverted
    bottleneck, Liu et al. 2022 Sec 2.4)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, N, 3C] -> q, k, v of [B, heads, N, C / heads]."""
    batch, tokens, _ = qkv.shape
    qkv = qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, D] -> [B, N, heads * D]."""
    return x.transpose(1, 2).flatten(2)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v (Vaswani et al. 2017, Eq. 1), by torch's fused kernel
    as timm computes it."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class Stage(nn.Module):
    """A hierarchical model's stage: its ``downsample`` layer (or the identity), then its
    ``blocks``, checkpointed or not (``run_blocks``)."""

    def __init__(self, downsample: nn.Module, blocks: nn.Sequential, checkpointed: bool) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = blocks
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks, self.downsample(x), self.checkpointed)


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """``x`` through ``blocks`` in turn; with ``checkpointed`` and gradients on, each block's
    activations are recomputed in the backward pass instead of kept (Chen et al. 2016), for
    training and attacks alike."""
    recompute = checkpointed and torch.is_grad_enabled()
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
    return x


def init_weights(model: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear and convolution weights, zero biases (timm's init of
    ConvNeXt, ViT and Swin)."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.trunc_normal_(module.weight, std=INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def scaled_width(base: int, width: int, arch: str) -> int:
    """``base`` channels scaled by ``width`` / 64 (64: the published model; smaller for tiny
    experiments, as ``--width`` shrinks the ResNets); ValueError unless it divides exactly."""
    if (base * width) % 64:
        raise ValueError(
            f"{arch}: width {width} scales its {base} channels to {base * width / 64:g}, "
            "not a whole number"
        )
    return base * width // 64
