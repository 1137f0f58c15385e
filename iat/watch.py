"""Continuous evaluation (``--eval --watch LOGDIR``): each new checkpoint of a running (or
finished) training run is evaluated once, as ALP's ``eval_once=False``.

Rank 0 polls the run directory and tells every rank which checkpoint comes next, so that the
processes of a distributed evaluation agree. Each result is written atomically to
``LOGDIR/eval/checkpoint-epochNNNN.json`` (never a half-written file); a checkpoint with a
result is skipped, so a restarted watcher continues where it stopped. The watcher stops once
the run's last epoch (from its ``config.json``) is evaluated, or after ``--watch-timeout``
seconds without a new checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from iat import distributed
from iat.config import Config
from iat.evaluate import eval_samples, evaluate_checkpoint
from iat.run_logging import CONFIG_FILE, ResultFileBackend, RunLogger
from iat.run_state import list_checkpoints

RESULTS_FOLDER = "eval"
NOTHING = -1  # broadcast when no checkpoint is waiting


def result_path(logdir: Path, checkpoint: Path) -> Path:
    return logdir / RESULTS_FOLDER / f"{checkpoint.stem}.json"


def run_epochs(logdir: Path) -> int | None:
    """The number of epochs the watched run trains, from its config.json (None if unknown)."""
    try:
        return int(json.loads((logdir / CONFIG_FILE).read_text())["config"]["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def next_checkpoint(logdir: Path) -> Path | None:
    """The oldest checkpoint without a result (complete files only: they are renamed in)."""
    pending = [p for p in list_checkpoints(logdir) if not result_path(logdir, p).exists()]
    return pending[0] if pending else None


def _epoch(checkpoint: Path | None) -> int:
    return NOTHING if checkpoint is None else int(checkpoint.stem.rsplit("epoch", 1)[1])


def _agree(epoch: int, device: torch.device) -> int:
    """Rank 0's choice, on every rank."""
    choice = torch.tensor([epoch], dtype=torch.int64, device=device)
    return int(distributed.broadcast_tensor(choice, src=0).item())


def watch(cfg: Config, device: torch.device) -> int:
    """Evaluate the checkpoints of ``cfg.watch`` as they appear; returns how many."""
    logdir = Path(cfg.watch)
    if not logdir.is_dir():
        raise ValueError(f"--watch: {logdir} is not a run directory")
    samples = eval_samples(cfg)
    main_proc = distributed.is_main_process()
    evaluated, idle_since = 0, time.monotonic()
    while True:
        epoch = _agree(_epoch(next_checkpoint(logdir)) if main_proc else NOTHING, device)
        if epoch == NOTHING:
            last = run_epochs(logdir)
            done = last is not None and result_path(logdir, _path(logdir, last)).exists()
            idle = time.monotonic() - idle_since > cfg.watch_timeout
            if _agree(int(done or idle) if main_proc else 0, device):
                break
            time.sleep(cfg.watch_interval)
            continue
        checkpoint = _path(logdir, epoch)
        backends = [ResultFileBackend(result_path(logdir, checkpoint))] if main_proc else []
        with RunLogger(backends) as logger:
            evaluate_checkpoint(
                dataclasses.replace(cfg, load=str(checkpoint)), samples, device, logger
            )
        evaluated, idle_since = evaluated + 1, time.monotonic()
    if main_proc:
        print(f"--watch: evaluated {evaluated} checkpoint(s) of {logdir}", file=sys.stderr)
    return evaluated


def _path(logdir: Path, epoch: int) -> Path:
    return logdir / f"checkpoint-epoch{epoch:04d}.pt"
