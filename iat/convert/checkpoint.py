"""``python -m iat.convert_checkpoint SRC OUT.pt --source timm|torchvision --arch NAME
[--mean R,G,B --std R,G,B]``: a timm or torchvision state dict (RobustBench's ImageNet entries
among them) as this project's self-describing weights.

NAME is the source library's own model name (``convnext_tiny``, ``vit_small_patch16_224``,
``swin_tiny_patch4_window7_224``, ``resnet50``, ``wide_resnet50_2``: ``nets.LAYOUTS``), which is
also this project's ``--arch`` for it. SRC is a ``.pt`` / ``.pth`` file (read with
``torch.load(weights_only=True)``; a state dict, or one under ``"state_dict"`` or ``"model"``)
or a ``.safetensors`` file. Wrapper prefixes (``module.``, ``model.``, ``base_model.``) are
stripped, and RobustBench's normalisation wrapper (``normalize.mean`` / ``normalize.std`` before
the model's ``model.*``; the MadryLab robustness library's ``normalizer.new_mean``, its
``attacker.*`` copy dropped) gives the input statistics. Every tensor is mapped by name; the blocks
per stage, the width and the classes come from its shapes. The model was fed RGB images in
[0, 1] normalised with ``--mean`` / ``--std`` (ImageNet's by default); the converted model holds
them (``preprocess.mean`` / ``preprocess.std``) and takes BGR pixels in [0, 255], as every
model here. A tensor left unmapped, missing or mis-shaped is one error naming them all, and
nothing is written; so is a size beyond ``nets.SIZE_LIMITS``, an expanded (stride-0) tensor or a
non-finite one (each found before any model is built or allocated), or an output folder that
does not exist.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

import nets
from nets.blocks import IMAGENET_MEAN, IMAGENET_STD
from nets.checkpoint import CLASSIFIER_BIASES, PT_SUFFIXES, SAFETENSORS_SUFFIX, require_finite

WRAPPER_PREFIXES = ("module.", "model.", "base_model.")
CONTAINERS = ("state_dict", "model")  # where training scripts keep the state dict
# Normalisation wrappers' buffers (mean, std), RGB on [0, 1]: RobustBench's normalize_model
# (nn.Sequential(normalize=ImageNormalizer(mean, std), model=...)) and the MadryLab robustness
# library's AttackerModel (normalizer=InputNormalize, model=..., attacker=a second reference to
# the model, whose tensors are dropped).
NORMALISERS = (
    ("normalize.mean", "normalize.std"),
    ("normalizer.new_mean", "normalizer.new_std"),
)
DUPLICATE_PREFIXES = ("attacker.",)
# Derived buffers some checkpoints keep (the original Swin's), rebuilt here: skipped by name.
DERIVED_LEAVES = ("relative_position_index", "attn_mask")
# The input statistics the converted model holds (ImageNormalize's buffers).
PREPROCESS_KEYS = ("preprocess.mean", "preprocess.std")
_IN_SUFFIXES = (*PT_SUFFIXES, SAFETENSORS_SUFFIX)
_LISTED = 5  # names listed per kind of mismatch


class ConversionError(ValueError):
    """A checkpoint that cannot be read or converted (reported as one line, exit 1)."""


def run_converter(
    parser: argparse.ArgumentParser,
    convert: Callable[[argparse.Namespace], str],
    argv: list[str] | None,
) -> int:
    """A converter's command line: its line printed and status 0, or one error line and 1."""
    args = parser.parse_args(argv)
    try:
        print(convert(args))
    except (ConversionError, nets.CheckpointError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m iat.convert_checkpoint",
        description="Convert a timm or torchvision state dict into this project's weights.",
    )
    parser.add_argument("src", help="state dict: .pt / .pth (weights only) or .safetensors")
    parser.add_argument("out", help="output weights: .pt or .safetensors, architecture recorded")
    parser.add_argument("--source", required=True, choices=nets.SOURCES, help="its layout")
    parser.add_argument("--arch", required=True, help="the source library's model name")
    parser.add_argument("--mean", type=_triple, help="R,G,B on [0, 1] (default: ImageNet's)")
    parser.add_argument("--std", type=_triple, help="R,G,B on [0, 1] (default: ImageNet's)")
    return parser


