"""Run state: checkpoint files, and where a run starts (fresh, resumed, or from weights).

Files are ``checkpoint-epoch{E:04d}.pt`` in the run directory: plain tensors and numbers saved
with torch.save through the project's one atomic writer and read back with
``weights_only=True`` (nothing is unpickled). The model weights inside can also be read by
``nets.load_weights`` (key ``"model"``). Every checkpoint file is read once: ``plan_start``
returns its weights, which the model builder loads, and its optimizer state and progress.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

import nets
from iat.atomic_io import atomic_write
from nets import CheckpointError

_NAME = re.compile(r"^checkpoint-epoch(\d+)\.pt$")
TRAINING_FIELDS = ("optimizer", "epoch", "step")


def check_run_directory(logdir: str | Path) -> None:
    """Fail early, before anything is built, when `logdir` cannot hold a run."""
    path = Path(logdir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--logdir: {path} exists and is not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--logdir: cannot create {path}: {existing} is not a writable folder")


def checkpoint_path(logdir: str | Path, epoch: int) -> Path:
    return Path(logdir) / f"checkpoint-epoch{epoch:04d}.pt"


def list_checkpoints(logdir: str | Path) -> list[Path]:
    """Complete checkpoints in `logdir`, oldest first (temporary files are never matched)."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in logdir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_partial_checkpoints(logdir: str | Path) -> list[Path]:
    """Delete temporaries left by a process killed while writing (never read as checkpoints)."""
    removed = sorted(Path(logdir).glob(".checkpoint-epoch*.pt.*.tmp"))
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
) -> Path:
    """Write the state after `progress.epoch` completed epochs, then prune all but `keep`."""
    path = checkpoint_path(logdir, progress.epoch)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": progress.epoch,
        "step": progress.step,
    }
    atomic_write(path, lambda f: torch.save(state, f))
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

    def describe(self) -> str:
        done = f"after epoch {self.progress.epoch}"
        return {
            "fresh": "starting from scratch",
            "resume": f"resuming from {self.weights and self.weights.source} {done}",
            "continue": f"continuing {self.weights and self.weights.source} {done}",
            "weights": f"starting from the weights of {self.weights and self.weights.source}",
        }[self.kind]


def _training_state(weights: nets.Weights) -> tuple[dict, Progress] | None:
    contents = weights.contents
    if contents is None or not set(TRAINING_FIELDS) <= contents.keys():
        return None
    return contents["optimizer"], Progress(int(contents["epoch"]), int(contents["step"]))


def plan_start(logdir: str | Path, load: str | None, starting_epoch: int) -> Start:
    """Resume the run directory's latest checkpoint (a relaunch), else start from --load.

    A --load'ed training checkpoint continues its schedule; plain weights start the schedule at
    `starting_epoch`."""
    latest = latest_checkpoint(logdir)
    source = str(latest) if latest is not None else load
    fresh = Progress(starting_epoch - 1, 0)
    if source is None:
        return Start("fresh", None, None, fresh)
    weights = nets.read_weights(source)
    state = _training_state(weights)
    if state is None:
        if latest is not None:
            raise CheckpointError(f"{source}: a run checkpoint without {TRAINING_FIELDS}")
        return Start("weights", weights, None, fresh)
    optimizer, progress = state
    return Start("resume" if latest is not None else "continue", weights, optimizer, progress)
