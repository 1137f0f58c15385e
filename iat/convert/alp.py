"""``python -m iat.convert_alp CKPT OUT``: the adversarial logit pairing checkpoints (Kannan,
Kurakin & Goodfellow 2018; tensorflow/models research/adversarial_logit_pairing) as this
project's weights.

ALP's model is TF-slim's ``resnet_v2.resnet_v2_50(images, num_classes, is_training=False)``
under ``resnet_arg_scope()``, fed RGB images in [-1, 1]. ``nets.ResNetV2`` is the same network
fed BGR pixels in [0, 255] (``nets.layers.Preprocess`` maps them onto [-1, 1]), so reversing the
input channels of the root convolution gives identical logits. Every variable is mapped by its
name (``variable_table``); the architecture (blocks per group, width, classes) comes from the
checkpoint's shapes; a variable left unmapped, missing or mis-shaped is one error line naming them
all. Optimizer slots (``.../Momentum``), moving averages (``.../ExponentialMovingAverage``, read
instead of the weights with ``--use-moving-average``) and ``global_step`` are skipped by name.

TensorFlow is needed only here, to read the checkpoint (``pip install -e '.[convert]'``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import nets
from iat.convert.checkpoint import ConversionError, run_converter
from nets.checkpoint import NPZ_SUFFIX, PT_SUFFIXES
from nets.resnet_variants import V2_GROUP_STRIDES

ARCH = "ResNetV2"
INSTALL_HINT = "pip install -e '.[convert]'"
EMA_SUFFIX = "/ExponentialMovingAverage"  # tf.train.ExponentialMovingAverage's shadow variables
# Skipped by name: optimizer slots (ALP trains with momentum), moving averages (unless
# --use-moving-average) and the step counter.
IGNORED_SUFFIXES = ("/Momentum", EMA_SUFFIX)
IGNORED_NAMES = ("global_step",)
# ALP's ImageNet 64x64 heads have 1001 outputs: class 0 is the background class of the TF-slim
# ImageNet data, 1..1000 the ImageNet classes in this project's order (0..999).
BACKGROUND_OUTPUTS = 1001
_SCOPE = re.compile(r"(resnet_v2_\d+)/")
_UNIT = re.compile(r"block(\d+)/unit_(\d+)/bottleneck_v2/")
_GROUP_BLOCK = re.compile(r"group(\d+)\.block(\d+)\.(.+)")
_TRAINABLE_LEAVES = ("weights", "biases", "gamma", "beta")  # the rest are BN moving statistics
_OUT_SUFFIXES = (*PT_SUFFIXES, NPZ_SUFFIX)

# This project's module -> TF-slim's variable scope (resnet_v2.py): the root block ...
_ROOT_SCOPES = {"conv0": "conv1", "postnorm": "postnorm", "linear": "logits"}
# ... and, inside group{i}.block{j} = block{i+1}/unit_{j+1}/bottleneck_v2, each unit's layers.
_UNIT_SCOPES = {
    "preact": "preact",
    "conv1": "conv1",
    "conv1.bn": "conv1/BatchNorm",
    "conv2": "conv2",
    "conv2.bn": "conv2/BatchNorm",
    "conv3": "conv3",
    "shortcut": "shortcut",
}
# torch tensor -> slim variable, for convolutions (and the 1x1 logits) and for batch norm.
_PARAM_LEAVES = {"weight": "weights", "bias": "biases"}
_BN_LEAVES = {
    "weight": "gamma",
    "bias": "beta",
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
}


@dataclass(frozen=True)
class Variable:
    """Where one torch tensor comes from."""

    key: str  # torch state_dict key, e.g. "group0.block0.conv1.bn.weight"
    layout: str  # "conv" (HWIO), "root_conv" (HWIO, RGB input), "logits" (1x1xCxK), "vector"
    shape: tuple[int, ...]  # the shape the checkpoint must hold


@dataclass(frozen=True)
class Plan:
    """A checkpoint matched to ``nets.ResNetV2``: what to read, and what was skipped."""

    num_blocks: tuple[int, ...]
    width: int
    num_classes: int  # outputs in the checkpoint (before dropping a background class)
    sources: Mapping[str, Variable]  # checkpoint variable -> torch tensor
    ignored: tuple[str, ...]  # optimizer slots, moving averages, global_step
    has_averages: bool  # a moving average exists for every trainable variable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m iat.convert_alp",
        description="Convert an adversarial logit pairing (TF-slim resnet_v2) checkpoint.",
    )
    parser.add_argument("ckpt", help="TF checkpoint prefix (model.ckpt) or its folder")
    parser.add_argument("out", help="output weights: .pt (records the architecture) or .npz")
    parser.add_argument(
        "--keep-background-class",
        action="store_true",
        help="keep output 0 (the background class) of a 1001-class head",
    )
    parser.add_argument(
        "--use-moving-average",
        action="store_true",
        help="convert the ExponentialMovingAverage shadows instead of the weights",
    )
    return parser


def variable_table(model: nn.Module, scope: str) -> dict[str, Variable]:
    """Checkpoint variable name -> the torch tensor it fills, for every tensor of ``model``
    (a ``nets.ResNetV2``) but BN's ``num_batches_tracked``."""
    table = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            leaves, layout = _BN_LEAVES, "vector"
        elif isinstance(module, nn.Conv2d | nn.Linear):
            leaves, layout = _PARAM_LEAVES, _weight_layout(name, module)
        else:
            continue
        for leaf, slim_leaf in leaves.items():
            tensor = getattr(module, leaf)
            if tensor is None:
                continue
            kind = layout if leaf == "weight" else "vector"
            slim_name = f"{scope}/{_slim_scope(name)}/{slim_leaf}"
            table[slim_name] = Variable(f"{name}.{leaf}", kind, _slim_shape(tensor.shape, kind))
    return table


