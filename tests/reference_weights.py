"""Seeded weights and pixels for the reference-layout tests (tests/test_reference_models.py) and
for the script that computed the reference logits with timm and torchvision
(tests/data/reference_models/make_fixtures.py): both draw the same tensors from torch's CPU
generator, so the fixture holds only the tensor names, shapes and the reference logits."""

from __future__ import annotations

import torch

SEED = 19
BATCH = 2
# case -> how to build it: timm/torchvision constructor arguments (for make_fixtures.py) and this
# project's arch, blocks per stage and width; the input side and classes.
CASES: dict[str, dict] = {
    "convnext": {
        "source": "timm",
        "reference": {"depths": (1, 1, 2, 1), "dims": (12, 24, 48, 96), "num_classes": 10},
        "arch": "convnext_tiny",
        "num_blocks": (1, 1, 2, 1),
        "width": 8,
        "image_size": 64,
    },
    "vit": {
        "source": "timm",
        "reference": {"embed_dim": 48, "depth": 2, "num_heads": 6, "num_classes": 10},
        "arch": "vit_small_patch16_224",
        "num_blocks": (2,),
        "width": 8,
        "image_size": 224,
    },
    "vit_at_112": {  # the 224-pixel position embeddings interpolated to a 7x7 grid
        "source": "timm",
        "reference": {"embed_dim": 48, "depth": 2, "num_heads": 6, "num_classes": 10},
        "arch": "vit_small_patch16_224",
        "num_blocks": (2,),
        "width": 8,
        "image_size": 112,
    },
    # ViT-H/14 and ViT-g/14 shrunk: patch 14 (a 16x16 grid at 224 pixels); g/14 at 112 pixels,
    # its position embeddings resampled to 8x8, at --width 40 (width 880), where timm's hidden
    # width int(880 * (48 / 11)) is 3839, not 880 * 48 / 11 = 3840 (float rounding).
    "vit_huge": {
        "source": "timm",
        "reference": {
            "embed_dim": 160,
            "depth": 2,
            "num_heads": 16,
            "patch_size": 14,
            "num_classes": 10,
        },
        "arch": "vit_huge_patch14_224",
        "num_blocks": (2,),
        "width": 8,
        "image_size": 224,
    },
    "vit_giant_at_112": {
        "source": "timm",
        "reference": {
            "embed_dim": 880,
            "depth": 1,
            "num_heads": 16,
            "patch_size": 14,
            "mlp_ratio": 48 / 11,
            "num_classes": 10,
        },
        "arch": "vit_giant_patch14_224",
        "num_blocks": (1,),
        "width": 40,
        "image_size": 112,
    },
    "swin": {
        "source": "timm",
        "reference": {
            "embed_dim": 12,
            "depths": (2, 2, 2, 2),
            "num_heads": (3, 6, 12, 24),
            "num_classes": 10,
        },
        "arch": "swin_tiny_patch4_window7_224",
        "num_blocks": (2, 2, 2, 2),
        "width": 8,
        "image_size": 224,
    },
    # ConvStem (Singh et al. 2023): the authors' stem classes (nmndeep/revisiting-at) in timm's
    # ConvNeXt and ViT ("stem": the class and its arguments).
    "convnext_convstem": {
        "source": "timm",
        "reference": {"depths": (1, 1, 2, 1), "dims": (12, 24, 48, 96), "num_classes": 10},
        "stem": ("ConvBlock1", (6,)),
        "arch": "convnext_t_cvst",
        "num_blocks": (1, 1, 2, 1),
        "width": 8,
        "image_size": 64,
    },
    "convnext_b_convstem": {
        "source": "timm",
        "reference": {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128), "num_classes": 10},
        "stem": ("ConvBlock3", (8,)),
        "arch": "convnext_b_cvst",
        "num_blocks": (1, 1, 1, 1),
        "width": 8,
        "image_size": 64,
    },
    "vit_convstem": {
        "source": "timm",
        "reference": {"embed_dim": 48, "depth": 2, "num_heads": 6, "num_classes": 10},
        "stem": ("ConvBlock", (6, 8)),
        "arch": "vit_s_cvst",
        "num_blocks": (2,),
        "width": 8,
        "image_size": 224,
    },
    "resnet": {
        "source": "torchvision",
        "reference": {"layers": (1, 1, 1, 1), "num_classes": 10},
        "arch": "resnet50",
        "num_blocks": (1, 1, 1, 1),
        "width": 64,
        "image_size": 64,
    },
    "wide_resnet": {
        "source": "torchvision",
        "reference": {"layers": (1, 1, 1, 1), "num_classes": 10, "width_per_group": 128},
        "arch": "wide_resnet50_2",
        "num_blocks": (1, 1, 1, 1),
        "width": 64,
        "image_size": 64,
    },
}
# timm's full-size models whose parameter count and tensor shapes the fixture holds (made on the
# meta device; the tests build them there too: no weights are allocated).
FULL_SIZE = ("vit_huge_patch14_224", "vit_giant_patch14_224")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def seeded_state(shapes: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    """A state dict of the named shapes, drawn in their order: weights ~ N(0, 0.05^2) scaled by
    fan-in, norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.05^2), BatchNorm variances in
    [0.5, 1.5], layer scales ~ N(0, 0.5^2), step counters 0."""
    generator = torch.Generator().manual_seed(SEED)
    state = {}
    for name, shape in shapes:
        draw = torch.randn(shape, generator=generator)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            state[name] = torch.zeros(shape, dtype=torch.long)
        elif leaf == "running_var":
            state[name] = 0.5 + torch.rand(shape, generator=generator)
        elif leaf == "gamma":
            state[name] = 0.5 * draw
        elif len(shape) == 1 and leaf == "weight":
            state[name] = 1 + 0.1 * draw
        elif len(shape) >= 2 and leaf == "weight":
            fan_in = draw[0].numel()
            state[name] = draw / fan_in**0.5
        else:
            state[name] = 0.05 * draw
    return state


def representative(key: str) -> bool:
    """Whether a full-size ViT's tensor `key` is kept in the fixture: those outside the
    blocks and the first block's (every block has the same shapes)."""
    return not key.startswith("blocks.") or key.startswith("blocks.0.")


def seeded_pixels(image_size: int) -> torch.Tensor:
    """BATCH BGR images of whole pixel values in [0, 255], float32 NCHW."""
    generator = torch.Generator().manual_seed(SEED + 1)
    shape = (BATCH, 3, image_size, image_size)
    return torch.randint(0, 256, shape, generator=generator).float()


def reference_input(pixels: torch.Tensor) -> torch.Tensor:
    """What the reference models take for ``pixels``: RGB in [0, 1], ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels.flip(1) / 255.0 - mean) / std
