"""Run state: checkpoint files, and where a run starts (fresh, resumed, or from weights).

Checkpoints (``iat.runs.files`` names them) are plain tensors and numbers written
by ``nets.save_weights`` (the one writer of the ``.pt`` layout, atomic) and read back with
``weights_only=True`` (nothing is unpickled). The model weights inside can also be read by
``nets.load_weights`` (key ``"model"``). Every checkpoint file is read once: ``plan_start``
returns its weights, which the model builder loads, and its optimizer state, progress and random
state, each checked (a wrong type is one CheckpointError naming the file and the field). Beside
them a checkpoint records the architecture it was trained as (``nets.ARCHITECTURE_KEY``), and the
state of the training attack's random generator (``"rng"``), so that a resumed run draws what the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

import nets
from iat.runs.files import (
    BEST_LINK,
    BEST_RECORD,
    LAST_LINK,
    LOCK_FILE,
    PARTIAL_CHECKPOINTS,
    SET_ASIDE_SUFFIX,
    checkpoint_path,
    list_checkpoints,
)
from iat.runtime.atomic_io import atomic_write_text, open_no_follow, read_regular
from nets import CheckpointError
from nets.checkpoint import require_finite

TRAINING_FIELDS = ("optimizer", "epoch", "step")
RNG_FIELD = "rng"  # {"device": "cpu" or "cuda", "attack": the attack generator's uint8 state}
# Free training's perturbation (Shafahi et al. Alg. 1: carried over from minibatch to minibatch,
# epochs included); only with --free-replays > 1.
FREE_DELTA_FIELD = "free_delta"
# --amp fp16's loss scaler (torch.amp.GradScaler.state_dict: its scale and growth tracker)
GRAD_SCALER_FIELD = "grad_scaler"
EMA_FIELD = "ema"  # the averaged weights (iat.recipes.ema), keyed as "model"; only with an average
# The stage and training attack of the checkpoint's epoch (iat.train.stages.stage_record: names
# mapped to numbers, strings and flags); only under --size-schedule / --attack-iter-schedule.
STAGE_FIELD = "stage"
# Epochs and steps are held in int64 tensors (trainer.check_same_start): a larger count is a
# forged field, refused naming it rather than overflowing later.
MAX_COUNT = 2**63 - 1
RECORD_BYTES = 1 << 16  # BEST_RECORD is one short line


def check_run_directory(logdir: str | Path) -> None:
    """Fail early, before anything is built, when `logdir` cannot hold a run."""
    path = Path(logdir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--logdir: {path} exists and is not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--logdir: cannot create {path}: {existing} is not a writable folder")
    try:  # root passes os.access everywhere (/proc, a read-only mount): try for real
        tempfile.TemporaryDirectory(prefix=".probe-", dir=existing).cleanup()
    except OSError as error:
        reason = f"{error.strerror} in {existing}"
        raise ValueError(f"--logdir: cannot create {path}: {reason}") from None


class RunDirectoryBusy(ValueError):
    """Another training process holds the run directory."""


class RunDirectoryLock:
    """An exclusive advisory lock (``flock``) on ``LOCK_FILE`` in a run directory, held by the
    training process that writes it. The kernel releases it when the process ends, however it
    ends (a SIGKILL leaves no stale lock); the file keeps the holder's pid and host for the
    message a second trainer gets. Only the main process locks (its ranks share the folder)."""

    def __init__(self, logdir: str | Path, enabled: bool = True) -> None:
        self.logdir = Path(logdir)
        self.enabled = enabled
        self._file: BinaryIO | None = None

    def acquire(self, create: bool) -> None:
        """Lock the run directory (creating it if `create`); a no-op when it does not exist yet
        and `create` is false, or when already held. RunDirectoryBusy names the holder."""
        if not self.enabled or self._file is not None:
            return
        if create:
            try:
                self.logdir.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ValueError(f"--logdir: cannot create {self.logdir} ({error})") from None
        elif not self.logdir.is_dir():
            return
        # Never through a symbolic link: truncating it would overwrite a file outside the run.
        lock = open_no_follow(self.logdir / LOCK_FILE, "r+b", buffering=0)
        fd = lock.fileno()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            lock.close()
            raise RunDirectoryBusy(
                f"--logdir: {self.logdir} is in use by another training process ({holder}); "
                "wait for it to end, or give another --logdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._file = lock

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the lock
            self._file = None

    def __enter__(self) -> RunDirectoryLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def link_last(path: Path) -> Path:
    """Point ``LAST_LINK`` beside `path` at it (replaced atomically: never missing or half)."""
    return _replace_link(path.parent / LAST_LINK, lambda tmp: os.symlink(path.name, tmp))


def link_best(path: Path, evaluation: str, accuracy: float) -> bool:
    """Make ``BEST_LINK`` `path` when `accuracy` (robust accuracy under the in-training
    `evaluation`) beats the best recorded so far, and record it; True when it did. A hard link,
    so that pruning the epoch's own name keeps the file."""
    record_path = path.parent / BEST_RECORD
    try:
        best = json.loads(read_regular(record_path, RECORD_BYTES))
        if best["evaluation"] == evaluation and best["robust_accuracy"] >= accuracy:
            return False
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        pass  # no record yet, or one this code did not write: start one
    _replace_link(path.parent / BEST_LINK, lambda tmp: os.link(path, tmp))
    record = {"checkpoint": path.name, "evaluation": evaluation, "robust_accuracy": accuracy}
    atomic_write_text(record_path, json.dumps(record) + "\n")
    return True


