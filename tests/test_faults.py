"""Faults an operator meets: a rank that dies or hangs, bad flags, an unusable run directory.

Each runs real processes or the real command line, with bounded waits; the contract is one
error line naming the culprit, exit 1, and no run directory left behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO

from main import main

TINY = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, port: int) -> dict[str, str]:
    """Two ranks started by hand (no launcher): the variables torchrun would set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    ranks = {"RANK": rank, "WORLD_SIZE": 2, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": 2}
    return {**env, **{k: str(v) for k, v in ranks.items()}, "MASTER_PORT": str(port)}


def start_two_ranks(flags: list[str]) -> list[subprocess.Popen]:
    """`main.py flags` as ranks 0 and 1 of one job (stderr piped, as text)."""
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(REPO / "main.py"), *flags],
            env=_rank_env(rank, port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]


def signal_rank_1(
    ranks: list[subprocess.Popen], signum: int, ready: Callable[[], None]
) -> tuple[str, float]:
    """Once `ready()` returns, send `signum` to rank 1: rank 0's stderr and the seconds it took
    to exit. Both ranks are killed afterwards, whatever happened."""
    try:
        ready()
        ranks[1].send_signal(signum)
        started = time.monotonic()
        _, err = ranks[0].communicate(timeout=90)
        return err, time.monotonic() - started
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait(timeout=30)


def _wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.stat().st_size > 0):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.parametrize("signum", [signal.SIGSTOP, signal.SIGKILL])
def test_a_hung_or_dead_rank_is_named_in_one_line(tmp_path: Path, signum: int) -> None:
    logdir = tmp_path / "run"
    flags = [
        "--fake", *TINY, "--image-size", "32", "--batch", "2", "--attack-iter", "0",
        "--epochs", "1", "--steps-per-epoch", "100000", "--train-eval", "none",
        "--threads", "1", "--log-every", "5", "--collective-timeout", "5",
        "--logdir", str(logdir),
    ]  # fmt: skip
    ranks = start_two_ranks(flags)
    # Once training steps are being taken.
    err, elapsed = signal_rank_1(ranks, signum, lambda: _wait_for(logdir / "metrics.jsonl", 120))
    assert ranks[0].returncode == 1, err[-3000:]
    line = _last_line(err)
    assert line.startswith("error: rank 1 (last at step ") and "stopped answering" in line, err
    assert "--collective-timeout" in line
    assert elapsed < 5 + 3 + 20  # the timeout, the survivors' report window, and slack