def _weight_layout(name: str, module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "logits"  # slim's logits are a 1x1 convolution
    return "root_conv" if name == "conv0" else "conv"


def _slim_scope(module_name: str) -> str:
    """``group1.block0.conv2.bn`` -> ``block2/unit_1/bottleneck_v2/conv2/BatchNorm``."""
    found = _GROUP_BLOCK.fullmatch(module_name)
    if found is None:
        return _ROOT_SCOPES[module_name]
    group, block, layer = found.groups()
    return f"block{int(group) + 1}/unit_{int(block) + 1}/bottleneck_v2/{_UNIT_SCOPES[layer]}"


def _slim_shape(shape: torch.Size, layout: str) -> tuple[int, ...]:
    if layout in ("conv", "root_conv"):
        out_channels, in_channels, height, width = shape
        return (height, width, in_channels, out_channels)
    if layout == "logits":
        classes, features = shape
        return (1, 1, features, classes)
    return tuple(shape)


def is_ignored(name: str) -> bool:
    """Optimizer slots, moving-average shadows and the step counter: not weights."""
    return name in IGNORED_NAMES or name.endswith(IGNORED_SUFFIXES)


def plan_conversion(
    source: str,
    shapes: Mapping[str, tuple[int, ...]],
    floating: Mapping[str, bool],
    use_moving_average: bool,
) -> Plan:
    """Matches the checkpoint's variables (``shapes``; ``floating``: float dtype or not) to the
    ResNetV2 its shapes describe; ConversionError naming every unmapped, missing and mis-shaped
    variable."""
    weights = {name: shape for name, shape in shapes.items() if not is_ignored(name)}
    scope = _model_scope(source, weights)
    num_blocks, width, num_classes = _infer_architecture(source, weights, scope)
    with torch.device("meta"):  # shapes only: nothing allocated
        model = nets.build_model(ARCH, num_blocks=num_blocks, num_classes=num_classes, width=width)
    table = variable_table(model, scope)
    # ExponentialMovingAverage.variables_to_restore: the trainable variables' shadows, the BN
    # moving statistics (not trainable) as they are.
    averages = {name: f"{name}{EMA_SUFFIX}" for name in table if _is_trainable(name)}
    lacking = [shadow for shadow in averages.values() if shadow not in shapes]
    if use_moving_average and lacking:
        raise ConversionError(
            f"{source}: --use-moving-average, but {len(lacking)} of {len(averages)} weights have "
            f"no moving average (first {lacking[0]}); convert the weights without the flag"
        )
    sources = {
        averages.get(name, name) if use_moving_average else name: v for name, v in table.items()
    }
    listed = _mismatches(weights, shapes, floating, table, sources)
    if listed:
        inferred = _describe(num_blocks, width, num_classes)
        raise ConversionError(
            f"{source}: does not match TF-slim's resnet_v2 as its shapes describe it "
            f"({inferred}); " + "; ".join(listed)
        )
    ignored = tuple(name for name in shapes if is_ignored(name))
    return Plan(num_blocks, width, num_classes, sources, ignored, not lacking)


def _mismatches(
    weights: Mapping[str, tuple[int, ...]],
    shapes: Mapping[str, tuple[int, ...]],
    floating: Mapping[str, bool],
    table: Mapping[str, Variable],
    sources: Mapping[str, Variable],
) -> list[str]:
    """ "N unexpected: ...", "N missing: ...", "N mis-shaped: ..." (each kind only if any)."""
    unexpected = [name for name in weights if name not in table]
    missing = [name for name in sources if name not in shapes]
    misshaped = [
        f"{name} (file {_shape(shapes[name])}, model {_shape(v.shape)})"
        for name, v in sources.items()
        if name in shapes and (shapes[name] != v.shape or not floating[name])
    ]
    problems = {"unexpected": unexpected, "missing": missing, "mis-shaped": misshaped}
    return [f"{len(names)} {kind}: {', '.join(names)}" for kind, names in problems.items() if names]


def _is_trainable(name: str) -> bool:
    return name.rsplit("/", 1)[-1] in _TRAINABLE_LEAVES


def _model_scope(source: str, weights: Mapping[str, tuple[int, ...]]) -> str:
    """The one top-level ``resnet_v2_N`` scope (ALP: ``resnet_v2_50``)."""
    scopes = sorted({found.group(1) for name in weights if (found := _SCOPE.match(name))})
    if len(scopes) != 1:
        found = f"scopes {', '.join(scopes)}" if scopes else "none"
        raise ConversionError(
            f"{source}: expected the variables of one TF-slim resnet_v2 model (a resnet_v2_N/ "
            f"scope), found {found}"
        )
    return scopes[0]


def _infer_architecture(
    source: str, weights: Mapping[str, tuple[int, ...]], scope: str
) -> tuple[tuple[int, ...], int, int]:
    """(units per block, width, classes) from the root convolution, the units present and the
    logits' biases."""
    root = weights.get(f"{scope}/conv1/weights", ())
    logits = weights.get(f"{scope}/logits/biases", ())
    units: dict[int, int] = {}
    for name in weights:
        found = _UNIT.match(name.removeprefix(f"{scope}/"))
        if found:
            block, unit = map(int, found.groups())
            units[block] = max(units.get(block, 0), unit)
    num_blocks = tuple(units.get(block, 0) for block in range(1, len(V2_GROUP_STRIDES) + 1))
    if len(root) != 4 or len(logits) != 1 or not all(num_blocks):
        raise ConversionError(
            f"{source}: cannot tell the architecture: it needs {scope}/conv1/weights (7x7x3xW), "
            f"{scope}/logits/biases and units in block1..block4 (found {list(num_blocks)})"
        )
    return num_blocks, int(root[3]), int(logits[0])


def _describe(num_blocks: Sequence[int], width: int, num_classes: int) -> str:
    return f"{ARCH}, blocks {' '.join(map(str, num_blocks))}, width {width}, {num_classes} classes"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def to_torch(array: np.ndarray, layout: str) -> torch.Tensor:
    """A checkpoint array in torch's layout: HWIO -> OIHW; 1x1xCxK logits -> [K, C]."""
    array = np.asarray(array, dtype=np.float32)
    if layout in ("conv", "root_conv"):
        array = array.transpose(3, 2, 0, 1)
    if layout == "root_conv":
        array = array[:, ::-1]  # ALP feeds RGB, this project BGR: the same logits
    if layout == "logits":
        array = array[0, 0].T
    return torch.from_numpy(np.ascontiguousarray(array))


def drop_background_class(state: dict[str, torch.Tensor]) -> None:
    """Removes output 0 of the head, so that output k is ImageNet class k (ALP's k + 1)."""
    state["linear.weight"] = state["linear.weight"][1:].clone()
    state["linear.bias"] = state["linear.bias"][1:].clone()


def _import_tensorflow():
    # TensorFlow's start-up notices would bury the one line this command prints; oneDNN's
    # (printed whatever TF_CPP_MIN_LOG_LEVEL says) goes with its kernels, which only reading a
    # checkpoint never runs.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ConversionError(
            f"reading a TensorFlow checkpoint needs TensorFlow ({error}): {INSTALL_HINT}"
        ) from error
    return tf