def _replace_link(target: Path, make: Callable[[Path], None]) -> Path:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    make(tmp)
    os.replace(tmp, target)
    return target


def remove_partial_checkpoints(logdir: str | Path) -> list[Path]:
    """Delete temporaries left by a process killed while writing (never read as checkpoints)."""
    removed = sorted(Path(logdir).glob(PARTIAL_CHECKPOINTS))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def latest_checkpoint(logdir: str | Path) -> Path | None:
    found = list_checkpoints(logdir)
    return found[-1] if found else None


@dataclass(frozen=True)
class Progress:
    """How far a run has come: completed epochs and the global step count."""

    epoch: int
    step: int


def save_checkpoint(
    logdir: str | Path,
    progress: Progress,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    keep: int,
    *,
    architecture: Mapping[str, object],
    attack_generator: torch.Generator,
    averaged: Mapping[str, torch.Tensor] | None = None,
    free_delta: torch.Tensor | None = None,
    grad_scaler: Mapping[str, float | int] | None = None,
    stage: Mapping[str, object] | None = None,
) -> Path:
    """Write the state after `progress.epoch` completed epochs, then prune all but `keep`.

    `architecture` is the record ``nets.save_weights`` writes beside the weights
    (``builders.architecture_record``); the attack
    generator's state is what the next epoch's attacks start from; `averaged` is the moving
    average of the weights, when the run keeps one; `free_delta` free training's perturbations,
    one per process [world, N, C, H, W], which the next epoch carries on from; `grad_scaler`
    fp16's loss scaler state (--amp), which the next epoch's steps scale by; `stage` the stage
    and training attack of the epoch (under a schedule)."""
    path = checkpoint_path(logdir, progress.epoch)
    state = {
        "optimizer": optimizer.state_dict(),
        "epoch": progress.epoch,
        "step": progress.step,
        RNG_FIELD: {"device": attack_generator.device.type, "attack": attack_generator.get_state()},
    }
    if averaged is not None:
        state[EMA_FIELD] = dict(averaged)
    if free_delta is not None:
        state[FREE_DELTA_FIELD] = free_delta.detach().cpu()
    if grad_scaler is not None:
        state[GRAD_SCALER_FIELD] = dict(grad_scaler)
    if stage is not None:
        state[STAGE_FIELD] = dict(stage)
    nets.save_weights(model, path, architecture, training_state=state)
    for old in list_checkpoints(logdir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


@dataclass(frozen=True)
class Start:
    """Where a training run starts; decided once, before anything is built."""

    kind: str  # "fresh", "resume" (this run directory), "continue" (a --load'ed training
    # checkpoint: its weights, optimizer and schedule) or "weights" (--load'ed weights only)
    weights: nets.Weights | None  # to load into the model (read once)
    optimizer: dict | None  # optimizer state to restore
    progress: Progress  # completed epochs and steps before this run's first step
    rng: dict | None = None  # the attack generator's state to restore (RNG_FIELD)
    ema: dict | None = None  # the averaged weights to restore (EMA_FIELD)
    free_delta: torch.Tensor | None = None  # free training's perturbations (FREE_DELTA_FIELD)
    grad_scaler: dict | None = None  # fp16's loss scaler state (GRAD_SCALER_FIELD)
    stage: dict | None = None  # the stage of the checkpoint's epoch (STAGE_FIELD)
    # --fsdp: the sharded checkpoint (iat.runs.sharded) that fills the model, optimizer, average
    # and generator once the model is sharded (weights, optimizer, rng and ema are then None)
    sharded: Path | None = None

    def describe(self) -> str:
        done = f"after epoch {self.progress.epoch}"
        source = self.sharded or (self.weights and self.weights.source)
        return {
            "fresh": "starting from scratch",
            "resume": f"resuming from {source} {done}",
            "continue": f"continuing {self.weights and self.weights.source} {done}",
            "weights": f"starting from the weights of {self.weights and self.weights.source}",
        }[self.kind]


@dataclass(frozen=True)
class _TrainingState:
    optimizer: dict
    progress: Progress
    rng: dict | None
    ema: dict | None
    free_delta: torch.Tensor | None
    grad_scaler: dict | None
    stage: dict | None


def _training_state(weights: nets.Weights) -> _TrainingState | None:
    """The checked training fields of a checkpoint; None for plain weights."""
    contents = weights.contents
    if contents is None or not set(TRAINING_FIELDS) <= contents.keys():
        return None
    source = weights.source
    progress = Progress(
        _count(source, "epoch", contents["epoch"]), _count(source, "step", contents["step"])
    )
    optimizer = _optimizer_state(source, contents["optimizer"])
    rng = _rng_state(source, contents.get(RNG_FIELD))
    ema = _ema_state(source, contents.get(EMA_FIELD))
    return _TrainingState(
        optimizer,
        progress,
        rng,
        ema,
        _free_delta(source, contents.get(FREE_DELTA_FIELD)),
        _grad_scaler(source, contents.get(GRAD_SCALER_FIELD)),
        checked_stage(source, contents.get(STAGE_FIELD)),
    )


def _field_error(source: str, field: str, expected: str, value: object) -> CheckpointError:
    return CheckpointError(f"{source}: field {field!r} must be {expected}, not {_kind(value)}")


def _kind(value: object) -> str:
    if isinstance(value, int) and abs(value) > MAX_COUNT:
        return f"an integer of {len(str(abs(value)))} digits"
    return repr(value) if isinstance(value, int) else type(value).__name__


def _count(source: str, field: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT:
        raise _field_error(source, field, "a non-negative integer below 2**63", value)
    return value


def _optimizer_state(source: str, value: object) -> dict:
    """``torch.optim.Optimizer.state_dict()``'s structure: {"state": {...}, "param_groups":
    [{"params": [int, ...], ...}, ...]} (whether it fits the model is checked when loaded)."""
    groups = value.get("param_groups") if isinstance(value, Mapping) else None
    valid = (
        isinstance(value, Mapping)
        and isinstance(value.get("state"), Mapping)
        and isinstance(groups, list)
        and all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups)
    )
    if not valid:
        raise _field_error(source, "optimizer", "an optimizer state_dict", value)
    require_finite(source, value["state"], "optimizer.state")
    return dict(value)


def _rng_state(source: str, value: object) -> dict | None:
    """RNG_FIELD, checked; None when absent (checkpoints written before it existed)."""
    if value is None:
        return None
    state = value.get("attack") if isinstance(value, Mapping) else None
    valid = (
        isinstance(value, Mapping)
        and isinstance(value.get("device"), str)
        and isinstance(state, torch.Tensor)
        and state.dtype == torch.uint8
        and state.dim() == 1
    )
    if not valid:
        raise _field_error(source, RNG_FIELD, '{"device": str, "attack": uint8 tensor}', value)
    return dict(value)


def _ema_state(source: str, value: object) -> dict | None:
    """EMA_FIELD, checked: {state_dict key: tensor}; None when absent."""
    if value is None:
        return None
    valid = isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )
    if not valid:
        raise _field_error(source, EMA_FIELD, "a mapping of names to tensors", value)
    require_finite(source, value, EMA_FIELD)
    return dict(value)


