"""Fine-tuning: start a fresh run from another checkpoint's weights, some scopes excluded (freshly
initialised) and, optionally, only some scopes trained (ALP's --finetune_* flags).

Scopes are the original's variable-name prefixes (``linear``, ``group3``, ``conv0/bn``): a
tensor is in a scope when its torch name with ``.`` read as ``/`` starts with it, as TF's
``var.op.name.startswith(scope)``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

import nets
from iat.defenses.registry import classifier_of
from nets import CheckpointError
from nets.checkpoint import CLASSIFIER_PREFIX


def original_name(key: str) -> str:
    """The original's variable name for a state_dict key's prefix: ``.`` -> ``/``."""
    return key.replace(".", "/")


def in_scopes(key: str, scopes: Iterable[str]) -> bool:
    """Whether state_dict `key` is in a scope; behind a model-level defense the classifier's
    keys are matched by their own names (``classifier.linear.weight`` is in ``linear``)."""
    name = original_name(key.removeprefix(CLASSIFIER_PREFIX))
    return any(name.startswith(scope) for scope in scopes)


def load_finetune_weights(
    model: torch.nn.Module, weights: nets.Weights, exclude_scopes: Iterable[str]
) -> list[str]:
    """Copy `weights` into `model`, except the state_dict entries in `exclude_scopes` (kept as
    initialised). Returns the excluded keys.

    The checkpoint is read strictly, through a copy of `model` sized for the checkpoint's
    classes, so the .npz and .pt formats and their checks are those of ``nets.load_weights``;
    a loaded entry whose shape differs from the model's is one CheckpointError naming it."""
    exclude_scopes = tuple(exclude_scopes)
    donor = _donor(model, weights.num_classes)
    nets.load_weights(donor, weights)
    target = model.state_dict()
    excluded = [key for key in target if in_scopes(key, exclude_scopes)]
    loaded = {k: v for k, v in donor.state_dict().items() if k not in excluded}
    misfit = [k for k, v in loaded.items() if v.shape != target[k].shape]
    if misfit:
        raise CheckpointError(
            f"{weights.source}: {misfit[0]} is {tuple(loaded[misfit[0]].shape)} there, "
            f"{tuple(target[misfit[0]].shape)} here; --finetune-exclude-scopes "
            f"{original_name(misfit[0]).rsplit('/', 1)[0]} initialises it afresh"
        )
    with torch.no_grad():
        for key, value in loaded.items():
            target[key].copy_(value)
    return excluded


def _donor(model: torch.nn.Module, num_classes: int) -> torch.nn.Module:
    """A copy of `model` whose classifier has `num_classes` outputs (left uninitialised: the
    checkpoint fills it, and torch's random stream is not drawn from)."""
    donor = copy.deepcopy(model)
    head = classifier_of(donor)
    name = nets.classifier_name(head)
    linear = head.get_submodule(name)
    if linear.out_features != num_classes:
        parent, _, leaf = name.rpartition(".")
        replacement = torch.nn.utils.skip_init(torch.nn.Linear, linear.in_features, num_classes)
        setattr(head.get_submodule(parent), leaf, replacement)
    return donor


def freeze_outside(model: torch.nn.Module, trainable_scopes: Iterable[str]) -> list[str]:
    """requires_grad False for every parameter outside `trainable_scopes`; returns their
    names. The optimizer then holds only the trainable ones (``builders.build_optimizer``):
    no weight decay or momentum moves a frozen tensor. BatchNorm statistics are buffers, not
    variables: they keep updating in training mode, as the original's update ops."""
    trainable_scopes = tuple(trainable_scopes)
    frozen = []
    for name, param in model.named_parameters():
        if not in_scopes(name, trainable_scopes):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
