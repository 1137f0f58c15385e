"""Weights in the original tensorpack ``.npz`` format and in this project's own ``.pt`` format.

Original names are the torch module paths with ``/`` separators plus a leaf per tensor:
convolution ``W`` (HWIO layout, torch OIHW) and ``b`` (if it has a bias), BatchNorm ``bn/gamma``,
``bn/beta``, ``bn/mean/EMA``, ``bn/variance/EMA``, fully connected ``W`` ([in, out], torch
[out, in]) and ``b``. Nothing is ever unpickled: ``.npz`` members are parsed as ``.npy`` arrays
without pickles, ``.pt`` files with ``torch.load(weights_only=True)``. A hostile ``.npz``
allocates nothing: ``read_weights`` reads only the zip directory and each member's ``.npy`` header
(names, shapes, dtypes, sizes checked against the zip entry), and array data is read by
``load_weights`` only after the names and shapes match the model, so a zip bomb under an extra
name or a header declaring 10^12 elements is refused without being decompressed or allocated.
A ``.pt`` file's zip directory is checked before ``torch.load`` inflates anything (``torch.save``
stores its members uncompressed: together they declare at most the file's size), and top-level
keys a file of this project never has are refused. Weights are loaded only when every floating
tensor is finite and of a floating dtype (nothing is cast or carried on silently).

``.safetensors`` files (Hugging Face's format: a JSON header and raw tensors, nothing to unpickle)
hold a state dict, and the architecture record as JSON in their metadata.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from iat.runtime.atomic_io import atomic_write
from nets.denoise import DENOISE_OPS
from nets.record import ArchitectureRecord, complete_record
from nets.registry import DEFAULT_DENOISE_OPS, SizeLimitError, check_size_limits

PT_SUFFIXES = (".pt", ".pth")
NPZ_SUFFIX = ".npz"
SAFETENSORS_SUFFIX = ".safetensors"
# tensorpack's dump-model-params stores tensor names ("conv0/W:0"); the manifests use variable
# names ("conv0/W"). Both are accepted on load.
TENSOR_NAME_SUFFIX = ":0"
LISTED_NAMES = 3  # names listed per kind of mismatch: the error stays a few hundred characters
_NPZ_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,  # a compression method zipfile lacks
    RuntimeError,  # an encrypted member
)
_NPY_SUFFIX = ".npy"
_NPY_MAGIC = b"\x93NUMPY"
# numpy's own limit on .npy header lengths (np.lib.format._MAX_HEADER_SIZE): a plain array's
# header is under 200 bytes.
_NPY_MAX_HEADER = 10000
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
# The key under which a checkpoint records its architecture (nets.record.ArchitectureRecord's
# plain values), written by save_weights.
ARCHITECTURE_KEY = "architecture"
# The top-level keys of a .pt file of this project that holds more than a state_dict: the weights
# and their architecture record (iat.convert.alp), and a training checkpoint's optimizer state,
# progress, random state, averaged weights, free training's perturbation, fp16's loss scaler
# and the stage its epoch trained in (iat.runs.state.save_checkpoint). Any other key is refused:
# an extra key is where a zip bomb or a forged payload hides (issue 22).
TRAINING_FIELDS = frozenset(
    {"optimizer", "epoch", "step", "rng", "ema", "free_delta", "grad_scaler", "stage"}
)
PT_FIELDS = frozenset({"model", ARCHITECTURE_KEY, *TRAINING_FIELDS})
# A classifier behind a model-level defense (iat.defenses.registry, e.g. the sparse-coding
# frontend) keeps its state_dict entries under this prefix, beside the defense's own (the
# frontend's under "frontend.").
CLASSIFIER_PREFIX = "classifier."
# torch.save's legacy (non-zip) format opens with a pickled magic number (torch.serialization.
# MAGIC_NUMBER, pickle protocol 2); any other non-zip file is not a torch checkpoint.
_PT_LEGACY_START = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
# The final layer's bias in the zoo's state dicts: the original's layout, timm's ConvNeXt and
# Swin, timm's ViT, torchvision's ResNets.
CLASSIFIER_BIASES = ("linear.bias", "head.fc.bias", "head.bias", "fc.bias")
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")
_Array = TypeVar("_Array")  # what a name maps to: an array, or the NpyMember declaring one
_IGNORED_BUFFER = "num_batches_tracked"
_BN_LEAVES = {
    "weight": "gamma",
    "bias": "beta",
    "running_mean": "mean/EMA",
    "running_var": "variance/EMA",
}


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not match the model."""


