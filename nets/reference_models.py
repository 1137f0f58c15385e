"""How an architecture written in another library's layout registers under that library's own
model name (timm: ``convnext_tiny``, ``vit_small_patch16_224``, ``swin_tiny_patch4_window7_224``;
torchvision: ``resnet50``, ``wide_resnet50_2``), so that ``--arch`` and
``python -m iat.convert_checkpoint --arch`` name a model the same way. Each family's module
(``nets.convnext``, ``vit``, ``swin``, ``convstem``, ``torchvision_resnet``) registers its names
with ``register_reference``, with each name's layout (``nets.registry.Layout``: source library,
how its size reads from a state dict).

Each takes the registry's arguments: ``-d`` is its total block count (``--num-blocks`` sets the
blocks per stage, one count for ViT), ``--width`` scales every layer by width / 64 (64: the
published model; the attention heads keep their number), ``--drop-path`` and
``--grad-checkpointing`` (not the torchvision ResNets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from nets.registry import DEFAULT_CLASSES, Layout, ModelBuilder, register

TRANSFORMER_OPTIONS = ("drop_path", "grad_checkpointing")
# (name, blocks per stage, width, classes, **options) -> model
Family = Callable[..., nn.Module]


def register_reference(
    family: Family,
    name: str,
    depth: int,
    blocks: tuple[int, ...],
    layout: Layout,
    options: Sequence[str] = (),
) -> None:
    """Registers `name` of `layout.source`, built by `family`, at its one size: ``-d``
    `depth` is `blocks` per stage."""
    register(name, depths={depth: blocks}, options=options, layout=layout)(_builder(family, name))


def _builder(family: Family, name: str) -> ModelBuilder:
    """The registry's builder ``(num_blocks, num_classes, width, denoise, **options)``."""

    def build(
        num_blocks: Sequence[int],
        num_classes: int = DEFAULT_CLASSES,
        width: int = 64,
        denoise: None = None,
        **options: object,
    ) -> nn.Module:
        return family(name, num_blocks, width, num_classes, **options)

    return build
