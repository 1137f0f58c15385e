"""Continuous evaluation (``--eval --watch LOGDIR``): each new checkpoint of a running (or
finished) training run is evaluated once, as ALP's ``eval_once=False``.

Rank 0 polls the run directory and tells every rank which checkpoint comes next, so that the
processes of a distributed evaluation agree. Each result is written atomically to
``LOGDIR/eval/checkpoint-epochNNNN.<attack>-<key>.json`` (never a half-written file), keyed by
the checkpoint and the settings that change the numbers (``evaluation_key``): a checkpoint with
a result under the same key is skipped, so a restarted watcher continues where it stopped, and a
watcher with another attack evaluates every checkpoint again beside the first's results. Each
result also goes to the registered trackers (``--mlflow``: an MLflow run per checkpoint), as
``--eval``'s does. The watcher stops once the run's last epoch (from its ``config.json``) is
evaluated, or after ``--watch-timeout`` seconds without a new checkpoint.

A checkpoint is evaluated once it is complete: its size and time unchanged over a poll and its
contents verified (a file copied in with ``cp`` is seen half-written). One that vanishes before
or while it is evaluated (pruned by the live run's ``--keep-checkpoints``) is skipped, and so is
a file named like a checkpoint whose epoch is no run's; each said in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
import zipfile
from pathlib import Path

import torch

from iat.config import Config, config_record, eval_attack
from iat.eval.evaluate import eval_samples, evaluate_checkpoint, sweep
from iat.eval.state import result_settings
from iat.runs.files import (
    CONFIG_FILE,
    RESULTS_FOLDER,
    checkpoint_epoch,
    checkpoint_path,
    list_checkpoints,
    odd_checkpoints,
    watch_result_path,
)
from iat.runs.trackers import check_trackers, evaluation_logger
from iat.runtime import distributed
from iat.runtime.atomic_io import check_inner_folder, read_regular

NOTHING = -1  # broadcast when no checkpoint is waiting
CONFIG_BYTES = 16 << 20  # a run's config.json is a few KB


def evaluation_key(cfg: Config) -> str:
    """What the watcher's results are keyed by besides the checkpoint: the attack's name and a
    hash of the settings that change the numbers (``result_settings`` of each sweep point, the
    checkpoint aside: it names the file), e.g. ``pgd-0c1d2e3f4a``."""
    points = [{**result_settings(point), "load": None} for point in sweep(cfg)]
    text = json.dumps(points, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return f"{eval_attack(cfg)}-{digest}"


def run_epochs(logdir: Path) -> int | None:
    """The number of epochs the watched run trains, from its config.json (None if unknown)."""
    try:
        record = json.loads(read_regular(logdir / CONFIG_FILE, CONFIG_BYTES))
        return int(record["config"]["epochs"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


class Poll:
    """Rank 0's view of the run directory between polls: each checkpoint's size and time when
    last seen, and the lines already said (each is said once)."""

    def __init__(self) -> None:
        self.seen: dict[Path, tuple[int, int]] = {}
        self.said: set[str] = set()

    def say(self, line: str) -> None:
        if line not in self.said:
            self.said.add(line)
            print(f"--watch: {line}", file=sys.stderr, flush=True)

    def complete(self, path: Path) -> bool:
        """Whether `path` is whole: unchanged since the last poll, and with its zip directory."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            self.say(f"{path.name} vanished before it was evaluated (pruned?); skipped")
            return False
        now, before = (stat.st_size, stat.st_mtime_ns), self.seen.get(path)
        self.seen[path] = now
        if before != now:  # first seen, or still being written: look again at the next poll
            return False
        # A torch.save file ends with its zip directory: a copy cut short has none. Reading the
        # directory is enough (the evaluation reads the whole checkpoint once, and checks it).
        try:
            whole = zipfile.is_zipfile(path)
        except OSError:
            whole = False
        if not whole:
            self.say(f"waiting for {path.name}: not a complete checkpoint yet (no zip directory)")
        return whole


