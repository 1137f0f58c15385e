"""Sharded checkpoints (--fsdp): the run state saved and loaded by every process through
``torch.distributed.checkpoint`` (DCP), written atomically, read without unpickling.

A checkpoint is a folder ``checkpoint-epochNNNN.dcp`` (``iat.runs.files`` names it) holding:

* one safetensors file per process that had tensors to write (DCP's Hugging Face storage,
  ``shard-0000R-model-00001-of-00001.safetensors``): the model's, the optimizer's and the moving
  average's shards under ``model.``, ``optimizer.<param>.<key>`` and ``ema.``, the training
  attack's generator state under ``rng.attack``; each tensor's place in the whole is in the
  file's JSON header (DCP's sharding offsets), so that any number of processes can read it;
* ``state.json`` (``SHARDED_STATE_FILE``): progress, the architecture record, the optimizer's
  hyperparameters per group (its parameters by name), the generator's device, fp16's loss scaler,
  the training stage of its epoch under a schedule (``STAGE_FIELD``, as single-file checkpoints
  record it) and the world size it was saved from.

DCP's default ``FileSystemReader`` unpickles a ``.metadata`` file; this format has none: the
tensors' layout is read from the safetensors headers (``HuggingFaceStorageReader``), the rest
from JSON, and a folder holding any other file is refused before anything is read. The folder is
written as ``.checkpoint-epochNNNN.dcp.tmp`` and renamed once every process has written its
shards and rank 0 the state file: a killed run leaves a temporary, never half a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import nets
from iat.runs.files import (
    LAST_SHARDED_LINK,
    PARTIAL_SHARDED,
    SHARDED_STATE_FILE,
    list_checkpoints,
    list_sharded_checkpoints,
    partial_path,
)
from iat.runs.state import STAGE_FIELD, Progress, Start, checked_stage, plan_start
from iat.runtime import distributed
from iat.runtime.atomic_io import atomic_write_text, read_regular
from nets import CheckpointError

FORMAT = "iat-sharded-checkpoint-1"
STATE_BYTES = 1 << 24  # state.json: numbers and names, far below this
# DCP's Hugging Face writer names each process's file so (torch.distributed.checkpoint._hf_utils)
SHARD_FILE = re.compile(r"^shard-\d{5}-model-\d{5}-of-\d{5}\.safetensors$")
MODEL, OPTIMIZER, EMA, RNG = "model.", "optimizer.", "ema.", "rng.attack"


def save_sharded(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    averaged: Mapping[str, torch.Tensor] | None,
    facts: Mapping[str, object],
) -> Path:
    """Every process: write the run state to folder `path` (see the module's docstring), with
    `facts` (progress, architecture record, loss scaler) in its state file. A collective."""
    main = distributed.is_main_process()
    tmp = partial_path(path)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed writer's
        tmp.mkdir()
    distributed.barrier()
    tensors, groups = _state(model, optimizer, generator, averaged)
    writer = HuggingFaceStorageWriter(str(tmp), save_distributed=True)
    with distributed.naming_lost_peers(), _one_process_is_meant():
        dcp.save(tensors, storage_writer=writer)
    if main:
        state = {
            "format": FORMAT,
            **facts,
            "param_groups": groups,
            "rng_device": generator.device.type,
            "world_size": distributed.get_world_size(),
        }
        atomic_write_text(tmp / SHARDED_STATE_FILE, json.dumps(state, indent=1) + "\n")
        tmp.rename(path)
    distributed.barrier()
    return path


def _state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    averaged: Mapping[str, torch.Tensor] | None,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The tensors DCP writes (each process's shards, keyed as the module's docstring says)
    and the optimizer's groups (hyperparameters, parameters by name)."""
    tensors = {MODEL + k: v for k, v in model.state_dict().items()}
    optim = get_optimizer_state_dict(model, optimizer)  # keyed by parameter names
    for name, per_param in optim["state"].items():
        for key, value in per_param.items():
            tensors[f"{OPTIMIZER}{name}.{key}"] = value
    tensors.update({EMA + k: v for k, v in (averaged or {}).items()})
    tensors[RNG] = generator.get_state()
    return tensors, optim["param_groups"]


def prune_and_link(logdir: str | Path, path: Path, keep: int) -> None:
    """Rank 0, after a save: ``LAST_SHARDED_LINK`` to `path`, all but the `keep` newest gone."""
    link = Path(logdir) / LAST_SHARDED_LINK
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(path.name)
    tmp.replace(link)
    for old in list_sharded_checkpoints(logdir)[:-keep]:
        shutil.rmtree(old)


def remove_partial(logdir: str | Path) -> None:
    """Rank 0: temporaries of a writer killed mid-save (never read)."""
    for tmp in Path(logdir).glob(PARTIAL_SHARDED):
        shutil.rmtree(tmp, ignore_errors=True)


def latest_sharded(logdir: str | Path) -> Path | None:
    found = list_sharded_checkpoints(logdir)
    return found[-1] if found else None


def read_state(path: Path) -> dict:
    """The checked state file of sharded checkpoint `path`; CheckpointError (one line) for a
    folder holding anything but its state file and shard files (a pickled ``.metadata`` among
    them: never read), or a state file that is not this format's."""
    for entry in sorted(path.iterdir()):
        if entry.name != SHARDED_STATE_FILE and not SHARD_FILE.match(entry.name):
            raise CheckpointError(
                f"{path}: unexpected {entry.name!r} in a sharded checkpoint (only "
                f"{SHARDED_STATE_FILE} and shard-*.safetensors are read; nothing is unpickled)"
            )
    try:
        state = json.loads(read_regular(path / SHARDED_STATE_FILE, STATE_BYTES))
    except (OSError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{path}: unreadable {SHARDED_STATE_FILE} ({error})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: {SHARDED_STATE_FILE} is not a {FORMAT} state")
    for field in ("epoch", "step"):
        value = state.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
            raise CheckpointError(f"{path}: field {field!r} must be a non-negative integer")
    groups = state.get("param_groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        raise CheckpointError(f"{path}: field 'param_groups' must be a list of optimizer groups")
    checked_stage(str(path), state.get(STAGE_FIELD))
    return state


def load_sharded(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    averaged: Mapping[str, torch.Tensor] | None,
) -> dict:
    """Every process: fill `model`, `optimizer`, `generator` and the moving average `averaged`
    (in place) from sharded checkpoint `path`, whatever number of processes saved it; returns
    its state file. CheckpointError (one line) when it does not fit. A collective."""
    state = read_state(path)
    tensors, _ = _state(model, optimizer, generator, averaged)  # the shapes to read into
    _read(path, tensors)
    model.load_state_dict({k[len(MODEL) :]: v for k, v in tensors.items() if k.startswith(MODEL)})
    set_optimizer_state_dict(
        model,
        optimizer,
        {"state": _optimizer_state(tensors), "param_groups": state["param_groups"]},
    )
    if state.get("rng_device") == generator.device.type:
        generator.set_state(tensors[RNG])
    return state


def _optimizer_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``optimizer.<param>.<key>`` entries back into {param: {key: tensor}}."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(OPTIMIZER):
            param, key = name[len(OPTIMIZER) :].rsplit(".", 1)
            state.setdefault(param, {})[key] = value
    return state


def plan_sharded_start(logdir: str | Path, load: str | None, starting_epoch: int) -> Start:
    """--fsdp's start: the run directory's newest sharded checkpoint, else ``plan_start``'s
    fresh start or --load'ed weights. CheckpointError for a run directory of single-file
    checkpoints (a DDP run's) or a --load'ed training checkpoint (its optimizer state is not
    sharded)."""
    path = latest_sharded(logdir)
    if path is not None:
        state = read_state(path)
        progress = Progress(state["epoch"], state["step"])
        return Start("resume", None, None, progress, stage=state.get(STAGE_FIELD), sharded=path)
    if list_checkpoints(logdir):
        raise CheckpointError(
            f"--fsdp: {logdir} holds single-file checkpoints (a DDP run's); resume it without "
            "--fsdp, or give another --logdir"
        )
    start = plan_start(logdir, load, starting_epoch)
    if start.kind == "continue":
        raise CheckpointError(
            f"--fsdp: --load {load} is a training checkpoint whose optimizer state is not "
            "sharded; continue it without --fsdp"
        )
    return start


def read_model(path: Path) -> tuple[nn.Module, dict, int]:
    """This process alone: the model sharded checkpoint `path` holds, whole (built from its
    architecture record, its shards read wherever they were saved), with its record and epoch.
    CheckpointError (one line) when it cannot be read."""
    state = read_state(path)
    try:
        model = nets.ArchitectureRecord.from_dict(state.get("architecture")).build()
    except ValueError as error:
        raise CheckpointError(f"{path}: field 'architecture' ({error})") from None
    tensors = {MODEL + k: v for k, v in model.state_dict().items()}
    _read(path, tensors)
    model.load_state_dict({k[len(MODEL) :]: v for k, v in tensors.items()})
    return model, state["architecture"], state["epoch"]


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """DCP runs as one process when there is no process group (the export, --eval, a one-process
    run) and warns that it assumes so; that is meant, so the warning is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _read(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """DCP's load of `tensors` (in place) from `path`'s safetensors files; CheckpointError."""
    try:
        with distributed.naming_lost_peers(), _one_process_is_meant():
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path)))
    except Exception as error:  # DCP wraps every rank's failure in its own exception type
        reason = str(error).strip().splitlines()[-1][:300]
        raise CheckpointError(f"{path}: does not fit this model ({reason})") from None