BAD_FLAGS = [
    (["--data-timeout", "nan"], "--data-timeout"),
    (["--data-timeout", "0"], "--data-timeout"),
    (["--base-lr", "-1"], "--base-lr"),
    (["--base-lr", "nan"], "--base-lr"),
    (["--base-lr", "inf"], "--base-lr"),
    (["--width", "0"], "--width"),
    (["--num-classes", "1"], "--num-classes"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--lr-decay-epochs", "-5"], "--lr-decay-epochs"),
    (["--threads", "0"], "--threads"),
    (["--attack-epsilon", "nan"], "--attack-epsilon"),
    (["--label-smoothing", "1.5"], "--label-smoothing"),
    (["--collective-timeout", "0"], "--collective-timeout"),
    (["--batch", "four"], "--batch"),
    (["--arch", "ResNot"], "--arch"),
    (["--attack", "apgd-ce"], "--attack"),  # training attacks with the original's PGD
    (["--norm", "2"], "--norm"),
    (["--restarts", "0"], "--restarts"),
    (["--load", "/no/such/weights.npz"], "/no/such/weights.npz"),
    (["--data-server", "carrier-pigeon://nest", "--loader", "server"], "carrier-pigeon"),
]


@pytest.mark.parametrize(("flags", "culprit"), BAD_FLAGS)
def test_bad_flags_are_one_line_and_leave_no_run_directory(
    flags: list[str], culprit: str, tmp_path: Path, capsys
) -> None:
    logdir = tmp_path / "run"
    args = ["--fake", *TINY, "--image-size", "32", "--batch", "2", "--loader", "local",
            "--steps-per-epoch", "1", "--epochs", "1", "--train-eval", "none",
            "--data-timeout", "2", "--logdir", str(logdir), *flags]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and culprit in err[0], err
    assert not logdir.exists()


def test_data_server_down_leaves_no_run_directory(tmp_path: Path, capsys) -> None:
    logdir = tmp_path / "run"
    address = f"ipc://@iat-test-nobody-{os.getpid()}"
    args = ["--fake", *TINY, "--image-size", "32", "--batch", "2", "--loader", "server",
            "--data-server", address, "--data-timeout", "1", "--logdir", str(logdir)]  # fmt: skip
    # --fake uses constant batches; without it the server is the source: use a data folder.
    args.remove("--fake")
    data = tmp_path / "data" / "train" / "n0"
    data.mkdir(parents=True)
    import cv2
    import numpy as np

    assert cv2.imwrite(str(data / "a.png"), np.zeros((8, 8, 3), np.uint8))
    assert main(["--data", str(tmp_path / "data"), *args, "--train-eval", "none"]) == 1
    err = capsys.readouterr().err
    assert address in _last_line(err) and "not answering" in _last_line(err)
    assert not logdir.exists()


def test_logdir_that_is_a_file(tmp_path: Path, capsys) -> None:
    logdir = tmp_path / "run"
    logdir.write_text("not a folder")
    args = ["--fake", *TINY, "--image-size", "32", "--batch", "2", "--steps-per-epoch", "1",
            "--epochs", "1", "--train-eval", "none", "--logdir", str(logdir)]  # fmt: skip
    assert main(args) == 1
    line = _last_line(capsys.readouterr().err)
    assert line.startswith("error: --logdir") and str(logdir) in line


# Runs main.py, but the second checkpoint write stops half-way (as a process killed there would).
HANG_IN_SECOND_SAVE = """
import sys, time, torch
real_save, saves = torch.save, []
def save(obj, f, *args, **kwargs):
    saves.append(1)
    if len(saves) == 2:
        f.write(b"half a checkpoint")
        f.flush()
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from main import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_a_checkpoint_write_resumes_bit_exact(tiny_imagenet, tmp_path):
    import torch

    def run_args(logdir: Path) -> list[str]:
        return ["--data", str(tiny_imagenet), "--logdir", str(logdir), *TINY,
                "--image-size", "32", "--batch", "4", "--workers", "0", "--loader", "local",
                "--attack-iter", "2", "--attack-epsilon", "8", "--steps-per-epoch", "2",
                "--train-eval", "none", "--threads", "1", "--epochs", "3"]  # fmt: skip

    logdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HANG_IN_SECOND_SAVE, *run_args(logdir)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(logdir.glob(".checkpoint-epoch0002.pt.*.tmp")):
            assert time.monotonic() < deadline and proc.poll() is None, "no second checkpoint write"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert [p.name for p in logdir.glob("checkpoint-epoch*.pt")] == ["checkpoint-epoch0001.pt"]

    assert main(run_args(logdir)) == 0  # resumes after epoch 1
    assert not list(logdir.glob(".checkpoint-*")), "the half-written file was left behind"
    assert main(run_args(tmp_path / "reference")) == 0  # never interrupted
    resumed, reference = (
        torch.load(d / "checkpoint-epoch0003.pt", weights_only=True)["model"]
        for d in (logdir, tmp_path / "reference")
    )
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_atomic_writes_fsync_the_file_and_then_its_folder(tmp_path, monkeypatch):
    import stat

    from iat.runtime.atomic_io import atomic_write_text

    synced: list[tuple[bool, str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        synced.append((is_dir, sorted(p.name for p in tmp_path.iterdir())[-1]))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_text(tmp_path / "config.json", "{}\n")
    # The data before the rename (under its temporary name), the folder after it.
    assert [is_dir for is_dir, _ in synced] == [False, True]
    assert synced[0][1].startswith(".config.json.") and synced[1][1] == "config.json"
