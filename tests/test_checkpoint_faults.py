"""Hostile and damaged checkpoints, second round (issue 22): .pt zip bombs and unknown keys,
non-finite and integer weights, a corrupt newest checkpoint, and the messages of odd files."""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_run_state_faults import PGD_RUN, TINY, eval_args, write_run_checkpoint
from test_train import error_line, train_args

import nets
from iat.config import Config
from iat.runs.state import SET_ASIDE_SUFFIX, list_checkpoints, plan_start
from iat.train.builders import build_optimizer
from main import main

MIB = 1 << 20
# The command line's spelling of TINY (test_run_state_faults), for --eval of plain weights.
TINY_FLAGS = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8"]
TINY_FLAGS += ["--num-classes", "10"]


def tiny_model() -> torch.nn.Module:
    return nets.build_model("ResNet", **TINY)


def deflated_copy(plain: Path, path: Path) -> Path:
    """`plain` (a torch.save zip) rewritten with every member deflated, 1 MiB at a time."""
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            with src.open(info) as i, out.open(info.filename, "w", force_zip64=True) as o:
                while chunk := i.read(MIB):
                    o.write(chunk)
    return path


# --- .pt zip bombs and keys this project never writes -----------------------------------------
def test_pt_zip_bomb_is_refused_from_the_zip_directory(tmp_path, monkeypatch):
    plain = tmp_path / "plain.pt"
    torch.save({"model": tiny_model().state_dict(), "extra": torch.zeros(16 * MIB)}, plain)
    bomb = deflated_copy(plain, tmp_path / "bomb.pt")
    plain.unlink()
    assert bomb.stat().st_size < MIB  # 64 MiB of zeros under an extra key

    def never(*args, **kwargs):
        raise AssertionError("torch.load inflated the bomb")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(nets.CheckpointError) as caught:
        nets.load_weights(tiny_model(), bomb)
    message = str(caught.value)
    assert message.startswith(f"{bomb}: its members declare ")
    assert f"{64 * MIB} bytes stored in" in message and "\n" not in message


def test_pt_zip_bomb_through_eval_is_one_line(tiny_imagenet, tmp_path, capsys):
    plain = tmp_path / "plain.pt"
    torch.save({"model": tiny_model().state_dict(), "extra": torch.zeros(MIB)}, plain)
    bomb = deflated_copy(plain, tmp_path / "bomb.pt")
    assert main(eval_args(tiny_imagenet, bomb, tmp_path / "e.json")) == 1
    assert error_line(capsys).startswith(f"error: {bomb}: its members declare ")
    assert not (tmp_path / "e.json").exists()


def test_unknown_key_of_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "extra.pt"
    torch.save({"model": tiny_model().state_dict(), "payload": torch.zeros(3)}, path)
    with pytest.raises(nets.CheckpointError, match=r"1 unknown field\(s\): payload; a checkpoint"):
        nets.read_weights(path)


# --- non-finite and integer weights, averages and optimizer state ----------------------------
def poisoned_state(value: float) -> dict[str, torch.Tensor]:
    state = tiny_model().state_dict()
    state["group1.block0.conv2.weight"][0, 0, 0, 0] = value
    return state


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("form", ["state_dict", "training", "npz"])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, form, value):
    state = poisoned_state(value)
    if form == "npz":
        model = tiny_model()
        model.load_state_dict(state)
        path = tmp_path / "w.npz"
        nets.save_npz(model, path)  # as group1/block0/conv2/W, named by its torch key
    else:
        path = tmp_path / "w.pt"
        torch.save(state if form == "state_dict" else {"model": state, "epoch": 1}, path)
    with pytest.raises(nets.CheckpointError) as caught:
        nets.load_weights(tiny_model(), path)
    assert str(caught.value) == (
        f"{path}: 1 tensor(s) hold NaN or Inf: group1.block0.conv2.weight; non-finite weights "
        "are never loaded"
    )


def test_non_finite_weights_through_eval_are_one_line(tiny_imagenet, tmp_path, capsys):
    path = tmp_path / "nan.pt"
    torch.save(poisoned_state(float("nan")), path)
    assert main([*eval_args(tiny_imagenet, path, tmp_path / "e.json"), *TINY_FLAGS]) == 1
    assert "hold NaN or Inf: group1.block0.conv2.weight" in error_line(capsys)


def test_training_from_non_finite_weights_stops_at_start(tiny_imagenet, tmp_path, capsys):
    path = tmp_path / "inf.pt"
    torch.save(poisoned_state(float("inf")), path)
    logdir = tmp_path / "run"
    args = [*train_args(tiny_imagenet, logdir), "--load", str(path), "--num-classes", "10"]
    assert main(args) == 1
    assert "hold NaN or Inf: group1.block0.conv2.weight" in error_line(capsys)
    assert not logdir.exists()  # refused before the run directory, not after an epoch