@dataclass(frozen=True)
class _Variable:
    original: str  # name in the original checkpoint, e.g. "group0/block0/conv1/W"
    key: str  # torch state_dict key, e.g. "group0.block0.conv1.weight"
    layout: str  # "conv" (OIHW <-> HWIO), "linear" ([out, in] <-> [in, out]) or "vector"


def model_to_npz_dict(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's weights as the original checkpoint's ``{name: float32 array}``."""
    state = model.state_dict()
    return {v.original: _to_original(state[v.key], v.layout) for v in _variables(model)}


def save_npz(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Writes the weights in the original ``.npz`` format, atomically."""
    arrays = model_to_npz_dict(model)
    atomic_write(Path(path), lambda file: np.savez(file, **arrays))


def save_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    architecture: ArchitectureRecord | Mapping[str, object] | None = None,
    training_state: Mapping[str, object] | None = None,
) -> None:
    """Writes ``model.state_dict()`` atomically: the one writer of this project's ``.pt`` and
    ``.safetensors`` files.

    A ``.pt`` file holds the state dict or, with `architecture` (a ``nets.ArchitectureRecord``,
    or a mapping ``ArchitectureRecord.from_dict`` reads; written complete, a model-level
    defense's fields kept), ``{"model": state dict, ARCHITECTURE_KEY: record}``, which
    ``load_model`` and ``--load`` build the model from, with a training checkpoint's
    `training_state` beside them (``TRAINING_FIELDS``: optimizer, progress, ...). A
    ``.safetensors`` file holds the tensors, and the record as JSON in its metadata. ValueError
    for an invalid record or an unknown field."""
    path = Path(path)
    state = model.state_dict()
    record = None if architecture is None else complete_record(architecture)
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        if training_state:
            raise ValueError(f"{path}: a .safetensors file holds no training state; use .pt")
        data = _safetensors_bytes(state, record)
        atomic_write(path, lambda file: file.write(data))
        return
    contents = _pt_contents(state, record, training_state or {})
    atomic_write(path, lambda file: torch.save(contents, file))


def _pt_contents(
    state: Mapping[str, torch.Tensor],
    record: Mapping[str, object] | None,
    training_state: Mapping[str, object],
) -> Mapping[str, object]:
    """A ``.pt`` file's top level: the bare state dict, or ``"model"`` with the record and the
    training state (only ``TRAINING_FIELDS``, which the reader accepts)."""
    unknown = sorted(set(training_state) - TRAINING_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown training-state fields {unknown}; known: {sorted(TRAINING_FIELDS)}"
        )
    if record is None and not training_state:
        return state
    if record is None:
        raise ValueError("a training checkpoint records its architecture")
    return {"model": state, ARCHITECTURE_KEY: record, **training_state}


def _safetensors_bytes(
    state: Mapping[str, torch.Tensor], record: Mapping[str, object] | None
) -> bytes:
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    metadata = None if record is None else {ARCHITECTURE_KEY: json.dumps(record)}
    return safetensors.torch.save(tensors, metadata=metadata)