def next_checkpoint(logdir: Path, key: str, poll: Poll | None = None) -> Path | None:
    """The oldest complete checkpoint without a result under ``key`` (``Poll.complete``; without
    `poll`, every listed one: the trainer renames complete files in)."""
    for odd in odd_checkpoints(logdir):
        (poll or Poll()).say(f"skipped {odd.name}: not a checkpoint name (epoch out of range)")
    for path in list_checkpoints(logdir):
        if watch_result_path(logdir, path, key).exists():
            continue
        if path != checkpoint_path(logdir, checkpoint_epoch(path)):
            (poll or Poll()).say(f"skipped {path.name}: not a checkpoint name the trainer writes")
        elif poll is None or poll.complete(path):
            return path
    return None


def _epoch(checkpoint: Path | None) -> int:
    epoch = None if checkpoint is None else checkpoint_epoch(checkpoint)
    return NOTHING if epoch is None else epoch


def _agree(epoch: int, device: torch.device) -> int:
    """Rank 0's choice, on every rank."""
    choice = torch.tensor([epoch], dtype=torch.int64, device=device)
    return int(distributed.broadcast_tensor(choice, src=0).item())


def watch(cfg: Config, device: torch.device) -> int:
    """Evaluate the checkpoints of ``cfg.watch`` as they appear; returns how many."""
    logdir = Path(cfg.watch)
    if not logdir.is_dir():
        raise ValueError(f"--watch: {logdir} is not a run directory")
    # The results are written there: never into a folder that a link puts elsewhere.
    check_inner_folder("--watch", logdir / RESULTS_FOLDER)
    settings = dataclasses.asdict(cfg)
    check_trackers(settings)  # a tracker that cannot log stops the watcher before it evaluates
    samples = eval_samples(cfg)
    key = evaluation_key(cfg)
    main_proc = distributed.is_main_process()
    evaluated, idle_since, poll = 0, time.monotonic(), Poll()
    while True:
        epoch = _agree(_epoch(next_checkpoint(logdir, key, poll)) if main_proc else NOTHING, device)
        if epoch == NOTHING:
            last = run_epochs(logdir)
            done = last is not None and _evaluated(logdir, last, key)
            idle = time.monotonic() - idle_since > cfg.watch_timeout
            if _agree(int(done or idle) if main_proc else 0, device):
                break
            time.sleep(cfg.watch_interval)
            continue
        checkpoint = checkpoint_path(logdir, epoch)
        result = watch_result_path(logdir, checkpoint, key)
        if _evaluate(cfg, checkpoint, samples, device, settings, result, main_proc):
            evaluated += 1
        elif main_proc:
            poll.say(f"{checkpoint.name} vanished while it was evaluated (pruned?); skipped")
        idle_since = time.monotonic()
    if main_proc:
        print(
            f"--watch: evaluated {evaluated} checkpoint(s) of {logdir} "
            f"(results: {logdir / RESULTS_FOLDER}/*.{key}.json)",
            file=sys.stderr,
        )
    return evaluated


def _evaluate(
    cfg: Config,
    checkpoint: Path,
    samples: list,
    device: torch.device,
    settings: dict,
    result: Path,
    main_proc: bool,
) -> bool:
    """Evaluate `checkpoint` and write its result; False when it vanished meanwhile."""
    one = dataclasses.replace(cfg, load=str(checkpoint))
    try:
        with evaluation_logger(f"eval {checkpoint.name}", settings, result, main_proc) as logger:
            logger.log_config(config_record(one, {"world_size": distributed.get_world_size()}))
            evaluate_checkpoint(one, samples, device, logger, label=f"{checkpoint.name}: ")
    except Exception:
        if checkpoint.exists():
            raise
        return False
    return True


def _evaluated(logdir: Path, epoch: int, key: str) -> bool:
    return watch_result_path(logdir, checkpoint_path(logdir, epoch), key).exists()