def test_integer_weights_are_refused_not_cast(tmp_path):
    path = tmp_path / "int.pt"
    torch.save({k: v.to(torch.int64) for k, v in tiny_model().state_dict().items()}, path)
    with pytest.raises(nets.CheckpointError) as caught:
        nets.load_weights(tiny_model(), path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "not floating point: conv0.weight (int64)" in message
    assert message.endswith("weights are never cast")


def test_non_finite_averaged_weights_are_refused_at_resume_and_eval_ema(
    tiny_imagenet, tmp_path, capsys
):
    path = write_run_checkpoint(tmp_path / "run", ema=poisoned_state(float("nan")))
    with pytest.raises(nets.CheckpointError, match="ema.group1.block0.conv2.weight"):
        plan_start(tmp_path / "run", None, 1)
    args = [*eval_args(tiny_imagenet, path, tmp_path / "e.json"), *TINY_FLAGS, "--eval-ema"]
    assert main(args) == 1
    assert "hold NaN or Inf: ema.group1.block0.conv2.weight" in error_line(capsys)


def test_non_finite_optimizer_state_is_refused(tmp_path):
    model = tiny_model()
    optimizer = build_optimizer(model, Config(data="x"))
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    state["state"][0]["momentum_buffer"].fill_(float("inf"))
    write_run_checkpoint(tmp_path / "run", optimizer=state)
    with pytest.raises(nets.CheckpointError, match=r"optimizer\.state\.0\.momentum_buffer"):
        plan_start(tmp_path / "run", None, 1)


# --- a corrupt newest checkpoint: fall back to the newest that verifies ------------------------
@pytest.mark.parametrize("damage", ["truncated", "zeroed", "non-finite"])
def test_corrupt_newest_checkpoint_falls_back_and_is_kept_aside(tmp_path, capsys, damage):
    run = tmp_path / "run"
    older = write_run_checkpoint(run)
    newest = run / "checkpoint-epoch0002.pt"
    data = older.read_bytes()
    newest.write_bytes(
        {"truncated": data[: len(data) // 2], "zeroed": bytes(len(data)), "non-finite": b""}[damage]
    )
    if damage == "non-finite":
        torch.save(
            {**torch.load(older, weights_only=True), "model": poisoned_state(float("inf"))},
            newest,
        )
    start = plan_start(run, None, 1)
    assert (start.kind, start.progress.epoch, start.weights.source) == ("resume", 1, str(older))
    assert list_checkpoints(run) == [older]
    aside = run / f"checkpoint-epoch0002.pt{SET_ASIDE_SUFFIX}"
    assert aside.is_file()  # kept for a person, never deleted
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {newest}: ")
    assert lines[0].endswith(f"renamed it to {aside.name} and resuming from {older.name}")


def test_corrupt_newest_checkpoint_of_a_real_run_resumes(tiny_imagenet, tmp_path, capsys):
    logdir = tmp_path / "run"
    args = [*train_args(tiny_imagenet, logdir), *PGD_RUN, "--attack-iter", "0"]
    assert main([*args, "--epochs", "2"]) == 0
    newest = logdir / "checkpoint-epoch0002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    assert main([*args, "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert "renamed it to checkpoint-epoch0002.pt.unreadable and resuming from" in err
    assert torch.load(newest, weights_only=True)["epoch"] == 2  # written again
    assert (logdir / "checkpoint-epoch0002.pt.unreadable").stat().st_size == 1000


def test_only_checkpoint_corrupt_is_one_line_and_nothing_renamed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-epoch0001.pt").write_bytes(bytes(100))
    with pytest.raises(nets.CheckpointError, match="unreadable .pt checkpoint|not a torch.save"):
        plan_start(run, None, 1)
    assert list_checkpoints(run) == [run / "checkpoint-epoch0001.pt"]


# --- messages of odd files -----------------------------------------------------------------
def test_huge_epoch_names_the_file_and_the_field(tmp_path):
    path = write_run_checkpoint(tmp_path / "run", epoch=10**30)
    with pytest.raises(nets.CheckpointError) as caught:
        plan_start(tmp_path / "run", None, 1)
    assert str(caught.value) == (
        f"{path}: field 'epoch' must be a non-negative integer below 2**63, not an integer of "
        "31 digits"
    )


def test_huge_npy_header_never_suggests_allow_pickle(tmp_path):
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (10,), }" + b" " * 200_000
    path = tmp_path / "header.npz"
    with zipfile.ZipFile(path, "w") as archive:
        body = b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header) + 1) + header + b"\n"
        archive.writestr("linear/b.npy", body + bytes(40))
    with pytest.raises(nets.CheckpointError) as caught:
        nets.read_weights(path)
    message = str(caught.value)
    assert "allow_pickle" not in message and "\n" not in message
    assert message.endswith("header is longer than the 10000 bytes an array's needs)")


def test_raw_pickle_named_pt_is_one_line_without_torch_warnings(tmp_path, capfd):
    import pickle

    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps({"model": {"a": 1}}, protocol=4))
    with pytest.raises(nets.CheckpointError) as caught:
        nets.read_weights(path)
    assert str(caught.value).startswith(f"{path}: not a torch.save file")
    assert capfd.readouterr().err == ""


def test_empty_pt_says_it_is_empty(tmp_path):
    path = tmp_path / "empty.pt"
    path.touch()
    with pytest.raises(nets.CheckpointError, match=r"unreadable .pt checkpoint \(an empty file\)"):
        nets.read_weights(path)


def test_legacy_torch_format_still_loads(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(tiny_model().state_dict(), path, _use_new_zipfile_serialization=False)
    nets.load_weights(tiny_model(), path)
    assert np.isfinite(nets.read_weights(path).num_classes)


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_a_checkpoint_that_is_no_regular_file_is_one_line(tmp_path, kind):
    """A FIFO named like a checkpoint would block torch.load, /dev/zero would read without end."""
    path = tmp_path / "w.pt"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    with pytest.raises(nets.CheckpointError, match="not a regular file"):
        nets.read_weights(path)