def load_model(path: str | os.PathLike[str]) -> nn.Module:
    """The model a self-describing checkpoint (a ``.pt`` or ``.safetensors`` file with an
    architecture record: a training checkpoint, ``python -m iat.convert_checkpoint``'s output)
    describes, its weights loaded, in eval mode; it takes BGR pixels in [0, 255]. An
    input-transform defense the record names is not applied (``main.py --eval`` applies it)."""
    weights = read_weights(path)
    record = weights.architecture
    if record is None:
        raise CheckpointError(
            f"{weights.source}: records no architecture; build the model with "
            "nets.build_model and load it with nets.load_weights"
        )
    if any(str(key).startswith(CLASSIFIER_PREFIX) for key in weights.tensors):
        raise CheckpointError(
            f"{weights.source}: carries a model-level defense (a sparse-coding frontend, ...); "
            "load it with main.py --eval"
        )
    try:
        parsed = ArchitectureRecord.from_dict(record)
    except ValueError as error:
        raise CheckpointError(
            f"{weights.source}: field {ARCHITECTURE_KEY!r} is not a valid architecture record "
            f"({error})"
        ) from None
    check_fits(parsed.build, weights)
    model = parsed.build()
    load_weights(model, weights)
    return model.eval()


def check_fits(build: Callable[[], nn.Module], weights: Weights) -> None:
    """CheckpointError naming the missing, unexpected and mis-shaped tensors of `weights` for
    the model ``build()`` makes, built on the ``meta`` device (shapes only, nothing allocated,
    no data read): a record or flags describing another model than the file's tensors (a width
    of 640, 5000 blocks) is refused before gigabytes are allocated and initialised. The
    tensors' storage was checked when read, so a model that fits holds no more than the file."""
    with torch.device("meta"):
        model = build()
    if weights.kind == "npz":
        _check_npz(model, weights.source, weights.tensors)
    else:
        trained_as = describe_architecture(weights.architecture)
        _pt_state(model, weights.source, weights.tensors, trained_as)


@dataclass(frozen=True)
class NpyMember:
    """One ``.npz`` member as its ``.npy`` header declares it (its data not yet read)."""

    member: str  # name inside the zip archive, e.g. "conv0/W:0.npy"
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def nbytes(self) -> int:
        """Bytes of data the header declares (Python integers: no overflow)."""
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Weights:
    """A checkpoint file read once: its tensors, and (``.pt``) everything stored beside them.

    For ``.npz`` files ``tensors`` holds each member's declared ``NpyMember`` (shape, dtype);
    ``load_weights`` reads the data after checking them against the model."""

    source: str  # the file, for error messages
    kind: str  # "npz" (original names, original layouts) or "pt" (a torch state_dict)
    tensors: Mapping[str, object]  # npz: {name: NpyMember}; pt: {state_dict key: tensor}
    contents: Mapping[str, object] | None  # a .pt file's top-level mapping (training state)

    @property
    def num_classes(self) -> int:
        """The classes: those a valid architecture record names (any registered architecture),
        else the outputs of the final layer (``linear/b``, or a ``CLASSIFIER_BIASES`` tensor,
        also behind a frontend)."""
        recorded = _recorded_classes(self.architecture)
        if recorded is not None:
            return recorded
        names = ("linear/b",) if self.kind == "npz" else CLASSIFIER_BIASES
        found = (
            (prefix + name, self.tensors.get(prefix + name))
            for name in names
            for prefix in ("", CLASSIFIER_PREFIX)
            if prefix + name in self.tensors
        )
        name, bias = next(found, (None, None))
        if bias is None or len(getattr(bias, "shape", ())) != 1:
            raise CheckpointError(
                f"{self.source}: no final layer (linear/b) to count the classes from"
            )
        try:
            check_size_limits(num_classes=int(bias.shape[0]))
        except SizeLimitError as error:
            raise CheckpointError(f"{self.source}: tensor {name}: {error}") from None
        return int(bias.shape[0])

    @property
    def architecture(self) -> Mapping[str, object] | None:
        """What a training checkpoint says it was trained as (``ARCHITECTURE_KEY``), if it does."""
        record = (self.contents or {}).get(ARCHITECTURE_KEY)
        return record if isinstance(record, Mapping) else None


def _recorded_classes(record: Mapping[str, object] | None) -> int | None:
    try:
        return None if record is None else ArchitectureRecord.from_dict(record).num_classes
    except ValueError:
        return None  # an invalid record is refused where the model is built from it