def _open_checkpoint(tf, ckpt: str):
    """``(reader, shapes, dtypes)`` of a TF checkpoint (prefix or folder)."""
    try:
        reader = tf.train.load_checkpoint(ckpt)
        shapes = {name: tuple(s) for name, s in reader.get_variable_to_shape_map().items()}
        dtypes = reader.get_variable_to_dtype_map()
    except (tf.errors.OpError, ValueError) as error:
        raise ConversionError(
            f"{ckpt}: not a readable TensorFlow checkpoint ({_first_line(error)})"
        ) from error
    return reader, shapes, dtypes


def check_declared_size(
    ckpt: str, data_files: Sequence[Path], plan: Plan, itemsizes: Mapping[str, int]
) -> None:
    """The variables to read must fit in the checkpoint's data files: a header declaring more
    (a hostile or truncated checkpoint) is refused before anything of that size is allocated."""
    declared = sum(math.prod(v.shape) * itemsizes[name] for name, v in plan.sources.items())
    on_disk = sum(path.stat().st_size for path in data_files)
    if declared > on_disk:
        raise ConversionError(
            f"{ckpt}: its variables declare {declared} bytes but its data files hold {on_disk}; "
            "refused before reading"
        )


def _data_files(tf, ckpt: str) -> list[Path]:
    """The files holding a checkpoint's tensor data: ``PREFIX.data-*`` (format V2), else the
    checkpoint file itself (V1)."""
    prefix = tf.train.latest_checkpoint(ckpt) if os.path.isdir(ckpt) else ckpt
    files = sorted(Path(prefix).parent.glob(f"{Path(prefix).name}.data-*"))
    return files or [Path(prefix)]


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _read_state(tf, ckpt: str, reader, plan: Plan) -> dict[str, torch.Tensor]:
    try:
        return {
            v.key: to_torch(reader.get_tensor(name), v.layout) for name, v in plan.sources.items()
        }
    except (tf.errors.OpError, ValueError) as error:
        raise ConversionError(f"{ckpt}: unreadable variable data ({_first_line(error)})") from error


