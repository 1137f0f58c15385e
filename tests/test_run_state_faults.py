"""Faults in checkpoints and run state: hostile files, bad fields, divergence, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import error_line, read_jsonl, train_args

import iat.train.trainer
import nets
from iat.config import Config
from iat.runs.state import plan_start
from iat.runs.trackers.json_lines import forget_records_after
from iat.train.builders import build_optimizer
from main import main

TINY = {"num_blocks": [1, 1, 1, 1], "num_classes": 10, "width": 8}
# The runs compared bit for bit: PGD training, 3 steps per epoch, one thread.
PGD_RUN = ["--steps-per-epoch", "3", "--train-eval", "none", "--threads", "1"]
DENOISE = ["--arch", "ResNetDenoise", "--num-blocks", "1", "1", "1", "1", "--width", "8"]
MIB = 1 << 20


# --- .npz checkpoints: names, shapes and sizes from the headers, before any data -------------
def write_npy_member(
    archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], data_bytes: int
) -> None:
    """A member `name`.npy whose header declares float32 `shape`, followed by `data_bytes`
    zero bytes (written 1 MiB at a time: nothing large is held in memory)."""
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        header = {"descr": "<f4", "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(member, header)
        for start in range(0, data_bytes, MIB):
            member.write(bytes(min(MIB, data_bytes - start)))


def tiny_npz_with(path: Path, name: str, shape: tuple[int, ...], data_bytes: int) -> Path:
    """A complete tiny ResNet checkpoint plus one extra (or replaced) member, deflated."""
    arrays = nets.model_to_npz_dict(nets.build_model("ResNet", **TINY))
    arrays.pop(name, None)
    np.savez_compressed(path, **arrays)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        write_npy_member(archive, name, shape, data_bytes)
    return path


def peak_allocation(action) -> tuple[int, float, BaseException | None]:
    """Peak bytes traced (numpy's allocations included), seconds taken, and what was raised."""
    tracemalloc.start()
    start = time.perf_counter()
    raised = None
    try:
        action()
    except BaseException as error:  # noqa: BLE001 - returned to the test, which asserts on it
        raised = error
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, seconds, raised


def test_header_declaring_a_huge_array_is_refused_without_allocating(tmp_path):
    path = tiny_npz_with(tmp_path / "huge.npz", "linear/b", (10**12,), 40)
    model = nets.build_model("ResNet", **TINY)
    for action in (lambda: nets.read_weights(path), lambda: nets.load_weights(model, path)):
        peak, _, raised = peak_allocation(action)
        assert isinstance(raised, nets.CheckpointError), raised
        message = str(raised)
        assert "huge.npz" in message and "linear/b.npy" in message
        assert "1000000000000" in message and "40 bytes" in message  # declared vs held
        assert peak < 10 * MIB


def test_zip_bomb_under_an_extra_name_is_refused_before_decompression(tmp_path):
    bomb_bytes = 96 * MIB  # deflates to about 100 KB
    path = tiny_npz_with(tmp_path / "bomb.npz", "extra/bomb", (bomb_bytes // 4,), bomb_bytes)
    assert path.stat().st_size < 2 * MIB
    model = nets.build_model("ResNet", **TINY)

    peak, seconds, raised = peak_allocation(lambda: nets.load_weights(model, path))
    assert isinstance(raised, nets.CheckpointError), raised
    assert "bomb.npz" in str(raised) and "1 unexpected: extra/bomb" in str(raised)
    assert peak < 10 * MIB and seconds < 2

    # Reading without a model allocates nothing for the arrays either; loading then refuses.
    peak, seconds, raised = peak_allocation(lambda: nets.read_weights(path))
    assert raised is None and peak < 10 * MIB and seconds < 2
    weights = nets.read_weights(path)
    assert weights.tensors["extra/bomb"].nbytes == bomb_bytes
    with pytest.raises(nets.CheckpointError, match="1 unexpected: extra/bomb"):
        nets.load_weights(model, weights)


def test_member_larger_than_its_header_declares_is_refused(tmp_path):
    path = tiny_npz_with(tmp_path / "padded.npz", "linear/b", (10,), 64 * MIB)
    peak, _, raised = peak_allocation(lambda: nets.read_weights(path))
    assert isinstance(raised, nets.CheckpointError), raised
    assert "linear/b.npy" in str(raised) and "40 bytes" in str(raised)
    assert peak < 10 * MIB


def test_misshaped_member_is_refused_from_its_header(tmp_path):
    path = tiny_npz_with(tmp_path / "shape.npz", "linear/W", (64 * MIB // 4,), 64 * MIB)
    model = nets.build_model("ResNet", **TINY)
    peak, _, raised = peak_allocation(lambda: nets.load_weights(model, path))
    assert isinstance(raised, nets.CheckpointError), raised
    assert f"1 mis-shaped: linear/W (file {64 * MIB // 4} float32, model 256x10)" in str(raised)
    assert peak < 10 * MIB


def test_headers_then_data_load_equals_numpy(tmp_path):
    source = nets.build_model("ResNet", **TINY)
    with torch.no_grad():
        for tensor in source.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(1)))
    arrays = nets.model_to_npz_dict(source)
    arrays["linear/W"] = np.asfortranarray(arrays["linear/W"]).astype(">f4")  # stored F, big-end
    np.savez(tmp_path / "w.npz", **arrays)
    target = nets.build_model("ResNet", **TINY)
    nets.load_weights(target, tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz", allow_pickle=False) as stored:
        exported = nets.model_to_npz_dict(target)
        for name in stored.files:
            np.testing.assert_array_equal(exported[name], stored[name], err_msg=name)


# --- training checkpoints: each field checked, one line naming the file and the field ---------
def write_run_checkpoint(logdir: Path, **fields: object) -> Path:
    model = nets.build_model("ResNet", **TINY)
    state = {
        "model": model.state_dict(),
        "optimizer": build_optimizer(model, Config(data="x")).state_dict(),
        "epoch": 1,
        "step": 2,
        **fields,
    }
    logdir.mkdir(parents=True, exist_ok=True)
    torch.save(state, logdir / "checkpoint-epoch0001.pt")
    return logdir / "checkpoint-epoch0001.pt"


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("epoch", [3], "list"),
        ("step", "x", "str"),
        ("epoch", -1, "-1"),
        ("optimizer", "junk", "str"),
        ("optimizer", {"state": {}, "param_groups": "x"}, "dict"),
        ("rng", {"device": "cpu", "attack": torch.zeros(3)}, "dict"),
        ("stage", {"image_size": [112]}, "dict"),
        ("stage", {"attack": "pgd", "epsilon": float("nan")}, "dict"),
    ],
)
def test_wrong_field_type_is_one_line_naming_file_and_field(tmp_path, field, value, said):
    path = write_run_checkpoint(tmp_path / "run", **{field: value})
    with pytest.raises(nets.CheckpointError) as caught:
        plan_start(tmp_path / "run", None, 1)
    message = str(caught.value)
    assert message.startswith(f"{path}: field {field!r} must be ")
    assert message.endswith(f"not {said}") and "\n" not in message


def test_wrong_field_type_from_the_command_line(tiny_imagenet, tmp_path, capsys):
    path = write_run_checkpoint(tmp_path / "run", optimizer="junk")
    assert main([*train_args(tiny_imagenet, tmp_path / "run"), "--epochs", "2"]) == 1
    assert error_line(capsys) == (
        f"error: {path}: field 'optimizer' must be an optimizer state_dict, not str"
    )


def test_optimizer_state_of_another_model_is_one_line(tiny_imagenet, tmp_path, capsys):
    other = nets.build_model("ResNetDenoise", **TINY)
    optimizer = build_optimizer(other, Config(data="x")).state_dict()
    path = write_run_checkpoint(tmp_path / "run", optimizer=optimizer)
    args = [*train_args(tiny_imagenet, tmp_path / "run"), "--num-classes", "10", "--epochs", "2"]
    assert main(args) == 1
    assert error_line(capsys).startswith(f"error: {path}: field 'optimizer' does not fit")


def _touch_marker(path: str) -> None:
    Path(path).touch()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _touch_marker, (str(self.marker),)


def test_refused_global_is_named_and_the_unsafe_option_never_suggested(tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    torch.save({"model": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(nets.CheckpointError) as caught:
        nets.read_weights(tmp_path / "evil.pt")
    message = str(caught.value)
    assert "evil.pt" in message and f"{__name__}._touch_marker" in message
    assert "weights_only=False" not in message and "safe_globals" not in message
    assert "\n" not in message and not marker.exists()


# --- divergence: a non-finite model is never saved ---------------------------------------------
def test_non_finite_loss_mid_epoch_stops_before_saving(
    tiny_imagenet, tmp_path, capsys, monkeypatch
):
    calls = []
    real = iat.train.trainer.training_terms

    def nan_on_second_step(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # a non-finite loss whose gradient is finite: the weights stay fine
            return terms._replace(loss=terms.loss + torch.tensor(float("nan")))
        return terms

    monkeypatch.setattr(iat.train.trainer, "training_terms", nan_on_second_step)
    logdir = tmp_path / "run"
    assert main([*train_args(tiny_imagenet, logdir), *PGD_RUN, "--epochs", "2"]) == 1
    assert error_line(capsys) == "error: training diverged: a non-finite loss in epoch 1"
    assert len(calls) == 3 and not list(logdir.glob("*checkpoint*"))


def test_non_finite_weights_are_never_saved(tiny_imagenet, tmp_path, capsys, monkeypatch):
    real = iat.train.trainer.train_step
    calls = []

    def poison_after_the_last_step(model, *args):
        result = real(model, *args)
        calls.append(1)
        if len(calls) == 3:  # its loss was finite: only the weights tell
            with torch.no_grad():
                model.linear.bias[1] = float("inf")
        return result

    monkeypatch.setattr(iat.train.trainer, "train_step", poison_after_the_last_step)
    logdir = tmp_path / "run"
    assert main([*train_args(tiny_imagenet, logdir), *PGD_RUN, "--epochs", "2"]) == 1
    line = error_line(capsys)
    assert line.startswith("error: training diverged: 1 non-finite tensors (linear.bias")
    assert line.endswith("in epoch 1") and not list(logdir.glob("*checkpoint*"))


def test_diverging_learning_rate_is_one_line_and_saves_nothing(tiny_imagenet, tmp_path, capsys):
    logdir = tmp_path / "run"
    args = [*train_args(tiny_imagenet, logdir), *PGD_RUN, "--base-lr", "1e30", "--epochs", "3"]
    assert main(args) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: ") and "in epoch 1" in last
    assert not list(logdir.glob("*checkpoint*"))


# --- resume: bit for bit -----------------------------------------------------------------------
def assert_same_run_state(left: Path, right: Path) -> None:
    a = torch.load(left, weights_only=True)
    b = torch.load(right, weights_only=True)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    assert a["model"].keys() == b["model"].keys()
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(
            state["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"]
        )
    assert torch.equal(a["rng"]["attack"], b["rng"]["attack"])
    assert a.keys() == b.keys()
    for key, tensor in a.get("ema", {}).items():  # the moving average, when the run keeps one
        assert torch.equal(tensor, b["ema"][key]), f"ema {key}"


def test_resumed_pgd_run_equals_the_uninterrupted_run(tiny_imagenet, tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert main([*train_args(tiny_imagenet, whole), *PGD_RUN, "--epochs", "2"]) == 0
    assert main([*train_args(tiny_imagenet, halves), *PGD_RUN, "--epochs", "1"]) == 0
    assert main([*train_args(tiny_imagenet, halves), *PGD_RUN, "--epochs", "2"]) == 0
    assert_same_run_state(whole / "checkpoint-epoch0002.pt", halves / "checkpoint-epoch0002.pt")
    state = torch.load(halves / "checkpoint-epoch0002.pt", weights_only=True)
    assert state["architecture"] == {
        "arch": "ResNet", "depth": None, "num_blocks": [1, 1, 1, 1], "width": 8, "num_classes": 3,
        "denoise_op": None, "denoise_window": 3, "defense": None,
        "defense_apply": "predict", "frontend": None,
    }  # fmt: skip

    # The saved random state is what makes the difference: without it (a checkpoint from before
    # it was saved) the resumed epoch's attacks draw other noise and targets.
    forgetful = tmp_path / "forgetful"
    forgetful.mkdir()
    first = torch.load(halves / "checkpoint-epoch0001.pt", weights_only=True)
    del first["rng"]
    torch.save(first, forgetful / "checkpoint-epoch0001.pt")
    assert main([*train_args(tiny_imagenet, forgetful), *PGD_RUN, "--epochs", "2"]) == 0
    resumed = torch.load(forgetful / "checkpoint-epoch0002.pt", weights_only=True)["model"]
    assert not torch.equal(resumed["linear.weight"], state["model"]["linear.weight"])


def test_resumed_free_training_equals_the_uninterrupted_run(tiny_imagenet, tmp_path):
    # 3 updates per epoch, each batch replayed twice: epoch 2 starts halfway through a batch's
    # replays, which the resumed run must take up again (the same batch, and the perturbation
    # carried over from the checkpoint: Shafahi et al. Alg. 1 never resets it).
    free = [*PGD_RUN, "--free-replays", "2", "--adv-method", "pgd_8_2_1", "--keep-checkpoints", "3"]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert main([*train_args(tiny_imagenet, whole), *free, "--epochs", "3"]) == 0
    assert main([*train_args(tiny_imagenet, halves), *free, "--epochs", "1"]) == 0
    assert main([*train_args(tiny_imagenet, halves), *free, "--epochs", "3"]) == 0
    assert_same_run_state(whole / "checkpoint-epoch0003.pt", halves / "checkpoint-epoch0003.pt")
    deltas = [
        torch.load(run / "checkpoint-epoch0001.pt", weights_only=True)["free_delta"]
        for run in (whole, halves)
    ]
    assert torch.equal(deltas[0], deltas[1])
    assert deltas[0].shape == (1, 4, 3, 32, 32) and deltas[0].abs().max() == 8  # steps of eps


def train_steps_logged(logdir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(logdir / "metrics.jsonl") if r["phase"] == "train"]


def wait_for_partial_epoch(proc: subprocess.Popen, logdir: Path, steps: int) -> None:
    """Until the run has logged the first or second step of its third epoch (or a later one):
    the kill then comes several steps before the epoch's checkpoint."""
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no third epoch within 120 s"
        metrics = logdir / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        logged = [json.loads(line)["step"] for line in lines[-1:] if line.endswith("}")]
        if logged and logged[-1] > 2 * steps and 0 < logged[-1] % steps < 3:
            return
        time.sleep(0.01)


def test_records_after_the_restored_step_and_a_torn_line_are_forgotten(tmp_path):
    records = [
        {"step": 3, "phase": "train"},
        {"step": 3, "phase": "eval-clean"},
        {"result": "eval", "top1_error": 0.5},
        {"step": 4, "phase": "train"},
    ]
    lines = [json.dumps(r) + "\n" for r in records]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 5, "pha')  # killed here
    forget_records_after(tmp_path, 3)
    assert read_jsonl(tmp_path / "metrics.jsonl") == records[:3]


# The adversarial-training variants that carry state across steps: the weights' moving average,
# virtual batches (two loader batches per step), logit pairing on half-attacked batches.
VARIANTS = ["--moving-average-decay", "0.9", "--accumulate", "2", "--adv-method", "pgdll_8_2_2",
            "--lp-weight", "0.5"]  # fmt: skip


@pytest.mark.parametrize("variant", [[], VARIANTS], ids=["original", "ema-accumulate-alp"])
def test_sigkill_then_relaunch_equals_the_uninterrupted_run(tiny_imagenet, tmp_path, variant):
    steps = 6
    logdir = tmp_path / "run"
    args = [*train_args(tiny_imagenet, logdir), *PGD_RUN, "--steps-per-epoch", str(steps)]
    args += variant
    cmd = [sys.executable, str(REPO / "main.py"), *args]
    proc = subprocess.Popen(
        [*cmd, "--epochs", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_partial_epoch(proc, logdir, steps)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    last = max(int(p.name[16:20]) for p in logdir.glob("checkpoint-epoch*.pt"))
    for path in logdir.glob("checkpoint-epoch*.pt"):  # every visible checkpoint is complete
        assert torch.load(path, weights_only=True)["epoch"] == int(path.name[16:20])
    assert max(train_steps_logged(logdir)) > steps * last, "the kill must interrupt an epoch"

    relaunch = subprocess.run(
        [*cmd, "--epochs", str(last + 1)], capture_output=True, text=True, timeout=120
    )
    assert relaunch.returncode == 0, relaunch.stderr
    assert f"after epoch {last}" in relaunch.stderr
    assert not list(logdir.glob(".checkpoint-*")), "a temporary file was left behind"
    # Every step is logged exactly once, in metrics.jsonl and in TensorBoard.
    expected = list(range(1, steps * (last + 1) + 1))
    assert train_steps_logged(logdir) == expected
    events = EventAccumulator(str(logdir))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == expected

    reference = tmp_path / "reference"
    ref_args = [*train_args(tiny_imagenet, reference), *PGD_RUN, "--steps-per-epoch", str(steps)]
    assert main([*ref_args, *variant, "--epochs", str(last + 1)]) == 0
    name = f"checkpoint-epoch{last + 1:04d}.pt"
    assert_same_run_state(reference / name, logdir / name)


# --- the architecture recorded in the project's own checkpoints ------------------------------
@pytest.fixture()
def denoise_checkpoint(tiny_imagenet, tmp_path) -> Path:
    """A 1-epoch ResNetDenoise (blocks 1 1 1 1, width 8) training checkpoint, 3 classes."""
    logdir = tmp_path / "denoise"
    args = [*train_args(tiny_imagenet, logdir), *PGD_RUN, *DENOISE, "--attack-iter", "0"]
    assert main([*args, "--epochs", "1"]) == 0
    return logdir / "checkpoint-epoch0001.pt"


def eval_args(data: Path, ckpt: Path, out: Path, *flags: str) -> list[str]:
    return [
        "--eval", "--load", str(ckpt), "--data", str(data), "--image-size", "32", "--batch", "4",
        "--workers", "0", "--attack-iter", "0", "--eval-output", str(out), *flags,
    ]  # fmt: skip


def test_eval_builds_the_recorded_architecture(tiny_imagenet, denoise_checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    assert main(eval_args(tiny_imagenet, denoise_checkpoint, out)) == 0
    result = json.loads(out.read_text())
    assert (result["arch"], result["num_blocks"], result["images"]) == (
        "ResNetDenoise",
        [1, 1, 1, 1],
        7,
    )
    agreeing = eval_args(tiny_imagenet, denoise_checkpoint, out, *DENOISE)
    assert main(agreeing) == 0
    assert json.loads(out.read_text())["top1_error"] == result["top1_error"]


def test_eval_directory_builds_the_recorded_architecture(
    tiny_imagenet, denoise_checkpoint, tmp_path
):
    out = tmp_path / "predictions.txt"
    folder = tiny_imagenet / "val" / "n00000"
    args = [
        "--eval-directory", str(folder), "--load", str(denoise_checkpoint), "--image-size", "32",
        "--batch", "4", "--workers", "0", "--prediction-file", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    assert len(out.read_text().splitlines()) == len(list(folder.iterdir()))


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--arch", "ResNet"], "--arch ResNet"),
        (["--width", "16"], "--width 16"),
        (["-d", "50"], "-d 50"),
        (["--num-blocks", "2", "1", "1", "1"], "--num-blocks 2 1 1 1"),
    ],
)
def test_eval_flags_that_disagree_with_the_record_are_one_error(
    tiny_imagenet, denoise_checkpoint, tmp_path, capsys, flags, named
):
    assert main(eval_args(tiny_imagenet, denoise_checkpoint, tmp_path / "e.json", *flags)) == 1
    assert error_line(capsys) == (
        f"error: {named}: {denoise_checkpoint} was trained as ResNetDenoise (blocks 1 1 1 1, "
        "width 8, 3 classes); leave the flags out to use its architecture"
    )


def test_wrong_architecture_error_says_what_it_was_trained_as(denoise_checkpoint, tmp_path):
    model = nets.build_model("ResNet", depth=152, width=8, num_classes=3)
    with pytest.raises(nets.CheckpointError) as caught:
        nets.load_weights(model, denoise_checkpoint)
    message = str(caught.value)
    assert message.startswith(
        f"{denoise_checkpoint}: does not match the model (it was trained as ResNetDenoise "
        "(blocks 1 1 1 1, width 8, 3 classes)); "
    )
    assert "missing" in message and "unexpected" in message and len(message) < 600


def test_resuming_with_another_architecture_says_what_it_was_trained_as(
    tiny_imagenet, denoise_checkpoint, capsys
):
    args = [*train_args(tiny_imagenet, denoise_checkpoint.parent), *PGD_RUN]
    assert main([*args, "--epochs", "2"]) == 1  # train_args: --arch ResNet, not the recorded one
    line = error_line(capsys)
    assert "trained as ResNetDenoise (blocks 1 1 1 1, width 8, 3 classes)" in line
    assert len(line) < 600
