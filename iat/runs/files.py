"""The run directory's files: every name in it is spelled here, and only here.

A run directory (``--logdir``) holds the resolved configuration, the logged records, TensorBoard's
event files, the checkpoints and their links, the training process's lock, and the results of
``--eval --watch``. The trainer, the trackers, the watcher and the report ask this module for
each name; none of them spells one.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILE = "config.json"  # the resolved configuration and the run's facts
METRICS_FILE = "metrics.jsonl"  # one JSON line per logged step and per evaluation
EVENT_FILES = "events.out.tfevents.*"  # TensorBoard's event file names (a glob)
LOCK_FILE = ".lock"  # holds the training process's pid while it runs
LAST_LINK = "checkpoint-last.pt"  # a symbolic link to the newest checkpoint (timm's last.pth.tar)
BEST_LINK = "checkpoint-best.pt"  # the checkpoint of the best robust accuracy (a hard link)
BEST_RECORD = "checkpoint-best.json"  # which epoch that is, under which evaluation, how good
SET_ASIDE_SUFFIX = ".unreadable"  # a checkpoint that fails its checks, renamed, never deleted
# --fsdp's sharded checkpoints: folders (iat.runs.sharded), each with its run state in STATE_FILE
# and every process's shards in safetensors files named by torch.distributed.checkpoint.
LAST_SHARDED_LINK = "checkpoint-last.dcp"  # a symbolic link to the newest sharded checkpoint
SHARDED_STATE_FILE = "state.json"
RESULTS_FOLDER = "eval"  # --eval --watch: one result file per checkpoint and evaluation key
_CHECKPOINT_PREFIX, _CHECKPOINT_SUFFIX = "checkpoint-epoch", ".pt"
_CHECKPOINT = re.compile(rf"^{_CHECKPOINT_PREFIX}(\d+){re.escape(_CHECKPOINT_SUFFIX)}$")
MAX_EPOCH_DIGITS = 9  # a longer epoch is no checkpoint of a run (and would overflow an int64)
# A checkpoint being written (iat.runtime.atomic_io's temporary name); a killed writer leaves it.
PARTIAL_CHECKPOINTS = f".{_CHECKPOINT_PREFIX}*{_CHECKPOINT_SUFFIX}.*.tmp"
_SHARDED_SUFFIX = ".dcp"
# A sharded checkpoint being written (``partial_path``); a writer killed mid-save leaves it.
PARTIAL_SHARDED = f".{_CHECKPOINT_PREFIX}*{_SHARDED_SUFFIX}.tmp"
_SHARDED = re.compile(
    rf"^{_CHECKPOINT_PREFIX}(\d{{1,{MAX_EPOCH_DIGITS}}}){re.escape(_SHARDED_SUFFIX)}$"
)


def checkpoint_path(logdir: str | Path, epoch: int) -> Path:
    """The checkpoint saved after `epoch` completed epochs: ``checkpoint-epoch{E:04d}.pt``."""
    return Path(logdir) / f"{_CHECKPOINT_PREFIX}{epoch:04d}{_CHECKPOINT_SUFFIX}"


def checkpoint_epoch(path: str | Path) -> int | None:
    """The epoch of checkpoint `path` (by its name); None for any other file, and for a name
    whose epoch has more than ``MAX_EPOCH_DIGITS`` digits (``odd_checkpoints`` names those)."""
    found = _CHECKPOINT.match(Path(path).name)
    if found is None or len(found.group(1).lstrip("0")) > MAX_EPOCH_DIGITS:
        return None
    return int(found.group(1))


def odd_checkpoints(logdir: str | Path) -> list[Path]:
    """Files of `logdir` named like a checkpoint that ``checkpoint_epoch`` does not take (an
    epoch of more than ``MAX_EPOCH_DIGITS`` digits), sorted: to be named, never read."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        return []
    named = logdir.glob(f"{_CHECKPOINT_PREFIX}*{_CHECKPOINT_SUFFIX}")
    return sorted(p for p in named if _CHECKPOINT.match(p.name) and checkpoint_epoch(p) is None)


def list_checkpoints(logdir: str | Path) -> list[Path]:
    """Complete checkpoints in `logdir`, oldest first (temporary files are never matched)."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        return []
    found = [(epoch, p) for p in logdir.iterdir() if (epoch := checkpoint_epoch(p)) is not None]
    return [p for _, p in sorted(found)]


def watch_result_path(logdir: str | Path, checkpoint: Path, key: str) -> Path:
    """Where ``--eval --watch`` writes `checkpoint`'s result under evaluation `key`:
    ``RUN/eval/checkpoint-epochNNNN.<key>.json``."""
    return Path(logdir) / RESULTS_FOLDER / f"{checkpoint.stem}.{key}.json"


def sharded_checkpoint_path(logdir: str | Path, epoch: int) -> Path:
    """The sharded checkpoint (a folder) saved after `epoch` epochs:
    ``checkpoint-epoch{E:04d}.dcp``."""
    return Path(logdir) / f"{_CHECKPOINT_PREFIX}{epoch:04d}{_SHARDED_SUFFIX}"


def partial_path(path: Path) -> Path:
    """Where sharded checkpoint `path` is written before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp")


def list_sharded_checkpoints(logdir: str | Path) -> list[Path]:
    """Complete sharded checkpoints (folders) in `logdir`, oldest first."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in logdir.iterdir() if (m := _SHARDED.match(p.name))]
    return [p for _, p in sorted(found) if p.is_dir() and not p.is_symlink()]
