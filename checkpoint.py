"""Training checkpoints: model + optimizer + progress, written atomically, the last N kept.

Files are `checkpoint-epoch{E:04d}.pt` in the run directory, plain tensors and numbers saved with
torch.save and read back with `weights_only=True` (nothing is unpickled). The model weights inside
can also be read by `nets.load_weights` (key "model").
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from atomic_io import atomic_write
from nets import CheckpointError

_NAME = re.compile(r"^checkpoint-epoch(\d+)\.pt$")


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


def save_checkpoint(
    logdir: str | Path,
    *,
    epoch: int,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    keep: int,
) -> Path:
    """Write the state after `epoch` completed epochs (global `step`), then prune old ones."""
    path = checkpoint_path(logdir, epoch)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
    }
    atomic_write(path, lambda f: torch.save(state, f))
    for old in list_checkpoints(logdir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def read_training_state(path: str | Path) -> dict | None:
    """The optimizer state and progress of a training checkpoint; None for weights-only files."""
    path = Path(path)
    if path.suffix != ".pt":
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from e
    if not isinstance(state, dict) or not {"optimizer", "epoch", "step"} <= state.keys():
        return None
    return {
        "optimizer": state["optimizer"],
        "epoch": int(state["epoch"]),
        "step": int(state["step"]),
    }