def read_weights(path: str | os.PathLike[str]) -> Weights:
    """Reads an original ``.npz`` or an own ``.pt`` checkpoint (without unpickling anything).

    A ``.pt`` file holds a state_dict or a training checkpoint whose ``"model"`` entry is one.
    Of an ``.npz`` file only the directory and the ``.npy`` headers are read (nothing is
    allocated for the arrays). Raises CheckpointError naming the file when it cannot be read."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == NPZ_SUFFIX:
        return Weights(str(path), "npz", _variable_names(path, _read_npz_headers(path)), None)
    if suffix in PT_SUFFIXES:
        contents = _read_pt(path)
        return Weights(str(path), "pt", _state_dict_of(path, contents), contents)
    if suffix == SAFETENSORS_SUFFIX:
        tensors, metadata = read_safetensors(path)
        return Weights(str(path), "pt", tensors, _safetensors_contents(path, metadata))
    expected = ", ".join((NPZ_SUFFIX, *PT_SUFFIXES, SAFETENSORS_SUFFIX))
    raise CheckpointError(f"{path}: unknown checkpoint extension {suffix!r}; use {expected}")


def load_weights(model: nn.Module, weights: str | os.PathLike[str] | Weights) -> None:
    """Loads a checkpoint (a path, or ``read_weights``' result) into ``model``, strictly.

    Raises CheckpointError naming the file when it cannot be read, or naming the missing,
    unexpected and mis-shaped tensors when it does not match the model.
    """
    if not isinstance(weights, Weights):
        weights = read_weights(weights)
    trained_as = describe_architecture(weights.architecture)
    if weights.kind == "npz":
        _check_npz(model, weights.source, weights.tensors)  # from the headers, before any data
        arrays = _read_npz_arrays(Path(weights.source), weights.tensors)
        state = _npz_state(model, weights.source, arrays)
    else:
        state = _pt_state(model, weights.source, weights.tensors, trained_as)
    require_finite(weights.source, state)
    model.load_state_dict(state, strict=True)


def require_finite(source: str, tensors: Mapping[str, object], field: str = "") -> None:
    """CheckpointError naming the floating tensors of `tensors` (any nesting of mappings and
    lists, as optimizer state) that hold NaN or Inf: such weights, averages or optimizer state
    are never loaded (``--eval`` would print a meaningless number, training would carry them)."""
    named = dict(_floating_tensors(tensors, field))
    if not named:
        return
    finite = torch.stack([torch.isfinite(t).all() for t in named.values()]).tolist()  # one sync
    bad = [name for name, ok in zip(named, finite, strict=True) if not ok]
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} tensor(s) hold NaN or Inf: {_listing(bad)}; non-finite "
            "weights are never loaded"
        )


def _floating_tensors(value: object, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    for key, tensor in _tensors(value, name):
        if tensor.is_floating_point() and tensor.numel():
            yield key, tensor


def describe_architecture(record: Mapping[str, object] | None) -> str:
    """``record`` (``Weights.architecture``) in words, e.g. "ResNet (blocks 1 1 1 1, width 8,
    3 classes)" or "ResNetDenoise (depth 50, width 64, 1000 classes, denoising median 3x3)";
    ", behind a sparse-coding frontend" when the record carries one; empty when unknown."""
    if record is None:
        return ""
    blocks = record.get("num_blocks")
    size = f"blocks {' '.join(map(str, blocks))}" if blocks else f"depth {record.get('depth')}"
    return (
        f"{record.get('arch')} ({size}, width {record.get('width')}, "
        f"{record.get('num_classes')} classes{_describe_denoise(record)})"
        + (", behind a sparse-coding frontend" if record.get("frontend") else "")
    )


def _describe_denoise(record: Mapping[str, object]) -> str:
    """ ", denoising median 3x3" when the record names an op other than the architecture's
    original one (records without one mean the original)."""
    op = record.get("denoise_op")
    if op is None or op == DEFAULT_DENOISE_OPS.get(record.get("arch")):
        return ""
    window = record.get("denoise_window")
    local = op in DENOISE_OPS and DENOISE_OPS[op].local
    return f", denoising {op}" + (f" {window}x{window}" if local else "")


def classifier_name(model: nn.Module) -> str:
    """The module name of `model`'s final layer (``linear``, ``head.fc``, ``head``, ``fc``: the
    owner of a ``CLASSIFIER_BIASES`` tensor)."""
    state = model.state_dict()
    name = next((bias for bias in CLASSIFIER_BIASES if bias in state), None)
    if name is None:
        raise ValueError(f"{type(model).__name__} has no final layer among {CLASSIFIER_BIASES}")
    return name.removesuffix(".bias")


def checkpoint_num_classes(path: str | os.PathLike[str]) -> int:
    """Outputs of the checkpoint's final layer (``linear/b`` or ``linear.bias``): its classes."""
    return read_weights(path).num_classes


