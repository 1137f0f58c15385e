"""Feature denoising blocks and their registry of denoising operations.

Feature Denoising (Xie et al., CVPR 2019), Sec 4: a denoising block is ``x + BN(conv1x1(D(x)))``
(Fig. 4) where the denoising operation D is one of Sec 4.1's: non-local means with a Gaussian
(softmax) or dot-product affinity, with or without embedding; the bilateral filter (non-local
means restricted to a local window); the mean filter; the median filter. Sec 6.3 (the ablation)
compares them. ``DENOISE_OPS`` maps each name to its operation; ``DenoisingBlock`` wraps one.

Local operations (bilateral, mean, median) use a ``window`` x ``window`` neighbourhood Omega(i)
(Sec 4.1: "e.g., a 3x3 patch") that covers only positions inside the feature map: at the border
the window is cut, as TensorFlow's SAME pooling does, rather than filled with made-up values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nets.layers import ConvBN

DEFAULT_WINDOW = 3  # Feature Denoising Sec 4.1 ("e.g., a 3x3 patch") and its Sec 6.3 ablation: 3x3


@dataclass(frozen=True)
class Denoise:
    """The denoising operation of an architecture's blocks (a ``DENOISE_OPS`` name) and its
    window size (local ops only)."""

    op: str
    window: int = DEFAULT_WINDOW


def softmax_nonlocal(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gaussian (softmax) non-local means, Feature Denoising Sec 4.1, Eqn. (1).

    ``f_p = sum_q softmax_q(theta_p . phi_q / sqrt(C')) g_q`` with theta, phi of shape
    [N, C', H, W] and g of shape [N, C, H, W]; the softmax runs over the positions q (the keys).
    """
    n, c, h, w = g.shape
    # [N, 1 head, HW, C]: the 4-d layout SDPA's fused CUDA kernels take (3-d runs unfused).
    query = theta.flatten(2).transpose(1, 2).unsqueeze(1)
    key = phi.flatten(2).transpose(1, 2).unsqueeze(1)
    value = g.flatten(2).transpose(1, 2).unsqueeze(1)
    # SDPA's default scale 1/sqrt(C') is the original's division by sqrt(theta channels).
    f = F.scaled_dot_product_attention(query, key, value)
    return f.squeeze(1).transpose(1, 2).reshape(n, c, h, w)


