"""The run directory and output files under faults (issue 22): two trainers on one run
directory, a full disk, an unwritable --logdir, an --eval-output that cannot be written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_run_state_faults import PGD_RUN, eval_args
from test_train import error_line, train_args

import iat.runs.logger
from iat.runs.state import LOCK_FILE, RunDirectoryLock
from iat.runtime.atomic_io import NoSpaceError, atomic_write
from main import main

MIB = 1 << 20


# --- one trainer per run directory ---------------------------------------------------------
def start_trainer(data: Path, logdir: Path) -> subprocess.Popen:
    """A training process that runs for minutes (killed by the test)."""
    args = [*train_args(data, logdir), *PGD_RUN, "--steps-per-epoch", "100000"]
    return subprocess.Popen(
        [sys.executable, str(REPO / "main.py"), *args, "--epochs", "1", "--attack-iter", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_lock(proc: subprocess.Popen, logdir: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    lock = logdir / LOCK_FILE
    while not (lock.is_file() and f"pid {proc.pid} " in lock.read_text()):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the trainer never locked its run directory"
        time.sleep(0.1)


def test_second_trainer_is_refused_and_a_sigkill_leaves_no_stale_lock(
    tiny_imagenet, tmp_path, capsys
):
    logdir = tmp_path / "run"
    first = start_trainer(tiny_imagenet, logdir)
    try:
        wait_for_lock(first, logdir)
        args = [*train_args(tiny_imagenet, logdir), *PGD_RUN, "--epochs", "1", "--base-lr", "1"]
        assert main(args) == 1
        assert error_line(capsys) == (
            f"error: --logdir: {logdir} is in use by another training process (pid {first.pid} "
            f"on {os.uname().nodename}); wait for it to end, or give another --logdir"
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert main(args) == 0  # the kernel released the killed holder's lock
    assert (logdir / "checkpoint-epoch0001.pt").is_file()


def test_lock_is_exclusive_between_processes_and_released_on_exit(tmp_path):
    holder = RunDirectoryLock(tmp_path / "run")
    holder.acquire(create=True)
    code = (
        "import sys; from iat.runs.state import RunDirectoryLock\n"
        "try:\n    RunDirectoryLock(sys.argv[1]).acquire(create=False)\n"
        "except ValueError as e:\n    print(e); sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    probe = [sys.executable, "-c", code, str(tmp_path / "run")]
    refused = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 3 and f"pid {os.getpid()}" in refused.stdout
    holder.release()
    assert subprocess.run(probe, env=env, timeout=60).returncode == 0


# --- a full disk ---------------------------------------------------------------------------
@pytest.fixture()
def small_disk(tmp_path):
    """A 4 MiB tmpfs (needs root and mount rights; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill `disk` up to `leave` free bytes."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(bytes(max(0, free - leave)))


def test_full_disk_during_a_checkpoint_write_is_one_line(tiny_imagenet, small_disk, capsys):
    logdir = small_disk / "run"
    args = [*train_args(tiny_imagenet, logdir), *PGD_RUN, "--attack-iter", "0"]
    assert main([*args, "--epochs", "1"]) == 0
    first = (logdir / "checkpoint-epoch0001.pt").read_bytes()
    fill(small_disk, 256 << 10)  # room for the logs, not for a checkpoint (about 1 MB)
    capsys.readouterr()
    assert main([*args, "--epochs", "2"]) == 1
    line = error_line(capsys)
    assert line.startswith(
        f"error: no space left on device writing {logdir / 'checkpoint-epoch0002.pt'} ("
    )
    assert " MB needed, " in line and line.endswith("MB free); nothing was replaced")
    assert (logdir / "checkpoint-epoch0001.pt").read_bytes() == first
    assert not list(logdir.glob("*.tmp")) and not (logdir / "checkpoint-epoch0002.pt").exists()
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1  # none added by the failed one


def test_full_disk_in_the_atomic_writer_says_what_was_needed(tmp_path, monkeypatch):
    """The same without a mount: the writer's OSError(ENOSPC) as torch re-raises it."""

    def full(data: bytes) -> None:
        raise OSError(28, "No space left on device")

    def write(file) -> None:
        if hasattr(file, "fileno"):
            monkeypatch.setattr(file, "write", full)
        torch.save({"w": torch.zeros(MIB // 2)}, file)

    with pytest.raises(NoSpaceError) as caught:
        atomic_write(tmp_path / "x.pt", write)
    assert str(caught.value).startswith(f"no space left on device writing {tmp_path / 'x.pt'} (2")
    assert list(tmp_path.iterdir()) == []


# --- --logdir and --eval-output that cannot be written ------------------------------------
def test_logdir_under_proc_is_one_line_before_any_work(tiny_imagenet, tmp_path, capsys):
    assert main([*train_args(tiny_imagenet, Path("/proc/x")), "--epochs", "1"]) == 1
    line = error_line(capsys)
    assert line.startswith("error: --logdir: cannot create /proc/x: ")
    assert not Path("/proc/x").exists()


@pytest.mark.parametrize("kind", ["folder", "missing-parent", "read-only-mount"])
def test_eval_output_is_checked_before_the_evaluation(
    tiny_imagenet, tmp_path, capsys, monkeypatch, kind
):
    ckpt = tmp_path / "w.pt"
    from test_checkpoint_faults import TINY_FLAGS, tiny_model

    torch.save(tiny_model().state_dict(), ckpt)
    out = {"folder": tmp_path, "missing-parent": tmp_path / "no" / "e.json"}.get(kind)
    if kind == "read-only-mount":
        out = Path("/proc/e.json")
    evaluated = []
    monkeypatch.setattr("iat.eval.evaluate.evaluate_checkpoint", lambda *a: evaluated.append(1))
    assert main([*eval_args(tiny_imagenet, ckpt, out), *TINY_FLAGS]) == 1
    assert error_line(capsys).startswith("error: --eval-output: ") and not evaluated


def test_eval_output_failing_after_the_evaluation_prints_the_result(
    tiny_imagenet, tmp_path, capsys, monkeypatch
):
    ckpt = tmp_path / "w.pt"
    from test_checkpoint_faults import TINY_FLAGS, tiny_model

    torch.save(tiny_model().state_dict(), ckpt)

    def failing(path, text):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(iat.runs.logger, "atomic_write_text", failing)
    out = tmp_path / "e.json"
    # The 10-class model's first 3 classes are the data's (--class-subset).
    assert main([*eval_args(tiny_imagenet, ckpt, out), *TINY_FLAGS, "--class-subset"]) == 1
    captured = capsys.readouterr()
    record = json.loads(captured.out[: captured.out.rindex("}") + 1])
    assert record["images"] == 7 and "top1_error" in record
    assert captured.err.strip().splitlines()[-1] == (
        f"error: --eval-output: cannot write {out} (Read-only file system); the result is "
        "printed above"
    )
