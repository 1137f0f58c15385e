"""Files of a run or evaluation directory that are not what they seem (issue 32): a symbolic
link out of the directory is never written through, a FIFO, a device or a symbolic link loop is
never read, a forged evaluation state is refused, and a file size limit is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_checkpoint_faults import TINY_FLAGS, tiny_model
from test_eval_state import _keys_of_a_killed_run
from test_run_state_faults import PGD_RUN, eval_args
from test_train import train_args

from iat.eval.state import BatchRecord, EvalState, EvalStateError
from iat.runs.files import LOCK_FILE, METRICS_FILE, RESULTS_FOLDER
from iat.runs.state import RunDirectoryLock
from iat.runtime.atomic_io import UnsafeFileError, open_no_follow, read_regular
from main import main

SPLIT = {"num_images": 12, "batch": 2}
VICTIM = "precious data\n"


@pytest.fixture()
def victim(tmp_path: Path) -> Path:
    """A file outside every run directory, which no link may change."""
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "victim.txt"
    path.write_text(VICTIM)
    return path


def only_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ") or "Traceback" in line]
    assert len(errors) == 1, err
    return errors[0]


# --- symbolic links out of a run directory are never written through -----------------------
def test_a_lock_file_linked_out_is_refused_and_the_target_kept(tiny_imagenet, tmp_path, victim):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).symlink_to(victim)
    with pytest.raises(UnsafeFileError, match="is a symbolic link"):
        RunDirectoryLock(run).acquire(create=False)
    assert victim.read_text() == VICTIM


def test_a_training_run_refuses_its_linked_lock_in_one_line(
    tiny_imagenet, tmp_path, victim, capsys
):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).symlink_to(victim)
    assert main([*train_args(tiny_imagenet, run), *PGD_RUN, "--epochs", "1"]) == 1
    assert only_error_line(capsys) == (
        f"error: {run / LOCK_FILE} is a symbolic link; a file of a run or evaluation "
        "directory is never followed out of it (remove the link)"
    )
    assert victim.read_text() == VICTIM


def test_metrics_linked_out_is_refused_and_the_target_kept(tiny_imagenet, tmp_path, victim, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_FILE).symlink_to(victim)
    args = [*train_args(tiny_imagenet, run), *PGD_RUN, "--epochs", "1", "--attack-iter", "0"]
    assert main(args) == 1
    line = only_error_line(capsys)
    assert line.startswith(f"error: {run / METRICS_FILE} is a symbolic link"), line
    assert victim.read_text() == VICTIM


def test_a_rank_file_linked_out_is_never_truncated_or_appended_to(tmp_path, victim):
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "key.rank0.jsonl").symlink_to(victim)
    with pytest.raises(EvalStateError, match=r"key\.rank0\.jsonl is a symbolic link"):
        EvalState(folder, "key", 0, **SPLIT)
    # A link that appears after the state was read is not appended through either.
    (folder / "key.rank0.jsonl").unlink()
    state = EvalState(folder, "key", 0, **SPLIT)
    (folder / "key.rank0.jsonl").symlink_to(victim)
    with pytest.raises(UnsafeFileError, match="is a symbolic link"):
        state.append(BatchRecord(0, [2.0, 0.0, 0.0, 0.0], 0.0, {}))
    assert victim.read_text() == VICTIM


@pytest.fixture()
def tiny_checkpoint(tmp_path: Path) -> Path:
    ckpt = tmp_path / "w.pt"
    torch.save(tiny_model().state_dict(), ckpt)
    return ckpt


def test_a_state_folder_linked_out_is_refused_in_one_line(
    tiny_imagenet, tmp_path, tiny_checkpoint, victim, capsys
):
    out = tmp_path / "results" / "r.json"
    out.parent.mkdir()
    Path(f"{out}.state").symlink_to(victim.parent, target_is_directory=True)
    args = [*eval_args(tiny_imagenet, tiny_checkpoint, out), *TINY_FLAGS, "--class-subset"]
    assert main(args) == 1
    line = only_error_line(capsys)
    assert line.startswith(f"error: --eval-state: {out}.state is a symbolic link out of "), line
    assert sorted(victim.parent.iterdir()) == [victim] and victim.read_text() == VICTIM


def test_a_state_path_that_is_a_file_is_one_line(tiny_imagenet, tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "r.json"
    Path(f"{out}.state").write_text("not a folder")
    args = [*eval_args(tiny_imagenet, tiny_checkpoint, out), *TINY_FLAGS, "--class-subset"]
    assert main(args) == 1
    assert only_error_line(capsys) == (
        f"error: --eval-state: {out}.state exists and is not a folder"
    )


def test_watch_results_folder_linked_out_is_refused(tiny_imagenet, tmp_path, victim, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / RESULTS_FOLDER).symlink_to(victim.parent, target_is_directory=True)
    args = ["--eval", "--watch", str(run), "--data", str(tiny_imagenet), "--image-size", "32",
            "--workers", "0", "--attack-iter", "0", "--watch-timeout", "1"]  # fmt: skip
    assert main(args) == 1
    line = only_error_line(capsys)
    assert line.startswith(f"error: --watch: {run / RESULTS_FOLDER} is a symbolic link out"), line
    assert sorted(victim.parent.iterdir()) == [victim]


# --- readers: regular files only, bounded ---------------------------------------------------
def test_a_fifo_rank_file_is_refused_without_waiting(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    os.mkfifo(folder / "key.rank0.jsonl")
    started = time.monotonic()
    with pytest.raises(EvalStateError, match="is not a regular file"):
        EvalState(folder, "key", 0, **SPLIT)
    assert time.monotonic() - started < 5
    with pytest.raises(UnsafeFileError, match="is not a regular file"):
        open_no_follow(folder / "key.rank0.jsonl", "ab")  # no reader: refused, not blocked


def test_a_rank_file_linked_to_dev_zero_is_not_read(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "key.rank0.jsonl").symlink_to("/dev/zero")
    with pytest.raises(EvalStateError, match="is a symbolic link"):
        EvalState(folder, "key", 0, **SPLIT)
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        read_regular("/dev/zero", 1024)  # a device named directly


def test_a_symlink_loop_is_refused(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(UnsafeFileError, match="is a symbolic link"):
        read_regular(loop, 1024)


def test_deeply_nested_state_line_is_one_error(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    good = BatchRecord(0, [2.0, 1.0, 0.0, 0.0], 0.0, {}).line()
    (folder / "key.rank0.jsonl").write_text("[" * 200_000 + "\n" + good)
    with pytest.raises(EvalStateError, match=r"line 1: nested too deeply"):
        EvalState(folder, "key", 0, **SPLIT)


def test_forged_counts_stop_the_evaluation_in_one_line(
    tiny_imagenet, tmp_path, tiny_checkpoint, capsys
):
    """The counts [-400, ...] once gave "-308 images, top-1 error -350"; now refused."""
    out = tmp_path / "r.json"
    args = [*eval_args(tiny_imagenet, tiny_checkpoint, out), *TINY_FLAGS, "--class-subset"]
    key = next(iter(_keys_of_a_killed_run(args, tmp_path)))
    state = Path(f"{out}.state")
    state.mkdir()
    forged = '{"batch": 0, "counts": [-400, -350, 0, 0], "skipped": 0, "stats": {}}\n'
    (state / f"{key}.rank0.jsonl").write_text(forged)
    capsys.readouterr()
    assert main(args) == 1
    line = only_error_line(capsys)
    assert f"{key}.rank0.jsonl line 1: not an evaluation state record (counts" in line, line
    assert "impossible for a batch of 4 images" in line


# --- a file size limit (ulimit -f) is one line, as a full disk ------------------------------
EFBIG_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    import torch
    from iat.eval.state import BatchRecord, EvalState
    from iat.runs.trackers.json_lines import JsonLinesBackend
    from iat.runtime.atomic_io import NoSpaceError, atomic_write

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    root = Path(sys.argv[1])
    def attempt(write):
        try:
            write()
        except NoSpaceError as error:
            print(error)
    attempt(lambda: atomic_write(root / "big.pt", lambda f: torch.save(torch.zeros(1 << 16), f)))
    metrics = JsonLinesBackend(root)
    attempt(lambda: [metrics.result("x", {"pad": "y" * 1000}) for _ in range(100)])
    state = EvalState(root / "state", "key", 0, num_images=1 << 20, batch=1)
    record = BatchRecord(0, [1.0, 0.0, 0.0, 0.0], 0.0, {"pad": [0.5] * 2000})
    attempt(lambda: [state.append(record) for _ in range(100)])
    """
)


def test_a_file_size_limit_is_one_line_naming_the_file(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", EFBIG_SCRIPT, str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3, lines
    big, metrics, state = lines
    assert big.startswith(f"file size limit (ulimit -f) reached writing {tmp_path / 'big.pt'} (")
    assert big.endswith("nothing was replaced") and not (tmp_path / "big.pt").exists()
    assert metrics == f"file size limit (ulimit -f) reached writing {tmp_path / METRICS_FILE}"
    assert state == (
        f"file size limit (ulimit -f) reached writing {tmp_path / 'state' / 'key.rank0.jsonl'}"
    )
    assert not list(tmp_path.glob(".*.tmp"))
    json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[0])  # whole lines before it