def _triple(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not three comma-separated numbers: {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"not three comma-separated numbers: {text!r}")
    return values


def read_state_dict(path: str | Path) -> dict[str, object]:
    """The state dict of a ``.pt`` / ``.pth`` or ``.safetensors`` file, unwrapped from its
    container (``"state_dict"``, ``"model"``)."""
    if Path(path).suffix.lower() not in _IN_SUFFIXES:
        raise ConversionError(f"{path}: unknown extension; use {', '.join(_IN_SUFFIXES)}")
    state: Mapping[str, object] = nets.read_weights(path).tensors
    for container in CONTAINERS:
        if isinstance(state.get(container), Mapping):
            state = state[container]
    return dict(state)


def strip_wrappers(state: Mapping[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """(the model's tensors with wrapper prefixes stripped, a normalisation wrapper's buffers
    ``{"mean": ..., "std": ...}`` if one holds them)."""
    state = dict(state)
    normaliser = {}
    while True:
        for mean, std in NORMALISERS:
            if mean in state and std in state:
                normaliser = {"mean": state.pop(mean), "std": state.pop(std)}
        state = {k: v for k, v in state.items() if not k.startswith(DUPLICATE_PREFIXES)}
        shared = [p for p in WRAPPER_PREFIXES if state and all(k.startswith(p) for k in state)]
        if not shared:
            return state, normaliser
        state = {key.removeprefix(shared[0]): value for key, value in state.items()}


def input_statistics(
    source: str,
    normaliser: Mapping[str, object],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std (RGB, [0, 1] scale): the flags, else RobustBench's wrapper's, else
    ImageNet's; ConversionError when flags and wrapper disagree or a value is unusable."""
    stored = {name: _statistic(source, name, value) for name, value in normaliser.items()}
    chosen = []
    for name, given, default in (("mean", mean, IMAGENET_MEAN), ("std", std, IMAGENET_STD)):
        recorded = stored.get(name)
        if given is not None and recorded is not None and not _close(given, recorded):
            raise ConversionError(
                f"{source}: --{name} {_words(given)} differs from its normalisation wrapper's "
                f"{_words(recorded)}; leave --{name} out to use the wrapper's"
            )
        chosen.append(tuple(given or recorded or default))
    if not all(value > 0 for value in chosen[1]):
        raise ConversionError(f"{source}: --std must be positive, got {_words(chosen[1])}")
    return chosen[0], chosen[1]


def _statistic(source: str, name: str, value: object) -> tuple[float, ...]:
    if not isinstance(value, torch.Tensor) or value.numel() != 3:
        raise ConversionError(f"{source}: its normalisation wrapper's {name} is not 3 values")
    return tuple(value.flatten().tolist())


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(abs(x - y) <= 1e-6 for x, y in zip(a, b, strict=True))


def _words(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def plan_architecture(
    source: str, arch: str, state: Mapping[str, object]
) -> nets.ArchitectureRecord:
    """The architecture record of `arch` at the size `state`'s shapes describe (blocks per
    stage, width, classes); the published size where they describe none (the mismatch is then
    reported by name)."""
    shapes = {key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")}
    depth = nets.depths_of(arch)[0]
    size = nets.LAYOUTS[arch].size_of(list(state), shapes)
    blocks, width = (nets.num_blocks_of(arch, depth), 64) if size is None else size
    if len(blocks) != nets.num_groups_of(arch):
        blocks = nets.num_blocks_of(arch, depth)
    bias = next((shapes[name] for name in CLASSIFIER_BIASES if name in shapes), None)
    num_classes = bias[0] if bias is not None and len(bias) == 1 else 1000
    _check_limits(source, nets.LAYOUTS[arch], state, blocks, width, num_classes)
    published = blocks == nets.num_blocks_of(arch, depth)
    return nets.ArchitectureRecord(
        arch=arch,
        depth=depth,
        num_blocks=None if published else blocks,
        width=width,
        num_classes=num_classes,
    )


def _check_limits(
    source: str,
    layout: nets.Layout,
    state: Mapping[str, object],
    blocks: tuple[int, ...],
    width: int,
    num_classes: int,
) -> None:
    """ConversionError naming the tensor whose name or shape gives a size beyond
    ``nets.SIZE_LIMITS`` (one key ``blocks.19999.*``, a stem of 6144 channels), before any
    model is built from it."""
    try:
        nets.check_size_limits(blocks, width, num_classes)
    except nets.SizeLimitError as error:
        if error.field == "num_blocks":
            key = max(
                (k for k in state if layout.block.match(k)),
                key=lambda k: int(layout.block.match(k)["block"]),
            )
        else:
            biases = [name for name in CLASSIFIER_BIASES if name in state]
            key = layout.stem if error.field == "width" else biases[0]
        raise ConversionError(f"{source}: tensor {key}: {error}; nothing was built") from None


def matched_state(
    source: str, model: nn.Module, state: Mapping[str, object], described: str
) -> dict[str, torch.Tensor]:
    """`model`'s full state dict with `state`'s tensors; ConversionError naming every unmapped,
    missing and mis-shaped tensor."""
    target = model.state_dict()
    weights = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in DERIVED_LEAVES}
    unmapped = [key for key in weights if key not in target]
    missing = [
        key
        for key in target
        if key not in weights and key not in PREPROCESS_KEYS and "num_batches_tracked" not in key
    ]
    misshaped = [
        f"{key} (file {_shape(value)}, model {_shape(target[key])})"
        for key, value in weights.items()
        if key in target and not _fits(value, target[key])
    ]
    kinds = {"unmapped": unmapped, "missing": missing, "mis-shaped": misshaped}
    problems = [f"{len(names)} {kind}: {_listing(names)}" for kind, names in kinds.items() if names]
    if problems:
        raise ConversionError(f"{source}: does not match {described}; " + "; ".join(problems))
    return {**target, **{key: value for key, value in weights.items()}}


def _fits(value: object, expected: torch.Tensor) -> bool:
    if not isinstance(value, torch.Tensor) or value.shape != expected.shape:
        return False
    return value.is_floating_point() == expected.is_floating_point()


def _shape(value: object) -> str:
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    return "x".join(map(str, value.shape)) or "scalar"


def _listing(names: list[str]) -> str:
    hidden = len(names) - _LISTED
    return ", ".join(names[:_LISTED]) + (f", ... and {hidden} more" if hidden > 0 else "")


def output_path(out: str) -> Path:
    """A converter's output file: .pt or .safetensors, in a folder that exists (else one
    ConversionError)."""
    path = Path(out)
    if path.suffix.lower() not in (".pt", SAFETENSORS_SUFFIX):
        raise ConversionError(f"{path}: unknown output extension; use .pt or {SAFETENSORS_SUFFIX}")
    if not path.parent.is_dir():
        raise ConversionError(f"{path}: no folder {path.parent} to write into; create it first")
    return path


def convert(args: argparse.Namespace) -> str:
    """Converts ``args.src`` into ``args.out``; returns the line to print."""
    out = output_path(args.out)
    layout = nets.LAYOUTS.get(args.arch)
    if layout is None or layout.source != args.source:
        names = [name for name, lay in nets.LAYOUTS.items() if lay.source == args.source]
        raise ConversionError(
            f"--arch {args.arch}: not a {args.source} model this project has; "
            f"{args.source} names: {', '.join(sorted(names))}"
        )
    state, normaliser = strip_wrappers(read_state_dict(args.src))
    mean, std = input_statistics(args.src, normaliser, args.mean, args.std)
    record = plan_architecture(args.src, args.arch, state)
    described = f"{args.source}'s {nets.describe_architecture(record.to_dict())}"
    with torch.device("meta"):  # shapes only: a state dict that does not fit allocates nothing
        matched_state(args.src, record.build(), state, described)
    require_finite(args.src, state)  # NaN weights are refused here, not when loaded
    model = record.build()
    model.load_state_dict(matched_state(args.src, model, state, described))
    with torch.no_grad():  # the input convention, folded in: the model takes BGR pixels
        model.preprocess.mean.copy_(torch.tensor(mean).view(1, 3, 1, 1))
        model.preprocess.std.copy_(torch.tensor(std).view(1, 3, 1, 1))
    nets.save_weights(model, out, record)
    return (
        f"wrote {out}: {described} from {args.src} ({len(state)} tensors; input RGB in [0, 1], "
        f"mean {_words(mean)}, std {_words(std)}, folded in: it takes BGR pixels in [0, 255])"
    )


def main(argv: list[str] | None = None) -> int:
    return run_converter(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