def load_npz_dict(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Loads ``{original name: array}`` (as from ``model_to_npz_dict``) into ``model``, strictly."""
    source = "<arrays>"
    named = _variable_names(source, arrays.items())
    model.load_state_dict(_npz_state(model, source, named), strict=True)


def npz_variable_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Original names and shapes (original layouts) of the model's weights, without copying them.

    Works on models built on the ``meta`` device.
    """
    state = model.state_dict()
    return {v.original: _original_shape(state[v.key].shape, v.layout) for v in _variables(model)}


def _variables(model: nn.Module) -> list[_Variable]:
    """Every exported tensor of ``model`` with its original name; fails on unnamed ones."""
    variables = [
        v for name, module in model.named_modules() for v in _module_variables(name, module)
    ]
    covered = {v.key for v in variables}
    unnamed = [k for k in model.state_dict() if k not in covered and not _is_ignored(k)]
    if unnamed:
        raise ValueError(f"model tensors without an original checkpoint name: {_listing(unnamed)}")
    return variables


def _module_variables(name: str, module: nn.Module) -> Iterator[_Variable]:
    prefix = name.replace(".", "/")
    key = f"{name}." if name else ""
    if isinstance(module, nn.Conv2d):
        yield _Variable(f"{prefix}/W", f"{key}weight", "conv")
        if module.bias is not None:
            yield _Variable(f"{prefix}/b", f"{key}bias", "vector")
    elif isinstance(module, nn.BatchNorm2d):
        for leaf, original in _BN_LEAVES.items():
            yield _Variable(f"{prefix}/{original}", f"{key}{leaf}", "vector")
    elif isinstance(module, nn.Linear):
        yield _Variable(f"{prefix}/W", f"{key}weight", "linear")
        if module.bias is not None:
            yield _Variable(f"{prefix}/b", f"{key}bias", "vector")


def _is_ignored(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == _IGNORED_BUFFER


def _to_original(tensor: torch.Tensor, layout: str) -> np.ndarray:
    array = tensor.detach().to("cpu", torch.float32).numpy()
    if layout == "conv":
        array = array.transpose(2, 3, 1, 0)
    elif layout == "linear":
        array = array.T
    return np.ascontiguousarray(array)


def _from_original(array: np.ndarray, layout: str) -> torch.Tensor:
    """A torch-layout view of ``array``; ``load_state_dict`` then copies it in one pass."""
    array = np.asarray(array, dtype=np.float32)
    tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    if layout == "conv":
        return tensor.permute(3, 2, 0, 1)
    if layout == "linear":
        return tensor.T
    return tensor


def _original_shape(shape: torch.Size, layout: str) -> tuple[int, ...]:
    if layout == "conv":
        return (shape[2], shape[3], shape[1], shape[0])
    if layout == "linear":
        return tuple(reversed(shape))
    return tuple(shape)


def _read_npz_headers(path: Path) -> list[tuple[str, NpyMember]]:
    """Every member's name (without ".npy") and declared array, from the headers alone."""
    _require_file(path)
    with path.open("rb") as file:
        if file.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
            raise CheckpointError(f"{path}: holds a single array, not an .npz archive of variables")
    try:
        with zipfile.ZipFile(path) as archive:
            return [_read_member_header(path, archive, info) for info in archive.infolist()]
    except CheckpointError:
        raise
    except _NPZ_ERRORS as error:
        raise CheckpointError(f"{path}: unreadable .npz checkpoint ({error})") from error


def _parse_npy_header(file: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of an ``.npy`` stream; reads only the header bytes."""
    version = np.lib.format.read_magic(file)
    if version not in _NPY_HEADER_READERS:
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    try:
        return _NPY_HEADER_READERS[version](file, max_header_size=_NPY_MAX_HEADER)
    except ValueError as error:
        if "max_header_size" not in str(error):
            raise
        # numpy's message advises allow_pickle=True, which is never given here.
        raise ValueError(
            f"its header is longer than the {_NPY_MAX_HEADER} bytes an array's needs"
        ) from None


def _read_member_header(
    path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo
) -> tuple[str, NpyMember]:
    """One member's declared array, refused unless it is a plain array whose declared size is
    exactly what the zip entry holds (so reading it later allocates no more than that)."""
    name = info.filename
    if not name.endswith(_NPY_SUFFIX):
        raise CheckpointError(f"{path}: member {name} is not an .npy array")
    try:
        with archive.open(info) as file:
            shape, fortran_order, dtype = _parse_npy_header(file)
            header_bytes = file.tell()
    except _NPZ_ERRORS as error:
        raise CheckpointError(f"{path}: member {name}: unreadable .npy header ({error})") from error
    member = NpyMember(name, shape, dtype, fortran_order)
    if dtype.hasobject:
        raise CheckpointError(f"{path}: member {name} holds Python objects, which are never loaded")
    held = info.file_size - header_bytes
    if member.nbytes != held:
        raise CheckpointError(
            f"{path}: member {name} declares {_shape(shape)} {dtype} ({member.nbytes} bytes) but "
            f"its zip entry holds {held} bytes of data"
        )
    return name.removesuffix(_NPY_SUFFIX), member


def _read_npz_arrays(path: Path, members: Mapping[str, NpyMember]) -> dict[str, np.ndarray]:
    """The data of ``members`` (already checked against the model), each exactly its size."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {name: _read_member_data(path, archive, m) for name, m in members.items()}
    except CheckpointError:
        raise
    except _NPZ_ERRORS as error:
        raise CheckpointError(f"{path}: unreadable .npz checkpoint ({error})") from error


def _read_member_data(path: Path, archive: zipfile.ZipFile, member: NpyMember) -> np.ndarray:
    with archive.open(member.member) as file:
        declared = _parse_npy_header(file)
        if declared != (member.shape, member.fortran_order, member.dtype):
            raise CheckpointError(f"{path}: member {member.member} changed while being read")
        data = bytearray(file.read(member.nbytes))  # writable: torch uses it without a copy
    if len(data) != member.nbytes:
        raise CheckpointError(f"{path}: member {member.member} is truncated")
    order = "F" if member.fortran_order else "C"
    return np.frombuffer(data, member.dtype).reshape(member.shape, order=order)


def _variable_names(source: Path | str, arrays: Iterable[tuple[str, _Array]]) -> dict[str, _Array]:
    """``(name, array)`` pairs keyed by variable names ("conv0/W"), accepting tensor names
    ("conv0/W:0"); a name stored twice (also as both) is refused."""
    named = [(name.removesuffix(TENSOR_NAME_SUFFIX), array) for name, array in arrays]
    counts = Counter(name for name, _ in named)
    duplicates = sorted(name for name, count in counts.items() if count > 1)
    if duplicates:
        raise CheckpointError(f"{source}: variables stored twice: {_listing(duplicates)}")
    return dict(named)


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """A ``.safetensors`` file's tensors and its metadata (string to string); CheckpointError
    naming the file when it cannot be read."""
    path = Path(path)
    _require_file(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        return safetensors.torch.load_file(str(path)), metadata
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: unreadable .safetensors file ({error})") from error


def _safetensors_contents(path: Path, metadata: Mapping[str, str]) -> dict[str, object] | None:
    """The architecture record a ``.safetensors`` file's metadata holds, as ``Weights.contents``."""
    text = metadata.get(ARCHITECTURE_KEY)
    if text is None:
        return None
    try:
        return {ARCHITECTURE_KEY: json.loads(text)}
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path}: its metadata {ARCHITECTURE_KEY!r} is not JSON ({error})"
        ) from None


def _read_pt(path: Path) -> Mapping[str, object]:
    _require_file(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: unreadable .pt checkpoint (an empty file)")
    _check_pt_archive(path)
    try:
        with warnings.catch_warnings():
            # torch warns (two lines) about pickles it did not write; the error says it all.
            warnings.simplefilter("ignore")
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused by torch.load(weights_only=True): {_refused_object(str(error))}; "
            "only tensors and plain containers are loaded, nothing was run"
        ) from error
    except (RuntimeError, OSError, ValueError, EOFError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: unreadable .pt checkpoint ({reason})") from error
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path}: holds {type(content).__name__}, not a state_dict")
    _check_storage(path, content)
    return content


def _check_storage(path: Path, contents: Mapping[str, object]) -> None:
    """CheckpointError naming the first tensor (at any nesting: weights, averages, optimizer
    state) that is not dense (sparse), or whose elements need more bytes than its storage
    holds: an expanded (stride-0) or overlapping view, which torch.save keeps as it is
    (``zeros(1).expand(2_500_000_000)`` is a few KB on disk), and which any copy, cast or
    finiteness check would inflate to gigabytes. Nothing is allocated for it; every other check
    of the file comes after this one."""
    for name, tensor in _tensors(contents, ""):
        if tensor.layout != torch.strided:  # sparse: its size is declared, not held
            raise CheckpointError(
                f"{path}: tensor {name} is {str(tensor.layout).removeprefix('torch.')}, not "
                "dense; a checkpoint of weights holds only dense tensors, nothing was loaded"
            )
        needed = tensor.numel() * tensor.element_size()
        held = tensor.untyped_storage().nbytes()
        if needed > held:
            raise CheckpointError(
                f"{path}: tensor {name} declares {_shape(tensor.shape)} ({needed} bytes) but its "
                f"storage holds {held} bytes (an expanded view); nothing was allocated for it"
            )


def _tensors(value: object, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `value` (any nesting of mappings and lists) with its dotted name."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{name}[{index}]")


def _check_pt_archive(path: Path) -> None:
    """A zip-format ``.pt``'s directory, before torch.load inflates anything. ``torch.save``
    stores its members uncompressed, so together they declare at most the file's own size: a
    member declaring more is compressed (a zip bomb inflates 1.7 MB into 2 GB) and is refused.
    Torch's legacy (non-zip) format holds nothing compressed."""
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        with path.open("rb") as file:
            if file.read(len(_PT_LEGACY_START)) != _PT_LEGACY_START:
                raise CheckpointError(
                    f"{path}: not a torch.save file (neither its zip format nor its legacy one: "
                    "a raw pickle?); nothing was loaded"
                )
        return
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except _NPZ_ERRORS as error:
        raise CheckpointError(f"{path}: unreadable .pt checkpoint ({error})") from error
    declared = sum(m.file_size for m in members)
    if declared > size:
        largest = max(members, key=lambda m: m.file_size)
        raise CheckpointError(
            f"{path}: its members declare {declared} bytes in a file of {size} (member "
            f"{largest.filename}: {largest.file_size} bytes stored in {largest.compress_size}); "
            "torch.save never compresses, so nothing was inflated"
        )


def _state_dict_of(path: Path, contents: Mapping[str, object]) -> Mapping[str, object]:
    """A training checkpoint's ``"model"`` entry (its other keys those of ``PT_FIELDS``), or
    the file's mapping itself."""
    model = contents.get("model")
    if not isinstance(model, Mapping):
        return contents
    unknown = sorted(str(key) for key in contents if key not in PT_FIELDS)
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} unknown field(s): {_listing(unknown)}; a checkpoint of this "
            f"project holds only {', '.join(sorted(PT_FIELDS))}"
        )
    return model


