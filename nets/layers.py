"""Building blocks that reproduce the original TensorFlow layers exactly.

The original (tensorpack, NCHW) pads every convolution and the stem max-pool with TensorFlow's
``SAME`` rule, which is asymmetric (one more pixel after than before) for even input sizes with
stride 2. PyTorch's symmetric padding would shift every feature map by one pixel and change the
logits, so the layers here compute the TensorFlow padding from the input size at run time.
TF-slim's ResNets (``resnet_utils.conv2d_same``) instead pad by a fixed amount whatever the input
size; ``Conv2dSame(..., fixed_padding=True)`` reproduces that.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

# Pixel range the model is fed (the one owner: attacks, defenses and converters import it) and
# the scale that maps it onto [-1, 1] (original adv_model.py: `image * IMAGE_SCALE - 1.0` with
# IMAGE_SCALE = 2 / 255).
PIXEL_MIN = 0.0
PIXEL_MAX = 255.0
IMAGE_SCALE = 2.0 / PIXEL_MAX


def bgr_pixels_to_unit_rgb(images: torch.Tensor) -> torch.Tensor:
    """NCHW BGR in [0, 255] (this project's input) -> NCHW RGB in [0, 1] (torchvision's, timm's
    and RobustBench's)."""
    return images.flip(1) / PIXEL_MAX


def unit_rgb_to_bgr_pixels(images: torch.Tensor) -> torch.Tensor:
    """NCHW RGB in [0, 1] -> NCHW BGR in [0, 255]."""
    return images.flip(1) * PIXEL_MAX


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow ``SAME`` padding (before, after) of one spatial dimension.

    pad_total = max((ceil(size / stride) - 1) * stride + effective_kernel - size, 0); the extra
    pixel of an odd total goes after, as TensorFlow does.
    """
    effective_kernel = (kernel - 1) * dilation + 1
    out_size = -(-size // stride)
    total = max((out_size - 1) * stride + effective_kernel - size, 0)
    return total // 2, total - total // 2


def fixed_padding(kernel: int, dilation: int = 1) -> tuple[int, int]:
    """TF-slim's ``resnet_utils.conv2d_same`` padding (before, after) of one spatial dimension:
    the effective kernel less one, ``(k - 1) // 2`` before and the rest after, then a ``VALID``
    convolution, whatever the input size and stride (at stride 1 this equals ``SAME``)."""
    total = (kernel - 1) * dilation
    return total // 2, total - total // 2


def _pad_hw(x: torch.Tensor, kernel: int, stride: int, dilation: int) -> tuple[int, int, int, int]:
    """Padding of the last two dimensions of ``x`` as (top, bottom, left, right)."""
    top, bottom = same_padding(x.shape[-2], kernel, stride, dilation)
    left, right = same_padding(x.shape[-1], kernel, stride, dilation)
    return top, bottom, left, right


class Conv2dSame(nn.Conv2d):
    """Square convolution with TensorFlow ``SAME`` padding, bias-free unless ``bias``.

    With ``fixed_padding`` it pads as TF-slim's ``resnet_utils.conv2d_same`` instead (the function
    ``fixed_padding``), which differs from ``SAME`` for even input sizes at stride 2: the 3x3
    kernel gets one pixel before and one after, not none before and one after.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        fixed_padding: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel, stride, padding=0, groups=groups, bias=bias
        )
        # Original resnet_backbone: Conv2D kernel_initializer =
        # variance_scaling_initializer(scale=2.0, mode='fan_out'), use_bias=False.
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        if bias:
            nn.init.zeros_(self.bias)  # TF-slim conv2d: biases_initializer=zeros_initializer()
        self.fixed_padding = fixed_padding

    def _padding(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) for the input ``x``."""
        if self.fixed_padding:
            before, after = fixed_padding(self.kernel_size[0], self.dilation[0])
            return before, after, before, after
        return _pad_hw(x, self.kernel_size[0], self.stride[0], self.dilation[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight, self.bias)

    def _conv(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        top, bottom, left, right = self._padding(x)
        if top == bottom and left == right:
            padding = (top, left)
            return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)


class ConvBN(Conv2dSame):
    """``Conv2dSame`` followed by BatchNorm (child ``bn``) and an optional ReLU.

    Being the convolution itself keeps the torch names one-to-one with the original ones:
    ``conv1.weight`` is ``conv1/W`` and ``conv1.bn.weight`` is ``conv1/bn/gamma``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        relu: bool = True,
        zero_gamma: bool = False,
        fixed_padding: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel, stride, groups, fixed_padding=fixed_padding
        )
        # TF BatchNorm decay 0.9 == torch momentum 0.1; epsilon 1e-5 as in tensorpack.
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1)
        if zero_gamma:
            # ImageNet in 1 Hour, Sec 5.1: each residual block's last BN has gamma initialised to 0
            # (Feature Denoising, Sec 4.2 does the same for the denoising block's BN).
            nn.init.zeros_(self.bn.weight)
        self.relu = relu
        # The convolution with its inference-mode BatchNorm folded in, (weight, bias) in fp32
        # and, for an attack under autocast, in its low precision; set only while folded. Plain
        # attributes, not buffers (DDP would broadcast them, checkpoints would store them).
        self.folded: tuple[torch.Tensor, torch.Tensor] | None = None
        self.folded_low: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded is not None and not self.training and not self.bn.training:
            x = self._conv(x, *self._folded_for(x))
        else:
            x = self.bn(super().forward(x))
        return F.relu(x, inplace=True) if self.relu else x

    def _folded_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The low-precision folded weights under autocast to their dtype (cast once per
        attack, not by autocast at every call), else the fp32 ones."""
        low, device = self.folded_low, x.device.type
        autocast = low is not None and torch.is_autocast_enabled(device)
        return low if autocast and torch.get_autocast_dtype(device) == low[0].dtype else self.folded

    def fold_batchnorm(self, low_precision: torch.dtype | None = None) -> None:
        """Use one convolution with this BatchNorm's inference-mode affine map folded into its
        weights and bias: w * gamma / sqrt(var + eps), beta - mean * gamma / sqrt(var + eps);
        with `low_precision`, also a copy in that dtype for forward passes under autocast.
        Exact up to float rounding, and only while both are in eval mode with unchanged weights
        (the attacks' ``attack_mode`` folds on entry and unfolds on exit). A compiled attack
        reads the folded tensors as inputs: new ones each attack cause no recompilation.
        Weights sharded between gathers (``iat.train.fsdp``'s per-layer attack) are not folded:
        the convolution and its BatchNorm then run as they are."""
        if _is_dtensor(self.weight):
            return
        bn = self.bn
        with torch.inference_mode(False), torch.no_grad():
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            weight = self.weight * scale.reshape(-1, 1, 1, 1).to(self.weight.dtype)
            bias = bn.bias - bn.running_mean * scale
        self.folded = (weight, bias)
        self.folded_low = None
        if low_precision is not None and low_precision != self.weight.dtype:
            self.folded_low = (weight.to(low_precision), bias.to(low_precision))

    def unfold_batchnorm(self) -> None:
        """Back to the convolution followed by its BatchNorm (the folded tensors are freed)."""
        self.folded = self.folded_low = None


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a sharded DTensor, without importing ``torch.distributed.tensor``
    (a second of every process's start-up): none exists before that module is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


class MaxPool2dSame(nn.Module):
    """Max-pooling with TensorFlow ``SAME`` padding (padded cells never win: they are -inf)."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = _pad_hw(x, self.kernel, self.stride, 1)
        padding = (0, 0)
        if top == bottom and left == right:
            padding = (top, left)
        else:
            x = F.pad(x, (left, right, top, bottom), value=float("-inf"))
        if x.device.type == "cpu" and x.is_contiguous():
            return ChannelsLastMaxPool.apply(x, self.kernel, self.stride, padding)
        return F.max_pool2d(x, self.kernel, self.stride, padding)


class ChannelsLastMaxPool(torch.autograd.Function):
    """``F.max_pool2d`` of an NCHW tensor computed in channels-last, forward and backward, and
    handed back in NCHW: PyTorch's NCHW max-pool kernel is slow on the CPU (bench/RESULTS.md,
    section 12, "The stem max-pool in channels-last": faster this way, copies included). Same
    values and the same gradient, ties included (both pick the first maximum of the window)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: int, stride: int, padding: tuple[int, int]):
        channels_last = x.contiguous(memory_format=torch.channels_last)
        args = ([kernel, kernel], [stride, stride], list(padding), [1, 1], False)
        y, indices = torch.ops.aten.max_pool2d_with_indices(channels_last, *args)
        ctx.save_for_backward(channels_last, indices)
        ctx.args = args
        return y.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        channels_last, indices = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, channels_last, *ctx.args, indices
        )
        return grad_x.contiguous(), None, None, None


def check_pixels(x: torch.Tensor) -> None:
    """ValueError unless ``x`` is a float NCHW batch of 3-channel (BGR) images."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(
            f"model input must be NCHW images with 3 (BGR) channels, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"model input must be a float tensor in [0, 255], got {x.dtype}")


class Preprocess(nn.Module):
    """Maps float NCHW BGR images in pixel units [0, 255] onto [-1, 1] like the original."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_pixels(x)
        # Original adv_model.py image_preprocess: image * (2 / 255) - 1.
        return x * IMAGE_SCALE - 1.0


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dimensions: [N, C, H, W] -> [N, C]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))
