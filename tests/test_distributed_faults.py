"""Lost ranks, second round (issue 22): a rank killed under torchrun is named by the survivor
before the launcher's summary, and an evaluation with a stopped rank ends within the collective
timeout naming the batch the rank was on. Real processes over loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import REPO, write_imagenet
from test_checkpoint_faults import TINY_FLAGS, tiny_model
from test_faults import _wait_for, signal_rank_1, start_two_ranks

TRAIN = [
    "--fake", *TINY_FLAGS, "--image-size", "32", "--batch", "2", "--attack-iter", "0",
    "--epochs", "1", "--steps-per-epoch", "100000", "--train-eval", "none", "--threads", "1",
    "--log-every", "5", "--collective-timeout", "30",
]  # fmt: skip


def _rank_pid(launcher: int, rank: int, seconds: float = 60) -> int:
    """The pid of the worker of `rank` among the launcher's children."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank} under pid {launcher}")


def test_rank_killed_under_torchrun_is_named_by_the_survivor(tmp_path):
    logdir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher = subprocess.Popen(
        [
            *torchrun,
            "--nproc-per-node",
            "2",
            str(REPO / "main.py"),
            *TRAIN,
            "--logdir",
            str(logdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        _wait_for(logdir / "metrics.jsonl", 120)  # both ranks are taking steps
        os.kill(_rank_pid(launcher.pid, 1), signal.SIGKILL)
        started = time.monotonic()
        _, err = launcher.communicate(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        launcher.kill()
        launcher.wait(timeout=30)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: rank 1 (last at step ") and " is gone: rank 0 " in lines[0]
    assert lines[0].endswith("was stopped by the launcher then")
    assert elapsed < 30  # before the collective timeout: the launcher's SIGTERM, reported


def test_eval_with_a_stopped_rank_names_its_batch_within_the_timeout(tmp_path):
    data = write_imagenet(tmp_path / "data", classes=3, train_per_class=1, val_images=600)
    ckpt = tmp_path / "w.pt"
    torch.save(tiny_model().state_dict(), ckpt)
    state = tmp_path / "state"
    flags = [
        "--eval", "--load", str(ckpt), "--data", str(data), *TINY_FLAGS, "--image-size", "32",
        "--batch", "1", "--workers", "0", "--threads", "1", "--attack-iter", "30",
        "--collective-timeout", "5", "--eval-output", str(tmp_path / "e.json"),
        "--eval-state", str(state), "--class-subset",
    ]  # fmt: skip
    ranks = start_two_ranks(flags)

    def a_batch_of_rank_1_is_done() -> None:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size for p in state.glob("*.rank1.jsonl")):
            assert time.monotonic() < deadline and ranks[0].poll() is None, "no batch finished"
            time.sleep(0.2)

    err, elapsed = signal_rank_1(ranks, signal.SIGSTOP, a_batch_of_rank_1_is_done)
    assert ranks[0].returncode == 1, err[-3000:]
    line = [line for line in err.splitlines() if line.strip()][-1]
    assert line.startswith("error: rank 1 (last at batch ") and "stopped answering" in line, err
    assert "no sign of it for 5 s (--collective-timeout); this is rank 0, at batch " in line
    done = len(next(state.glob("*.rank0.jsonl")).read_text().splitlines())
    assert done < 299, "rank 0 attacked its whole share before noticing"
    assert elapsed < 5 + 5 + 15  # the timeout, a beat, and slack for the batch under way
