"""The architecture registry, in timm's ``register_model`` / ``create_model`` shape: each model
family's module registers its names with what they are (``register``: the depths ``-d``
accepts, the options its builder takes, its original denoising operation, the layout of the
library whose name it is), and ``create_model`` builds any registered name from explicit
arguments. This module knows no family: importing ``nets`` imports them all.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from nets.denoise import DEFAULT_WINDOW, Denoise, check_denoise_op

MODEL_OPTIONS = ("drop_path", "grad_checkpointing")  # keyword options a builder may take
SOURCES = ("timm", "torchvision")  # the libraries whose layouts and model names are kept
DEFAULT_CLASSES = 1000  # ImageNet's: a builder's classes when none are given
# The largest size any builder is asked for, checked before anything is built (a record or a
# state dict read from a file states sizes; issue 32): blocks per group (ResNet-152's deepest
# stage has 36), base width (the published models' is 64) and classes (ImageNet-21k's 21,843).
SIZE_LIMITS = {"num_blocks": 128, "width": 1024, "num_classes": 100_000}
ModelBuilder = Callable[..., nn.Module]  # (num_blocks, num_classes, width, denoise, **options)
_Value = TypeVar("_Value")


@dataclass(frozen=True)
class Layout:
    """How a registered name's state dicts are laid out, for reading a checkpoint's size."""

    source: str  # the library whose model name it is (SOURCES)
    stem: str  # the first layer's weight: its output channels give the width
    channels: int  # those channels in the published model (width 64)
    block: re.Pattern  # a block's tensor names: its stage (absent: one stack) and its index

    def size_of(self, keys: Sequence[str], shapes: dict) -> tuple[tuple[int, ...], int] | None:
        """(blocks per stage, width) of a state dict with `keys` (`shapes`: key -> shape), or
        None when its stem or blocks are not found."""
        counts: dict[int, int] = {}
        for key in keys:
            found = self.block.match(key)
            if found:
                stage = int(found.groupdict().get("stage") or 0)
                counts[stage] = max(counts.get(stage, 0), int(found["block"]) + 1)
        stem = shapes.get(self.stem)
        if not counts or stem is None or (stem[0] * 64) % self.channels:
            return None
        return tuple(counts[stage] for stage in sorted(counts)), stem[0] * 64 // self.channels


@dataclass(frozen=True)
class Architecture:
    """One registered name: its builder and what it is. Every model takes float NCHW BGR pixels
    in [0, 255] and normalises them itself."""

    builder: ModelBuilder
    depths: Mapping[int, tuple[int, ...]]  # each -d: blocks per group (the same group count)
    options: tuple[str, ...]  # the MODEL_OPTIONS its builder takes
    denoise_op: str | None  # its original denoising op; None: it has no denoising blocks
    layout: Layout | None  # the reference library's layout (None: this project's own)


_REGISTRY: dict[str, Architecture] = {}


class SizeLimitError(ValueError):
    """A size beyond ``SIZE_LIMITS``; `field` names it (``num_blocks``, ``width``,
    ``num_classes``)."""

    def __init__(self, field: str, value: object) -> None:
        super().__init__(f"{field} {value!r} is beyond the limit of {SIZE_LIMITS[field]}")
        self.field = field


def check_size_limits(
    num_blocks: Sequence[int] | None = None,
    width: int | None = None,
    num_classes: int | None = None,
) -> None:
    """SizeLimitError for the first of `num_blocks` (per group), `width` and `num_classes`
    (None: not known) beyond ``SIZE_LIMITS``; nothing is built or allocated."""
    sizes = {"num_blocks": max(num_blocks or (0,)), "width": width, "num_classes": num_classes}
    for field, size in sizes.items():
        if isinstance(size, int) and size > SIZE_LIMITS[field]:
            raise SizeLimitError(field, list(num_blocks) if field == "num_blocks" else size)


class _Column(Mapping[str, _Value]):
    """A live, read-only view of one field of every registered architecture (with
    `skip_none`, only of those where it is set)."""

    def __init__(self, field: str, skip_none: bool = False) -> None:
        self._field = field
        self._skip_none = skip_none

    def _items(self) -> dict[str, _Value]:
        values = {name: getattr(entry, self._field) for name, entry in _REGISTRY.items()}
        return {n: v for n, v in values.items() if v is not None or not self._skip_none}

    def __getitem__(self, name: str) -> _Value:
        return self._items()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


ARCHITECTURES: Mapping[str, ModelBuilder] = _Column("builder")
# Each architecture's original denoising operation (None: it has no denoising blocks); old
# checkpoints were trained with it, so it stays the default.
DEFAULT_DENOISE_OPS: Mapping[str, str | None] = _Column("denoise_op")
LAYOUTS: Mapping[str, Layout] = _Column("layout", skip_none=True)  # other libraries' names


def register(
    name: str,
    *,
    depths: Mapping[int, tuple[int, ...]],
    denoise_op: str | None = None,
    options: Sequence[str] = (),
    layout: Layout | None = None,
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding a model builder ``(num_blocks, num_classes, width, denoise) -> model``;
    `depths` maps each ``-d`` to its blocks per group (every entry with the same number of
    groups); `denoise_op` is its original denoising operation (None: no denoising blocks, and
    the builder always receives ``denoise=None``); `options` the keyword options it also takes
    (``MODEL_OPTIONS``); `layout` the layout of the library whose model name it is."""

    def add(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        unknown = set(options) - set(MODEL_OPTIONS)
        if unknown:
            raise ValueError(f"architecture {name!r}: unknown options {sorted(unknown)}")
        if layout is not None and layout.source not in SOURCES:
            raise ValueError(f"architecture {name!r}: unknown source {layout.source!r}")
        _REGISTRY[name] = Architecture(builder, dict(depths), tuple(options), denoise_op, layout)
        return builder

    return add


def available_architectures() -> list[str]:
    """Names accepted by ``create_model``."""
    return sorted(_REGISTRY)


def num_groups_of(arch: str) -> int:
    """How many counts ``--num-blocks`` takes for `arch` (its groups or stages)."""
    return len(next(iter(_REGISTRY[arch].depths.values())))


def options_of(arch: str) -> tuple[str, ...]:
    """The ``MODEL_OPTIONS`` `arch` takes."""
    return _REGISTRY[arch].options


def depths_of(arch: str) -> tuple[int, ...]:
    """The depths ``-d`` accepts for `arch`."""
    return tuple(_REGISTRY[arch].depths)


def num_blocks_of(arch: str, depth: int) -> tuple[int, ...]:
    """Blocks per group of `arch` at `depth`; ValueError naming the valid depths."""
    depths = _REGISTRY[arch].depths
    if depth not in depths:
        valid = ", ".join(map(str, depths))
        raise ValueError(f"unknown depth {depth!r} for {arch}; valid depths: {valid}")
    return depths[depth]


def create_model(
    arch: str,
    depth: int | None = None,
    num_blocks: Sequence[int] | None = None,
    num_classes: int = DEFAULT_CLASSES,
    width: int = 64,
    denoise_op: str | None = None,
    denoise_window: int = DEFAULT_WINDOW,
    drop_path: float = 0.0,
    grad_checkpointing: bool = False,
) -> nn.Module:
    """Builds a registered architecture; give exactly one of ``depth`` and ``num_blocks``.

    ``denoise_op`` (a ``nets.DENOISE_OPS`` name) replaces the denoising operation of an
    architecture with denoising blocks (None: its original one, ``DEFAULT_DENOISE_OPS``);
    ``denoise_window`` is the window of the local ops (bilateral, mean, median);
    ``drop_path`` (the last block's stochastic-depth rate) and ``grad_checkpointing`` only for
    architectures that take them (``options_of``)."""
    if arch not in _REGISTRY:
        raise ValueError(
            f"unknown architecture {arch!r}; available: {', '.join(available_architectures())}"
        )
    blocks = _resolve_num_blocks(arch, depth, num_blocks)
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("width", width)
    check_size_limits(blocks, width, num_classes)
    denoise = resolve_denoise(arch, denoise_op, denoise_window)
    options = model_options(arch, drop_path, grad_checkpointing)
    return _REGISTRY[arch].builder(blocks, num_classes, width, denoise, **options)


build_model = create_model  # the name the rest of the project and its users know


def model_options(
    arch: str | None, drop_path: float = 0.0, grad_checkpointing: bool = False
) -> dict[str, object]:
    """The options set (not at their defaults), as `arch`'s builder takes them; ValueError for
    an option `arch` lacks (None: not known yet, not checked) or a rate outside [0, 1)."""
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"the drop rate must be in [0, 1), got {drop_path}")
    given = {"drop_path": drop_path, "grad_checkpointing": grad_checkpointing}
    given = {name: value for name, value in given.items() if value}
    lacking = [name for name in given if arch is not None and name not in options_of(arch)]
    if lacking:
        takers = [name for name in available_architectures() if lacking[0] in options_of(name)]
        raise ValueError(
            f"{arch} has no {lacking[0].replace('_', ' ')} option; "
            f"architectures with it: {', '.join(takers)}"
        )
    return given