def _refused_object(message: str) -> str:
    """What torch's weights-only unpickler refused, from its message ("GLOBAL module.name");
    torch's advice (which includes loading unsafely) is deliberately not repeated."""
    found = _REFUSED_GLOBAL.search(message)
    return f"it holds the Python object {found.group(1)}" if found else "it holds Python objects"


def _require_file(path: Path) -> None:
    """A checkpoint is a regular file (a link to one is fine): a FIFO would block its reader, a
    device would read without end."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (a folder, FIFO or device)")


def _npz_state(
    model: nn.Module, source: Path | str, arrays: Mapping[str, np.ndarray]
) -> dict[str, torch.Tensor]:
    """The full state_dict for ``model`` from original arrays; strict name and shape check."""
    variables = _check_npz(model, source, arrays)
    state = model.state_dict()
    for name, variable in variables.items():
        state[variable.key] = _from_original(arrays[name], variable.layout)
    return state


def _check_npz(
    model: nn.Module, source: Path | str, arrays: Mapping[str, np.ndarray | NpyMember]
) -> dict[str, _Variable]:
    """The model's variables by original name, once `arrays` (data, or the shapes and dtypes
    their headers declare) match them exactly; else CheckpointError naming the differences."""
    variables = {v.original: v for v in _variables(model)}
    state = model.state_dict()
    shapes = {n: _original_shape(state[v.key].shape, v.layout) for n, v in variables.items()}
    missing = [name for name in variables if name not in arrays]
    unexpected = [name for name in arrays if name not in variables]
    misshaped = [
        f"{name} (file {_describe(array)}, model {_shape(shapes[name])})"
        for name, array in arrays.items()
        if name in shapes and not _fits(array, shapes[name])
    ]
    _check_match(source, missing, unexpected, misshaped)
    return variables


def _fits(array: np.ndarray | NpyMember, shape: tuple[int, ...]) -> bool:
    return array.shape == shape and np.issubdtype(array.dtype, np.floating)


def _pt_state(
    model: nn.Module, path: Path | str, content: Mapping[str, object], trained_as: str = ""
) -> dict[str, torch.Tensor]:
    """The full state_dict for ``model`` from an own checkpoint; strict name and shape check."""
    state = model.state_dict()
    missing = [k for k in state if k not in content and not _is_ignored(k)]
    unexpected = [str(k) for k in content if k not in state]
    misshaped, cast = [], []
    for key, value in content.items():
        if key not in state:
            continue
        expected = state[key].shape
        if not isinstance(value, torch.Tensor) or value.shape != expected:
            misshaped.append(f"{key} (file {_describe(value)}, model {_shape(expected)})")
            continue
        if state[key].is_floating_point() and not value.is_floating_point():
            cast.append(f"{key} ({str(value.dtype).removeprefix('torch.')})")
        state[key] = value
    _check_match(path, missing, unexpected, misshaped, trained_as)
    if cast:
        raise CheckpointError(
            f"{path}: {len(cast)} weight(s) not floating point: {_listing(cast)}; weights are "
            "never cast"
        )
    return state


def _check_match(
    source: Path | str,
    missing: list[str],
    unexpected: list[str],
    misshaped: list[str],
    trained_as: str = "",
) -> None:
    kinds = {"missing": missing, "unexpected": unexpected, "mis-shaped": misshaped}
    problems = [f"{len(names)} {kind}: {_listing(names)}" for kind, names in kinds.items() if names]
    if problems:
        known = f" (it was trained as {trained_as})" if trained_as else ""
        raise CheckpointError(f"{source}: does not match the model{known}; " + "; ".join(problems))


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED_NAMES])
    hidden = len(names) - LISTED_NAMES
    return f"{shown}, ... and {hidden} more" if hidden > 0 else shown


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray | NpyMember):
        return f"{_shape(value.shape)} {value.dtype}"
    if isinstance(value, torch.Tensor):
        return _shape(value.shape)
    return type(value).__name__


def _shape(shape: tuple[int, ...] | torch.Size) -> str:
    return "x".join(map(str, shape)) or "scalar"
