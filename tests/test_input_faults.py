"""Data and flag faults, second round (issue 22): an undecodable validation image found before
training, file names that would forge prediction lines, oversized frames counted, impossible
flag combinations."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import test_data_faults as data_faults
import torch
from test_checkpoint_faults import TINY_FLAGS, tiny_model
from test_train import error_line, train_args

import iat.train.trainer
from iat.data.client import ZMQBatchClient
from main import main

address = data_faults.address  # fixture: a fresh ipc address


# --- an undecodable validation image: found at start, not after an epoch ----------------------
@pytest.mark.parametrize("content", [b"", b"not an image at all"], ids=["empty", "corrupt"])
def test_undecodable_val_image_is_an_error_before_training(
    tiny_imagenet, tmp_path, capsys, monkeypatch, content
):
    bad = tiny_imagenet / "val" / "n00001" / "img001.png"
    bad.write_bytes(content)

    def never(*args, **kwargs):
        raise AssertionError("an epoch was trained before the check")

    monkeypatch.setattr(iat.train.trainer, "train_epoch", never)
    logdir = tmp_path / "run"
    assert main([*train_args(tiny_imagenet, logdir), "--epochs", "1"]) == 1
    assert error_line(capsys) == (
        f"error: --data: 1 image(s) of val/ cannot be decoded (empty, or not an image): {bad}; "
        "found before training (--skip-unreadable skips them)"
    )
    assert not logdir.exists()


def test_undecodable_val_image_with_skip_unreadable_is_a_warning(tiny_imagenet, tmp_path, capsys):
    bad = tiny_imagenet / "val" / "n00001" / "img001.png"
    bad.write_bytes(b"")
    args = [*train_args(tiny_imagenet, tmp_path / "run"), "--attack-iter", "0"]
    assert main([*args, "--epochs", "1", "--skip-unreadable"]) == 0
    assert f"warning: val/: 1 undecodable image(s) skipped: {bad}" in capsys.readouterr().err


# --- file names that would forge lines of the prediction file ---------------------------------
def test_file_name_with_a_newline_never_forges_a_prediction_line(tmp_path, capsys):
    folder = tmp_path / "images" / "n00001"
    folder.mkdir(parents=True)
    image = np.full((8, 8, 3), 90, np.uint8)
    assert cv2.imwrite(str(folder / "fine.png"), image)
    evil = folder / "evil\nn00000_fake 0.png"
    assert cv2.imencode(".png", image)[0]
    evil.write_bytes(cv2.imencode(".png", image)[1].tobytes())
    ckpt = tmp_path / "w.pt"
    torch.save(tiny_model().state_dict(), ckpt)
    out = tmp_path / "predictions.txt"
    args = [
        "--eval-directory", str(tmp_path / "images"), "--load", str(ckpt), *TINY_FLAGS,
        "--image-size", "32", "--batch", "4", "--workers", "0", "--prediction-file", str(out),
    ]  # fmt: skip
    assert main(args) == 1
    line = error_line(capsys)
    assert line.startswith("error: --eval-directory: 1 file name(s) hold a line break")
    assert repr("n00001/evil\nn00000_fake 0.png") in line and not out.exists()


# --- oversized frames: counted and named like any other malformed message ---------------------
def test_oversized_frame_is_counted_and_named(address, caplog):
    caplog.set_level(logging.ERROR, logger="iat.data.client")
    frame = 49 << 10  # a float32 batch where uint8 was expected: over the 4096-byte bound
    with ZMQBatchClient(address, timeout_s=10, batch=1, image_size=4, num_classes=10) as client:
        sender = subprocess.Popen(
            [sys.executable, "-c", data_faults.OVERSIZED_SENDER, address, str(frame)],
            env=data_faults._env(),
        )
        try:
            images, labels = next(client)
        finally:
            sender.kill()
            sender.wait(timeout=10)
        assert labels.tolist() == [3] and client.rejected == 1
    assert any("a frame over 4096 bytes" in r.getMessage() for r in caplog.records)


# --- impossible flag combinations: one line naming the flag, nothing left behind ---------------
@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--seed", "-1"], "error: --seed: must be >= 0, got -1"),
        (
            ["--loader", "local", "--data", "/nonexistent"],
            "error: --fake: constant batches replace --data (nothing of it would be read); "
            "give one of them",
        ),
        (["--eval"], "error: --fake: constant batches are for training; --eval needs --data"),
    ],
)
def test_impossible_flags_are_one_line(tmp_path, capsys, flags, line):
    logdir = tmp_path / "run"
    assert main(["--fake", *TINY_FLAGS, "--logdir", str(logdir), *flags]) == 1
    assert capsys.readouterr().err == line + "\n"
    assert not logdir.exists() and not Path("/nonexistent").exists()
