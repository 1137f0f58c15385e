"""Model-level defenses: a wrapper module around a classifier (the sparse-coding frontend,
``iat.defenses.sparse_frontend``) that is one unit. Its module registers what it is
(``register``): its name for ``--frontend NAME:ARGUMENT``, how it is built from that argument
or from a checkpoint's architecture record, its words for the summary line and the
``--frontend-gradient`` values it takes. Training, fine-tuning, evaluation and the checkpoints
ask this registry and never name a wrapper.

A wrapper holds its classifier as ``.classifier`` (its state_dict entries under
``nets.checkpoint.CLASSIFIER_PREFIX``: fine-tuning scopes and the classes are the classifier's),
its own tensors beside it, its ``.spec`` (a ``DefenseSpec``: what the architecture record holds
under the defense's field) and ``attack_view()``: what a white-box attack differentiates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

import nets

# --frontend-gradient: the wrapper's attack view (BPDA through what has no useful gradient,
# Athalye, Carlini & Wagner, ICML 2018, Sec 4.1), or plain autograd (gradient-masked).
ATTACK_GRADIENTS = ("bpda", "autograd")
# What --frontend FILE without a NAME: names (the flag's meaning before the registry).
DEFAULT_MODEL_DEFENSE = "sparse"


class DefenseSpec(Protocol):
    """A wrapper's shape and settings, as the architecture record holds them."""

    def record(self) -> object: ...  # plain (JSON) values

    def describe(self) -> str: ...  # in words, for error messages


@dataclass(frozen=True)
class WrapOptions:
    """The flags every model-level defense takes."""

    trainable: bool = False  # --frontend-trainable: its own parameters trained with the model
    attack_gradient: str = "bpda"  # --frontend-gradient


@dataclass(frozen=True)
class ModelDefense:
    """What a model-level defense is: everything the rest of the code asks of it."""

    name: str  # --frontend NAME:ARGUMENT
    record_field: str  # the architecture record's field holding its spec
    title: str  # what it is, in words ("sparse-coding frontend")
    wrapper: type[nn.Module]  # the module that holds `.classifier`, `.spec`, `attack_view()`
    build: Callable[[str, nn.Module, WrapOptions], nn.Module]  # from --frontend's ARGUMENT
    # The spec a record's field holds, checked (CheckpointError naming the source).
    from_record: Callable[[object, str], DefenseSpec]
    # The shapes of the tensors that size a wrapper of a spec, by their state_dict keys.
    shapes: Callable[[DefenseSpec], Mapping[str, tuple[int, ...]]]
    # A wrapper of a recorded spec whose tensors a checkpoint then fills.
    empty: Callable[[DefenseSpec, nn.Module, WrapOptions], nn.Module]
    attack_words: Callable[[str], str]  # how a white-box attack sees it, per --frontend-gradient
    gradients: tuple[str, ...] = ATTACK_GRADIENTS  # the --frontend-gradient values it takes


MODEL_DEFENSES: dict[str, ModelDefense] = {}


def register(defense: ModelDefense) -> ModelDefense:
    """Adds `defense`; its name and record field must be new. The same defense again (its
    module run as a command, ``python -m``, after the package imported it) keeps the first."""
    first = MODEL_DEFENSES.get(defense.name)
    if first is not None and _identity(first) == _identity(defense):
        return first
    taken = [d.name for d in MODEL_DEFENSES.values() if d.record_field == defense.record_field]
    if defense.name in MODEL_DEFENSES or taken:
        raise ValueError(f"model-level defense {defense.name!r}: name or record field taken")
    MODEL_DEFENSES[defense.name] = defense
    return defense


def _identity(defense: ModelDefense) -> tuple[str, str, str]:
    return defense.name, defense.record_field, defense.wrapper.__qualname__


def parse_frontend(value: str) -> tuple[ModelDefense, str]:
    """--frontend's defense and argument: ``NAME:ARGUMENT`` for a registered NAME, else the
    default defense's file."""
    name, colon, argument = value.partition(":")
    if colon and name in MODEL_DEFENSES:
        return MODEL_DEFENSES[name], argument
    return MODEL_DEFENSES[DEFAULT_MODEL_DEFENSE], value


def frontend_flag(defense: ModelDefense, argument: str) -> str:
    """The --frontend value that names `defense` with `argument` (``parse_frontend``'s inverse)."""
    return argument if defense.name == DEFAULT_MODEL_DEFENSE else f"{defense.name}:{argument}"


def check_options(defense: ModelDefense, options: WrapOptions) -> None:
    """ValueError naming the flag when `defense` does not take `options`."""
    if options.attack_gradient not in defense.gradients:
        raise ValueError(
            f"--frontend-gradient {options.attack_gradient}: the {defense.title} takes "
            f"{', '.join(defense.gradients)}"
        )


def wrapper_defense(model: nn.Module) -> ModelDefense | None:
    """The registered defense `model` is the wrapper of, if any."""
    return next((d for d in MODEL_DEFENSES.values() if isinstance(model, d.wrapper)), None)


def classifier_of(model: nn.Module) -> nn.Module:
    """The classifier inside a wrapper (its layers by their own names), else `model`."""
    return model.classifier if wrapper_defense(model) is not None else model


def defense_record(model: nn.Module) -> dict[str, object]:
    """The architecture record's field of the defense `model` wraps its classifier in; empty for
    a bare classifier."""
    defense = wrapper_defense(model)
    return {} if defense is None else {defense.record_field: model.spec.record()}


def recorded_defense(weights: nets.Weights | None) -> tuple[ModelDefense, DefenseSpec] | None:
    """The model-level defense a training checkpoint carries (its record), if any; checked
    against its tensors before anything of the record's size is built."""
    record = None if weights is None else weights.architecture
    if record is None:
        return None
    found = [d for d in MODEL_DEFENSES.values() if record.get(d.record_field) is not None]
    if not found:
        return None
    defense = found[0]
    spec = defense.from_record(record[defense.record_field], weights.source)
    for key, shape in defense.shapes(spec).items():
        tensor = weights.tensors.get(key)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            raise nets.CheckpointError(
                f"{weights.source}: its {defense.record_field} record ({spec.describe()}) does "
                f"not match its tensor {key}"
            )
    return defense, spec


def check_record(record: Mapping[str, object], source: str) -> None:
    """CheckpointError naming `source` when a defense's field of `record` is not its spec."""
    for defense in MODEL_DEFENSES.values():
        if record.get(defense.record_field) is not None:
            defense.from_record(record[defense.record_field], source)