def dot_product_nonlocal(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Dot-product non-local means, Feature Denoising Sec 4.1.

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
    # Feature Denoising Sec 4.1: the dot-product version normalises by the number of positions.
    return (f / positions).reshape(n, c, h, w)


def bilateral_filter(
    theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor, window: int
) -> torch.Tensor:
    """Bilateral filter with a Gaussian (softmax) affinity, Feature Denoising Sec 4.1, Eqn. (2).

    ``f_p = sum_{q in Omega(p)} softmax_q(theta_p . phi_q / sqrt(C')) g_q``: Eqn. (1)'s weights
    restricted to the ``window`` x ``window`` neighbourhood Omega(p) inside the map.
    """
    n, c, h, w = g.shape
    keys = _windows(phi, window)  # [N, C', K, HW], K = window^2
    values = _windows(g, window)  # [N, C, K, HW]
    inside = _windows(torch.ones_like(g[:1, :1]), window)[0, 0] > 0  # [K, HW]
    # Same scale as the non-local Gaussian: 1/sqrt(C') (the original's non_local_op).
    affinity = torch.einsum("ncp,nckp->nkp", theta.flatten(2), keys) / theta.shape[1] ** 0.5
    weights = affinity.masked_fill(~inside, float("-inf")).softmax(dim=1)
    return torch.einsum("nkp,nckp->ncp", weights, values).reshape(n, c, h, w)


def mean_filter(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean filter, Feature Denoising Sec 4.1: "average pooling with a stride of 1" over the
    window's positions inside the map (TensorFlow's SAME average pooling)."""
    return F.avg_pool2d(x, window, stride=1, padding=window // 2, count_include_pad=False)


def median_filter(x: torch.Tensor, window: int) -> torch.Tensor:
    """Median filter, Feature Denoising Sec 4.1: ``f_p = median{x_q : q in Omega(p)}`` per channel.

    Positions outside the map are left out (NaN padding, ``nanmedian``); where an even number
    remains (corners, edges) this is the lower of the two middle values, torch's convention. The
    gradient flows to the selected element only.
    """
    n, c, h, w = x.shape
    return _windows(x, window, fill=float("nan")).nanmedian(dim=2).values.reshape(n, c, h, w)


def _windows(x: torch.Tensor, window: int, fill: float = 0.0) -> torch.Tensor:
    """Every position's ``window`` x ``window`` neighbourhood: [N, C, H, W] -> [N, C, K, HW].

    Positions outside the map hold ``fill``."""
    n, c = x.shape[:2]
    pad = window // 2
    padded = F.pad(x, (pad, pad, pad, pad), value=fill) if pad else x
    return F.unfold(padded, window).reshape(n, c, window * window, -1)


@dataclass(frozen=True)
class DenoiseOp:
    """One denoising operation: what it computes from (theta, phi, g) and which variables its
    block has.

    ``means(theta, phi, g, window)``: theta = phi = g = x when the op does not embed.
    """

    embed: bool  # theta and phi from 1x1 embedding convs to C/2 channels, else theta = phi = x
    local: bool  # uses a window x window neighbourhood (the window size applies)
    means: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def _nonlocal(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A non-local ``fn(theta, phi, g)`` as a ``DenoiseOp.means`` (no window)."""
    return lambda theta, phi, g, window: fn(theta, phi, g)


def _filter(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A filter ``fn(x, window)`` of the features as a ``DenoiseOp.means``."""
    return lambda theta, phi, g, window: fn(g, window)


# Feature Denoising Sec 4.1 (operations) and Sec 6.3 (their ablation).
DENOISE_OPS: dict[str, DenoiseOp] = {
    # Non-local means, Eqn. (1): embedded Gaussian (softmax; ResNetDenoise's original), Gaussian
    # on the raw features, dot product (ResNeXtDenoiseAll's original), embedded dot product.
    "embedded_gaussian": DenoiseOp(True, False, _nonlocal(softmax_nonlocal)),
    "gaussian": DenoiseOp(False, False, _nonlocal(softmax_nonlocal)),
    "dot_product": DenoiseOp(False, False, _nonlocal(dot_product_nonlocal)),
    "embedded_dot_product": DenoiseOp(True, False, _nonlocal(dot_product_nonlocal)),
    # Eqn. (2): the embedded Gaussian weights within a local window.
    "bilateral": DenoiseOp(True, True, bilateral_filter),
    "mean": DenoiseOp(False, True, _filter(mean_filter)),
    "median": DenoiseOp(False, True, _filter(median_filter)),
}


def available_denoise_ops() -> list[str]:
    """Names accepted by ``DenoisingBlock`` and ``nets.build_model(denoise_op=...)``."""
    return sorted(DENOISE_OPS)


def check_denoise_op(op: str, window: int) -> DenoiseOp:
    """The registered operation `op`; ValueError naming the problem for an unknown op or a
    window that is not a positive odd size (or that is given to a non-local op)."""
    if op not in DENOISE_OPS:
        raise ValueError(
            f"unknown denoising operation {op!r}; available: {', '.join(available_denoise_ops())}"
        )
    spec = DENOISE_OPS[op]
    valid = isinstance(window, int) and not isinstance(window, bool) and window > 0 and window % 2
    if not valid:
        raise ValueError(f"denoising window must be a positive odd size, got {window!r}")
    if not spec.local and window != DEFAULT_WINDOW:
        local = [name for name in available_denoise_ops() if DENOISE_OPS[name].local]
        raise ValueError(
            f"denoising window {window} given to the non-local op {op!r}; "
            f"it applies to {', '.join(local)}"
        )
    return spec


class DenoisingBlock(nn.Module):
    """Residual denoising block, Feature Denoising Fig. 4: ``x + BN(conv1x1(D(x)))``.

    Args:
        channels: channels C of the input feature map.
        op: the denoising operation D, a ``DENOISE_OPS`` name. Ops that embed have the 1x1
            embedding convolutions ``embedding_theta`` and ``embedding_phi`` (C -> C/2); the
            others have only ``conv`` (and its ``bn``), so checkpoints name the same variables.
        window: side of the local window for the local ops (odd).
    """

    def __init__(self, channels: int, op: str, window: int = DEFAULT_WINDOW) -> None:
        super().__init__()
        spec = check_denoise_op(op, window)
        if spec.embed and channels % 2:
            raise ValueError(f"embedded denoising needs an even channel count, got {channels}")
        self.op = op
        self.embed = spec.embed
        self.window = window
        if spec.embed:
            self.embedding_theta = _embedding(channels)
            self.embedding_phi = _embedding(channels)
        # Feature Denoising Fig. 4: 1x1 conv + BN after the denoising op; the BN's gamma starts
        # at zero so that the block starts as the identity.
        self.conv = ConvBN(channels, channels, 1, relu=False, zero_gamma=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed:
            theta, phi = self.embedding_theta(x), self.embedding_phi(x)
        else:
            theta, phi = x, x
        means = DENOISE_OPS[self.op].means
        return x + self.conv(means(theta, phi, x, self.window))

    def extra_repr(self) -> str:
        return f"op={self.op}, window={self.window}" if DENOISE_OPS[self.op].local else self.op


def _embedding(channels: int) -> nn.Conv2d:
    """Bias-free 1x1 embedding convolution C -> C/2 initialised from N(0, 0.01^2)."""
    conv = nn.Conv2d(channels, channels // 2, 1, bias=False)
    # Original non_local_op: embedding kernel_initializer = random_normal_initializer(stddev=0.01).
    nn.init.normal_(conv.weight, std=0.01)
    return conv