def convert(args: argparse.Namespace) -> str:
    """Converts ``args.ckpt`` into ``args.out``; returns the line to print."""
    out = Path(args.out)
    if out.suffix.lower() not in _OUT_SUFFIXES:
        raise ConversionError(f"{out}: unknown output extension; use {', '.join(_OUT_SUFFIXES)}")
    tf = _import_tensorflow()
    reader, shapes, dtypes = _open_checkpoint(tf, args.ckpt)
    floating = {name: dtype.is_floating for name, dtype in dtypes.items()}
    plan = plan_conversion(args.ckpt, shapes, floating, args.use_moving_average)
    itemsizes = {name: dtype.size for name, dtype in dtypes.items()}
    check_declared_size(args.ckpt, _data_files(tf, args.ckpt), plan, itemsizes)
    state = _read_state(tf, args.ckpt, reader, plan)
    drop = plan.num_classes == BACKGROUND_OUTPUTS and not args.keep_background_class
    if drop:
        drop_background_class(state)
    num_classes = plan.num_classes - drop
    model = nets.build_model(
        ARCH, num_blocks=plan.num_blocks, num_classes=num_classes, width=plan.width
    )
    model.load_state_dict({**model.state_dict(), **state}, strict=True)
    record = _record(plan.num_blocks, plan.width, num_classes)
    _write(out, model, record)
    return _summary(args, out, plan, record, drop)


def _record(num_blocks: tuple[int, ...], width: int, num_classes: int) -> nets.ArchitectureRecord:
    depth = next(
        (d for d in nets.depths_of(ARCH) if nets.num_blocks_of(ARCH, d) == num_blocks), None
    )
    return nets.ArchitectureRecord(
        arch=ARCH,
        depth=depth,
        num_blocks=None if depth is not None else num_blocks,
        width=width,
        num_classes=num_classes,
    )


def _write(out: Path, model: nn.Module, record: nets.ArchitectureRecord) -> None:
    """A ``.pt`` holds the weights and the architecture record (``--load`` builds the model from
    it); an ``.npz`` the weights under the original format's names."""
    if out.suffix.lower() == NPZ_SUFFIX:
        nets.save_npz(model, out)
        return
    nets.save_weights(model, out, record)


def _summary(
    args: argparse.Namespace,
    out: Path,
    plan: Plan,
    record: nets.ArchitectureRecord,
    dropped: bool,
) -> str:
    notes = [f"{len(plan.sources)} variables"]
    if args.use_moving_average:
        notes.append("their moving averages")
    if plan.ignored:
        notes.append(f"skipped {len(plan.ignored)} optimizer/moving-average/global_step variables")
    if plan.has_averages and not args.use_moving_average:
        notes.append("it holds moving averages of every weight: --use-moving-average reads those")
    if dropped:
        notes.append(
            "dropped output 0 (ALP's background class): outputs 0..999 are ImageNet classes 0..999"
            " (--keep-background-class keeps it)"
        )
    line = (
        f"wrote {out}: {nets.describe_architecture(record.to_dict())} from {args.ckpt} "
        f"({'; '.join(notes)})"
    )
    if out.suffix.lower() == NPZ_SUFFIX:
        line += f"; an .npz records no architecture: load it with {_flags(record)}"
    return line


def _flags(record: nets.ArchitectureRecord) -> str:
    blocks = record.num_blocks
    size = f"-d {record.depth}" if blocks is None else f"--num-blocks {' '.join(map(str, blocks))}"
    return f"--arch {ARCH} {size} --width {record.width}"


def main(argv: list[str] | None = None) -> int:
    return run_converter(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
