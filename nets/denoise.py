"""Non-local feature denoising blocks (Feature Denoising, Sec 4.2, Fig. 4 and 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nets.layers import ConvBN


def softmax_nonlocal(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gaussian (softmax) non-local means, Feature Denoising Sec 4.2.

    ``f_p = sum_q softmax_q(theta_p . phi_q / sqrt(C')) g_q`` with theta, phi of shape
    [N, C', H, W] and g of shape [N, C, H, W]; the softmax runs over the positions q (the keys).
    """
    n, c, h, w = g.shape
    query = theta.flatten(2).transpose(1, 2)
    key = phi.flatten(2).transpose(1, 2)
    value = g.flatten(2).transpose(1, 2)
    # SDPA's default scale 1/sqrt(C') is the original's division by sqrt(theta channels).
    f = F.scaled_dot_product_attention(query, key, value)
    return f.transpose(1, 2).reshape(n, c, h, w)


def dot_product_nonlocal(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Dot-product non-local means, Feature Denoising Sec 4.2.

    ``f_p = sum_q (theta_p . phi_q) g_q / HW`` with theta, phi [N, C', H, W] and g [N, C, H, W].

    The product is associative, so like the original this forms the [HW x HW] affinity only when
    there are more channels than positions, and otherwise the [C' x C] product phi g^T first.
    """
    n, c, h, w = g.shape
    positions = h * w
    theta, phi, g = theta.flatten(2), phi.flatten(2), g.flatten(2)
    if c > positions:
        affinity = theta.transpose(1, 2) @ phi
        f = g @ affinity.transpose(1, 2)
    else:
        channel_product = phi @ g.transpose(1, 2)
        f = channel_product.transpose(1, 2) @ theta
    # Feature Denoising Sec 4.2: the dot-product version normalises by the number of positions.
    return (f / positions).reshape(n, c, h, w)


class DenoisingBlock(nn.Module):
    """Residual denoising block, Feature Denoising Fig. 4: ``x + BN(conv1x1(nonlocal(x)))``.

    Args:
        channels: channels C of the input feature map.
        embed: compute theta and phi with 1x1 embedding convolutions to C/2 channels
            (``embedding_theta``, ``embedding_phi``); otherwise theta = phi = x. g is always x.
        softmax: use the Gaussian (softmax) affinity; otherwise the dot product divided by HW.
    """

    def __init__(self, channels: int, embed: bool, softmax: bool) -> None:
        super().__init__()
        if embed and channels % 2:
            raise ValueError(f"embedded denoising needs an even channel count, got {channels}")
        self.embed = embed
        self.softmax = softmax
        if embed:
            self.embedding_theta = _embedding(channels)
            self.embedding_phi = _embedding(channels)
        # Feature Denoising Fig. 4: 1x1 conv + BN after the non-local op; the BN's gamma starts at
        # zero so that the block starts as the identity.
        self.conv = ConvBN(channels, channels, 1, relu=False, zero_gamma=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed:
            theta, phi = self.embedding_theta(x), self.embedding_phi(x)
        else:
            theta, phi = x, x
        nonlocal_means = softmax_nonlocal if self.softmax else dot_product_nonlocal
        return x + self.conv(nonlocal_means(theta, phi, x))


def _embedding(channels: int) -> nn.Conv2d:
    """Bias-free 1x1 embedding convolution C -> C/2 initialised from N(0, 0.01^2)."""
    conv = nn.Conv2d(channels, channels // 2, 1, bias=False)
    # Original non_local_op: embedding kernel_initializer = random_normal_initializer(stddev=0.01).
    nn.init.normal_(conv.weight, std=0.01)
    return conv
