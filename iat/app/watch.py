"""Continuous evaluation (``--eval --watch LOGDIR``): each new checkpoint of a running (or
finished) training run is evaluated once, as ALP's ``eval_once=False``.

Rank 0 polls the run directory and tells every rank which checkpoint comes next, so that the
processes of a distributed evaluation agree. Each result is written atomically to
``LOGDIR/eval/checkpoint-epochNNNN.<attack>-<key>.json`` (never a half-written file), keyed by
the checkpoint and the evaluation's threat model (``evaluation_key``): a checkpoint with a result
of the same threat model is skipped, so a restarted watcher continues where it stopped, and a
watcher with another attack evaluates every checkpoint again beside the first's results. The
watcher stops once the run's last epoch (from its ``config.json``) is evaluated, or after
``--watch-timeout`` seconds without a new checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from iat.config import Config, eval_attack
from iat.eval.evaluate import eval_samples, evaluate_checkpoint, sweep
from iat.eval.summary import threat_model
from iat.runs.logger import CONFIG_FILE, ResultFileBackend, RunLogger
from iat.runs.state import list_checkpoints
from iat.runtime import distributed

RESULTS_FOLDER = "eval"
NOTHING = -1  # broadcast when no checkpoint is waiting


def evaluation_key(cfg: Config) -> str:
    """What the watcher's results are keyed by besides the checkpoint: the attack's name and a
    hash of everything that changes the numbers (each sweep point's threat model, the split,
    the images), e.g. ``pgd-0c1d2e3f4a``."""
    what = [threat_model(point) for point in sweep(cfg)]
    what += [cfg.split, str(cfg.num_examples), str(cfg.benchmark), str(cfg.image_size)]
    digest = hashlib.sha256("\n".join(what).encode()).hexdigest()[:10]
    return f"{eval_attack(cfg)}-{digest}"


def result_path(logdir: Path, checkpoint: Path, key: str) -> Path:
    return logdir / RESULTS_FOLDER / f"{checkpoint.stem}.{key}.json"


def run_epochs(logdir: Path) -> int | None:
    """The number of epochs the watched run trains, from its config.json (None if unknown)."""
    try:
        return int(json.loads((logdir / CONFIG_FILE).read_text())["config"]["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def next_checkpoint(logdir: Path, key: str) -> Path | None:
    """The oldest checkpoint without a result under ``key`` (complete files only: they are
    renamed in)."""
    pending = [p for p in list_checkpoints(logdir) if not result_path(logdir, p, key).exists()]
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
    key = evaluation_key(cfg)
    main_proc = distributed.is_main_process()
    evaluated, idle_since = 0, time.monotonic()
    while True:
        epoch = _agree(_epoch(next_checkpoint(logdir, key)) if main_proc else NOTHING, device)
        if epoch == NOTHING:
            last = run_epochs(logdir)
            done = last is not None and result_path(logdir, _path(logdir, last), key).exists()
            idle = time.monotonic() - idle_since > cfg.watch_timeout
            if _agree(int(done or idle) if main_proc else 0, device):
                break
            time.sleep(cfg.watch_interval)
            continue
        checkpoint = _path(logdir, epoch)
        backends = [ResultFileBackend(result_path(logdir, checkpoint, key))] if main_proc else []
        with RunLogger(backends) as logger:
            evaluate_checkpoint(
                dataclasses.replace(cfg, load=str(checkpoint)),
                samples,
                device,
                logger,
                label=f"{checkpoint.name}: ",
            )
        evaluated, idle_since = evaluated + 1, time.monotonic()
    if main_proc:
        print(
            f"--watch: evaluated {evaluated} checkpoint(s) of {logdir} "
            f"(results: {logdir / RESULTS_FOLDER}/*.{key}.json)",
            file=sys.stderr,
        )
    return evaluated


def _path(logdir: Path, epoch: int) -> Path:
    return logdir / f"checkpoint-epoch{epoch:04d}.pt"