def _free_delta(source: str, value: object) -> torch.Tensor | None:
    """FREE_DELTA_FIELD, checked: a finite float [world, N, C, H, W] tensor; None when absent."""
    if value is None:
        return None
    valid = (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.dim() == 5
        and bool(torch.isfinite(value).all())
    )
    if not valid:
        raise _field_error(
            source, FREE_DELTA_FIELD, "a finite float [world, N, C, H, W] tensor", value
        )
    return value


def _grad_scaler(source: str, value: object) -> dict | None:
    """GRAD_SCALER_FIELD, checked: names mapped to finite numbers, a positive scale; None when
    absent."""
    if value is None:
        return None
    valid = (
        isinstance(value, Mapping)
        and all(
            isinstance(k, str)
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            for k, v in value.items()
        )
        and value.get("scale", 1.0) > 0
    )
    if not valid:
        raise _field_error(
            source, GRAD_SCALER_FIELD, "a mapping of names to finite numbers, scale > 0", value
        )
    return dict(value)


def checked_stage(source: str, value: object) -> dict | None:
    """STAGE_FIELD, checked: names mapped to finite numbers, strings or flags; None when
    absent."""
    if value is None:
        return None
    valid = isinstance(value, Mapping) and all(
        isinstance(k, str)
        and isinstance(v, (bool, int, float, str))
        and (not isinstance(v, float) or math.isfinite(v))
        for k, v in value.items()
    )
    if not valid:
        raise _field_error(
            source, STAGE_FIELD, "a mapping of names to finite numbers, strings or flags", value
        )
    return dict(value)