def resolve_denoise(arch: str, denoise_op: str | None, denoise_window: int) -> Denoise | None:
    """The denoising `arch` gets: `denoise_op` or its original op; None for an architecture
    without denoising blocks. ValueError for an op given to such an architecture, an unknown op
    or a bad window."""
    default = _REGISTRY[arch].denoise_op
    if default is None:
        if denoise_op is not None or denoise_window != DEFAULT_WINDOW:
            with_blocks = [name for name, op in sorted(DEFAULT_DENOISE_OPS.items()) if op]
            raise ValueError(
                f"{arch} has no denoising blocks to set an operation for; "
                f"use one of {', '.join(with_blocks)}"
            )
        return None
    op = denoise_op or default
    check_denoise_op(op, denoise_window)
    return Denoise(op, denoise_window)


def _resolve_num_blocks(
    arch: str, depth: int | None, num_blocks: Sequence[int] | None
) -> tuple[int, ...]:
    if (depth is None) == (num_blocks is None):
        raise ValueError(
            f"give exactly one of depth and num_blocks, got depth={depth}, num_blocks={num_blocks}"
        )
    if num_blocks is None:
        return num_blocks_of(arch, depth)
    blocks = tuple(num_blocks)
    valid = all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in blocks)
    groups = num_groups_of(arch)
    if len(blocks) != groups or not valid:
        raise ValueError(
            f"num_blocks of {arch} must be {groups} positive integers, got {list(num_blocks)}"
        )
    return blocks


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules sharded training wraps one by one (``iat.train.fsdp``): each family's
    ``shard_units`` attribute names them by module path patterns relative to the model
    (``fnmatch`` per dotted segment: ``"blocks.*"``, ``"group*.block*"``); a family inside
    another (a classifier behind a model-level defense) is found where it sits. Units without
    parameters are left out; ValueError when `model` holds no family that names units."""
    units: list[nn.Module] = []
    for family in (m for m in model.modules() if getattr(m, "shard_units", None)):
        for name, module in family.named_modules():
            if _matches(name, family.shard_units) and any(True for _ in module.parameters()):
                units.append(module)
    if not units:
        raise ValueError(f"{type(model).__name__}: no sharding units named (shard_units)")
    return units


def _matches(name: str, patterns: Sequence[str]) -> bool:
    parts = name.split(".")
    return any(
        len(parts) == len(pattern.split("."))
        and all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern.split("."), strict=True))
        for pattern in patterns
    )
