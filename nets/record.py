"""The architecture record: what a checkpoint says it was trained as, stated once.

``ArchitectureRecord`` holds the fields and their defaults (what a key absent from an older
record means); ``to_dict`` gives the plain values ``nets.save_weights`` writes under
``nets.ARCHITECTURE_KEY``, ``from_dict`` is the one reader and validator, ``build`` the model it
describes. The input-transform defense and the sparse-coding frontend are carried as recorded
(``iat.defenses`` reads them); the classes and the frontend are also said by the weights
themselves, the other fields by a run's configuration (``CONFIG_FIELDS``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from nets.denoise import DEFAULT_WINDOW, DENOISE_OPS
from nets.registry import (
    available_architectures,
    check_size_limits,
    create_model,
    depths_of,
    num_groups_of,
)


@dataclass(frozen=True, kw_only=True)
class ArchitectureRecord:
    """An architecture as a checkpoint records it; ``num_blocks`` given wins over ``depth``
    (which is then None), as in ``nets.create_model``."""

    arch: str  # a registered name (nets.available_architectures)
    depth: int | None = None  # -d; None when num_blocks gives the size
    num_blocks: tuple[int, ...] | None = None  # blocks per group
    width: int  # base channels (64: the published model)
    num_classes: int | None = None  # outputs of the final layer (None: not recorded)
    # The denoising blocks' op (None: the architecture's original one, or none); records
    # written before the ops were selectable lack this and the window.
    denoise_op: str | None = None
    denoise_window: int = DEFAULT_WINDOW
    # The input-transform defense (iat.defenses.transforms) and when it applies; records
    # without them mean no defense, applied at prediction.
    defense: str | None = None
    defense_apply: str = "predict"
    # The sparse-coding frontend's spec (iat.defenses.sparse_frontend; its tensors are in the
    # state dict under "frontend."), None without one.
    frontend: Mapping[str, object] | None = None

    def __post_init__(self) -> None:
        if self.num_blocks is not None:
            object.__setattr__(self, "num_blocks", tuple(self.num_blocks))
            object.__setattr__(self, "depth", None)

    def to_dict(self) -> dict[str, object]:
        """Plain values (lists, strings, numbers, None), as a checkpoint stores them."""
        record = dataclasses.asdict(self)
        record["num_blocks"] = None if self.num_blocks is None else list(self.num_blocks)
        record["frontend"] = None if self.frontend is None else dict(self.frontend)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, object]) -> ArchitectureRecord:
        """The record `record` holds, absent keys at their defaults; ValueError naming the
        first field that is not what it must be (an unregistered architecture, a size it does
        not take, a width that is not a positive integer or beyond ``nets.SIZE_LIMITS``, an
        unknown denoising op, ...): nothing is built."""
        if not isinstance(record, Mapping):
            raise ValueError(f"not a mapping but {type(record).__name__}")
        try:
            parsed = cls(**{name: record[name] for name in RECORD_FIELDS if name in record})
        except TypeError as error:  # a required field absent, or num_blocks not a sequence
            raise ValueError(str(error)) from None
        parsed.check()
        return parsed

    def check(self) -> None:
        """ValueError naming the first field the registry would refuse."""
        if self.arch not in available_architectures():
            raise ValueError(f"unknown architecture {self.arch!r}")
        _check_size(self.arch, self.depth, self.num_blocks)
        for name, valid in _VALID.items():
            value = getattr(self, name)
            if not valid(value):
                raise ValueError(f"invalid {name} {value!r}")
        check_size_limits(self.num_blocks, self.width, self.num_classes)

    def build(self) -> nn.Module:
        """The classifier the record describes, freshly initialised (without its frontend or
        defense); ValueError when it cannot be built (e.g. no classes recorded)."""
        return create_model(
            self.arch,
            depth=self.depth,
            num_blocks=self.num_blocks,
            num_classes=self.num_classes,
            width=self.width,
            denoise_op=self.denoise_op,
            denoise_window=self.denoise_window,
        )


RECORD_FIELDS = tuple(field.name for field in dataclasses.fields(ArchitectureRecord))
# The fields the weights also say (the final layer's outputs, the frontend's tensors); a run's
# configuration sets the others.
WEIGHTS_FIELDS = ("num_classes", "frontend")
CONFIG_FIELDS = tuple(name for name in RECORD_FIELDS if name not in WEIGHTS_FIELDS)


def as_record(architecture: ArchitectureRecord | Mapping[str, object]) -> ArchitectureRecord:
    """`architecture` as an ``ArchitectureRecord`` (a mapping is read by ``from_dict``)."""
    if isinstance(architecture, ArchitectureRecord):
        architecture.check()
        return architecture
    return ArchitectureRecord.from_dict(architecture)


def complete_record(architecture: ArchitectureRecord | Mapping[str, object]) -> dict[str, object]:
    """The record as written: every field of ``ArchitectureRecord``, absent ones at their
    defaults, checked; fields it does not know (a model-level defense's, registered in
    ``iat.defenses.registry``, which checks them) kept as given."""
    extra = (
        {}
        if isinstance(architecture, ArchitectureRecord)
        else {k: v for k, v in architecture.items() if k not in RECORD_FIELDS}
    )
    return {**as_record(architecture).to_dict(), **extra}


def _check_size(arch: str, depth: object, num_blocks: Sequence[object] | None) -> None:
    if num_blocks is None:
        if depth not in depths_of(arch):
            raise ValueError(f"depth {depth!r} is not one of {arch}'s {list(depths_of(arch))}")
        return
    if len(num_blocks) != num_groups_of(arch) or not all(map(_positive, num_blocks)):
        raise ValueError(
            f"num_blocks {list(num_blocks)} are not {num_groups_of(arch)} positive integers"
        )


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _optional(valid: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: value is None or valid(value)


def _is_str(value: object) -> bool:
    return isinstance(value, str)


# What each field other than the architecture and its size must be.
_VALID: dict[str, Callable[[object], bool]] = {
    "width": _positive,
    "num_classes": _optional(_positive),
    "denoise_op": _optional(DENOISE_OPS.__contains__),
    "denoise_window": _positive,
    "defense": _optional(_is_str),
    "defense_apply": _is_str,
    "frontend": _optional(lambda value: isinstance(value, Mapping)),
}