def averaged_weights(weights: nets.Weights) -> nets.Weights:
    """The moving-average weights a training checkpoint holds beside its raw ones (--eval-ema),
    as loadable weights; CheckpointError when it holds none."""
    contents = weights.contents or {}
    state = _ema_state(weights.source, contents.get(EMA_FIELD))
    if state is None:
        raise CheckpointError(
            f"{weights.source}: no averaged weights (field {EMA_FIELD!r}); it was trained "
            "without --moving-average-decay, leave out --eval-ema"
        )
    return nets.Weights(weights.source, "pt", state, contents)


def plan_start(
    logdir: str | Path, load: str | None, starting_epoch: int, main_process: bool = True
) -> Start:
    """Resume the run directory's latest checkpoint that verifies (a relaunch), else start from
    --load.

    A --load'ed training checkpoint continues its schedule; plain weights start the schedule at
    `starting_epoch`. Newer checkpoints that fail their checks (truncated, zeroed, non-finite)
    are renamed aside by the main process (never deleted), each said in one line."""
    fresh = Progress(starting_epoch - 1, 0)
    found = _newest_verified(logdir, main_process)
    if found is not None:
        weights, state = found
        return _start_from("resume", weights, state)
    if load is None:
        return Start("fresh", None, None, fresh)
    weights = nets.read_weights(load)
    state = _training_state(weights)
    if state is None:
        return Start("weights", weights, None, fresh)
    return _start_from("continue", weights, state)


def _start_from(kind: str, weights: nets.Weights, state: _TrainingState) -> Start:
    """A start from a training checkpoint: its weights and its checked training state."""
    return Start(
        kind,
        weights,
        state.optimizer,
        state.progress,
        state.rng,
        state.ema,
        state.free_delta,
        state.grad_scaler,
        state.stage,
    )


def _newest_verified(
    logdir: str | Path, main_process: bool
) -> tuple[nets.Weights, _TrainingState] | None:
    """The newest checkpoint of `logdir` whose every field checks, with its training state.

    When none does, the newest one's error is raised (nothing renamed: a person decides); else
    the newer ones that failed are set aside (``SET_ASIDE_SUFFIX``) by the main process."""
    failed: list[tuple[Path, CheckpointError]] = []
    for path in reversed(list_checkpoints(logdir)):
        try:
            weights = nets.read_weights(path)
            state = _training_state(weights)
            if state is None:
                raise CheckpointError(f"{path}: a run checkpoint without {TRAINING_FIELDS}")
            require_finite(str(path), weights.tensors, "model")
        except CheckpointError as error:
            failed.append((path, error))
            continue
        for bad, error in failed:
            _set_aside(bad, error, path, main_process)
        return weights, state
    if failed:
        raise failed[0][1]
    return None


def _set_aside(bad: Path, error: CheckpointError, fallback: Path, main_process: bool) -> None:
    """Rename `bad` out of the checkpoints' names (kept for a person to inspect)."""
    if not main_process:
        return
    aside = bad.with_name(bad.name + SET_ASIDE_SUFFIX)
    number = 1
    while aside.exists():
        number += 1
        aside = bad.with_name(f"{bad.name}{SET_ASIDE_SUFFIX}.{number}")
    bad.rename(aside)
    print(
        f"warning: {error}; renamed it to {aside.name} and resuming from {fallback.name}",
        file=sys.stderr,
    )
