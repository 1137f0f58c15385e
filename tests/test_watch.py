"""--eval --watch on a live run directory: half-written and pruned checkpoints, odd names."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

import nets
from iat.app.watch import Poll, next_checkpoint
from iat.runs.files import checkpoint_epoch, list_checkpoints
from main import main

HUGE = "checkpoint-epoch99999999999999999999.pt"


def _weights(path: Path) -> bytes:
    torch.manual_seed(0)
    nets.save_weights(nets.build_model("ResNet", num_blocks=[1] * 4, width=8, num_classes=3), path)
    return path.read_bytes()


def test_an_epoch_out_of_range_is_no_checkpoint(tmp_path: Path) -> None:
    (tmp_path / HUGE).write_bytes(b"x")
    assert checkpoint_epoch(HUGE) is None
    assert checkpoint_epoch("checkpoint-epoch000000000123.pt") == 123
    assert list_checkpoints(tmp_path) == []


def test_a_half_written_checkpoint_waits_and_a_vanished_one_is_skipped(
    tmp_path: Path, capsys
) -> None:
    whole = _weights(tmp_path / "w.pt")
    path = tmp_path / "checkpoint-epoch0001.pt"
    path.write_bytes(whole[: len(whole) // 2])  # cp-style: seen while it is being copied
    poll = Poll()
    assert next_checkpoint(tmp_path, "k", poll) is None  # first seen
    assert next_checkpoint(tmp_path, "k", poll) is None  # stable, but does not verify
    assert next_checkpoint(tmp_path, "k", poll) is None  # said once only
    path.write_bytes(whole)
    assert next_checkpoint(tmp_path, "k", poll) is None  # changed since the last poll
    assert next_checkpoint(tmp_path, "k", poll) == path
    err = capsys.readouterr().err
    assert err.count("waiting for checkpoint-epoch0001.pt") == 1, err
    path.unlink()  # pruned by the live run between its listing and its check
    assert not poll.complete(path)
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "checkpoint-epoch0001.pt vanished" in err, err


def test_watch_skips_odd_names_and_evaluates_a_copy_once_complete(
    tiny_imagenet: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    whole = _weights(tmp_path / "w.pt")
    (run / HUGE).write_bytes(whole)
    copy = run / "checkpoint-epoch0002.pt"
    copy.write_bytes(whole[:1000])

    def finish_the_copy() -> None:
        time.sleep(1.0)
        copy.write_bytes(whole)

    writer = threading.Thread(target=finish_the_copy)
    writer.start()
    try:
        code = main(["--eval", "--watch", str(run), "--data", str(tiny_imagenet),
                     "--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8",
                     "--image-size", "32", "--batch", "4", "--workers", "0", "--attack-iter",
                     "0", "--num-examples", "3", "--watch-interval", "0.2",
                     "--watch-timeout", "3", "--threads", "1"])  # fmt: skip
    finally:
        writer.join()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "checkpoint-epoch0002.pt: clean: 3 images" in out, out
    assert f"skipped {HUGE}" in err and "evaluated 1 checkpoint(s)" in err, err
    assert err.count(HUGE) == 1 and "Traceback" not in err
