"""Sharded training (--fsdp, iat.train.fsdp) on the CPU with Gloo: 2 processes train as DDP with
half the memory, the attack's gathers, sharded checkpoints (kill, resume, 1 process, export)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from test_multiprocess import _descendants, free_port, launch, torchrun

import nets
from iat.config import Config, validate
from iat.runs.sharded import read_state

VIT = ["--arch", "vit_small_patch16_224", "--num-blocks", "2", "--width", "8"]
RESNET = ["--arch", "ResNetDenoise", "--num-blocks", "1", "1", "1", "1", "--width", "8"]


def flags(data: Path, logdir: Path, epochs: int = 1) -> list[str]:
    return [
        "--data", str(data), "--logdir", str(logdir), "--image-size", "32", "--batch", "2",
        "--workers", "0", "--loader", "local", "--attack-iter", "2", "--attack-epsilon", "8",
        "--steps-per-epoch", "3", "--epochs", str(epochs), "--train-eval", "none",
        "--base-lr", "2",
    ]  # fmt: skip


def trained(out: Path, *args: str) -> tuple[dict, list[int]]:
    """Rank 0's whole trained model (train_worker.py) and each rank's state bytes."""
    out.mkdir()
    launch(torchrun(2), "tests/train_worker.py", [str(out), *args])
    sizes = [json.loads((out / f"rank{r}.json").read_text())["state_bytes"] for r in (0, 1)]
    return torch.load(out / "rank0.pt", weights_only=True), sizes


@pytest.mark.parametrize(
    ("arch", "extra"),
    [(VIT, ["--clip-grad", "0.5"]), (RESNET, ["--fsdp-attack-gather", "per-layer"])],
    ids=["vit-once-clipped", "resnet-denoise-per-layer"],
)
def test_two_sharded_processes_train_as_ddp_on_half_the_memory(
    arch, extra, tiny_imagenet, tmp_path
):
    """A tiny ViT and a ResNet with denoising blocks (BatchNorm statistics broadcast as DDP's)
    trained 3 PGD steps under --fsdp end where DDP ends; each process held about half of DDP's
    parameter and optimizer bytes."""
    ddp_extra = [e for e in extra if e not in ("--fsdp-attack-gather", "per-layer")]
    ddp, ddp_bytes = trained(tmp_path / "ddp", *flags(tiny_imagenet, tmp_path / "d"), *arch,
                             *ddp_extra)  # fmt: skip
    shard, shard_bytes = trained(tmp_path / "fsdp", *flags(tiny_imagenet, tmp_path / "f"), *arch,
                                 *extra, "--fsdp")  # fmt: skip
    torch.manual_seed(0)  # the runs' initial weights (--seed 0)
    blocks = [int(n) for n in arch[3 : arch.index("--width")]]
    start = nets.build_model(arch[1], num_blocks=blocks, width=8, num_classes=3).state_dict()
    assert ddp.keys() == shard.keys() == start.keys()
    moved = max((ddp[k].float() - v.float()).abs().max().item() for k, v in start.items())
    assert moved > 1e-3  # training moved the weights far beyond the tolerance
    for key, value in ddp.items():
        torch.testing.assert_close(shard[key], value, rtol=1e-5, atol=1e-6, msg=key)
    checkpoint = tmp_path / "f" / "checkpoint-epoch0001.dcp"
    assert read_state(checkpoint)["world_size"] == 2
    assert len(list(checkpoint.glob("shard-*.safetensors"))) == 2
    assert ddp_bytes[0] == ddp_bytes[1]
    assert sum(shard_bytes) == pytest.approx(ddp_bytes[0], rel=0.02)  # the shards make one copy
    assert max(shard_bytes) < 0.6 * ddp_bytes[0]


@pytest.mark.parametrize("arch", ["vit_small_patch16_224", "ResNetDenoise"])
def test_the_attack_gathers_each_unit_once_per_step_and_reduces_nothing(arch, tmp_path):
    """PGD-3 in the loop: `once` all-gathers each of the U units once for the attack and the
    training forward, and the U - 1 freed ones again for the backward pass (2U - 1 per step);
    `per-layer` 2U - 1 per attack iteration and per training pass, (k + 1)(2U - 1). The attack's
    input gradients reduce-scatter nothing and leave no parameter gradient; both modes train to
    the same losses."""
    iters = 3
    launch(torchrun(2), "tests/fsdp_worker.py", [str(tmp_path), arch, str(iters)])
    for rank in (0, 1):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        units = found["once"][0]["units"]
        assert units == len(nets.shard_units(nets.build_model(arch, num_blocks=[2] if "vit" in
                                             arch else [1, 1, 1, 1], width=8))) + 1  # fmt: skip
        for once, per_layer in zip(found["once"], found["per-layer"], strict=True):
            assert once["attack"] == [units, 0]
            assert once["step"] == [2 * units - 1, units]
            assert per_layer["attack"] == [iters * (2 * units - 1), 0]
            assert per_layer["step"] == [(iters + 1) * (2 * units - 1), units]
            assert not once["grads_left"] and not per_layer["grads_left"]
            assert once["loss"] == pytest.approx(per_layer["loss"], rel=1e-6)


def _shards(checkpoint: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(checkpoint.glob("shard-*.safetensors")):
        tensors.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    return tensors


def _kill_after(cmd: list[str], marker: Path, timeout: float = 240) -> None:
    """Run `cmd` (torchrun) and SIGKILL it and its ranks as soon as `marker` exists."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert marker.exists() and proc.poll() is None, "killed too late"
    for pid in [proc.pid, *_descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_killed_sharded_run_resumes_bit_for_bit_on_two_and_on_one_process(tiny_imagenet, tmp_path):
    """A 2-process --fsdp run SIGKILLed in epoch 2 and relaunched ends with the uninterrupted
    run's weights and every shard (optimizer included) bit for bit; its epoch-1 checkpoint
    resumes on 1 process with the same weights; the exported single file holds the gathered
    model exactly and evaluates with the counts of the sharded model's in-training evaluation."""
    light = ["--train-eval", "light"]
    whole = tmp_path / "whole"
    model, _ = trained(tmp_path / "a", *flags(tiny_imagenet, whole, 2), *VIT, "--fsdp", *light)
    killed = tmp_path / "killed"
    cmd = [*torchrun(2), "main.py", *flags(tiny_imagenet, killed, 2), *VIT, "--fsdp", *light]
    _kill_after(cmd, killed / "checkpoint-epoch0001.dcp")
    assert not (killed / "checkpoint-epoch0002.dcp").exists()
    copy = tmp_path / "copy"
    shutil.copytree(killed, copy, symlinks=True)
    resumed, _ = trained(tmp_path / "b", *flags(tiny_imagenet, killed, 2), *VIT, "--fsdp", *light)
    for key, value in model.items():
        assert torch.equal(resumed[key], value), key
    ours, theirs = (_shards(run / "checkpoint-epoch0002.dcp") for run in (whole, killed))
    assert ours.keys() == theirs.keys() and any(".momentum_buffer" in k for k in ours)
    for key, value in ours.items():
        assert torch.equal(theirs[key], value), key

    exported = tmp_path / "epoch1.safetensors"
    run = subprocess.run([sys.executable, "-m", "iat.export_sharded",
                          str(whole / "checkpoint-epoch0001.dcp"), str(exported)],
                         cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    one = tmp_path / "one"
    one.mkdir()
    single = launch([sys.executable], "tests/train_worker.py",
                    [str(one), *flags(tiny_imagenet, copy, 1), *VIT, "--fsdp"])  # fmt: skip
    assert "already complete (1 of 1 epochs)" in single.stderr
    weights = nets.read_weights(exported).tensors
    loaded = torch.load(one / "rank0.pt", weights_only=True)
    for key, value in loaded.items():
        assert torch.equal(weights[key], value), key
    launch([sys.executable], "main.py", [*flags(tiny_imagenet, copy, 2), *VIT, "--fsdp"])
    assert (copy / "checkpoint-epoch0002.dcp").is_dir()

    final = tmp_path / "final.pt"
    run = subprocess.run([sys.executable, "-m", "iat.export_sharded",
                          str(whole / "checkpoint-epoch0002.dcp"), str(final)],
                         cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    for key, value in nets.read_weights(final).tensors.items():
        assert torch.equal(model[key], value), key
    logged = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    pgd = [r for r in logged if r.get("phase") == "eval-10step" and r.get("epoch") == 2][-1]
    out = tmp_path / "eval.json"
    launch([sys.executable], "main.py", ["--eval", "--load", str(final), "--data",
           str(tiny_imagenet), "--image-size", "32", "--batch", "2", "--workers", "0",
           "--attack-iter", "10", "--attack-epsilon", "8", "--eval-output", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["top1_error"] == pgd["eval-10step/top1_error"]


def test_a_pickled_metadata_file_in_a_sharded_checkpoint_is_refused(tiny_imagenet, tmp_path):
    """DCP's own reader would unpickle a `.metadata` file: one planted in a sharded checkpoint
    (here with a payload that would create a file) stops the resume with one line, unread."""
    logdir = tmp_path / "run"
    launch([sys.executable], "main.py", [*flags(tiny_imagenet, logdir), *VIT, "--fsdp"])
    checkpoint = logdir / "checkpoint-epoch0001.dcp"
    planted = tmp_path / "unpickled"
    payload = pickle.dumps(_Planted(str(planted)))
    (checkpoint / ".metadata").write_bytes(payload)
    run = launch([sys.executable], "main.py", [*flags(tiny_imagenet, logdir, 2), *VIT, "--fsdp"],
                 ok=False)  # fmt: skip
    lines = run.stderr.strip().splitlines()
    assert lines[-1] == (
        f"error: {checkpoint}: unexpected '.metadata' in a sharded checkpoint (only state.json "
        "and shard-*.safetensors are read; nothing is unpickled)"
    )
    assert not planted.exists()


class _Planted:
    """Unpickling it creates a file (what a hostile .metadata could do)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize(
    ("settings", "line"),
    [
        ({"sync_bn": True}, "--fsdp: not with --sync-bn"),
        ({"free_replays": 2}, "--fsdp: not with --free-replays"),
        ({"overfit_guard": 0.2}, "--fsdp: not with --overfit-guard"),
        ({"amp": True, "amp_dtype": "float16"}, "--fsdp: not with --amp-dtype float16"),
    ],
)
def test_combinations_a_sharded_model_cannot_take_are_refused(settings, line):
    with pytest.raises(ValueError, match=f"^{line}"):
        validate(Config(fsdp="full", **settings))
    with pytest.raises(ValueError, match="^--fsdp-attack-gather: needs --fsdp"):
        validate(Config(fsdp_attack_gather="per-layer"))


@pytest.mark.parametrize("arch", nets.available_architectures())
def test_every_architecture_names_disjoint_shard_units(arch):
    """Each family's units (nets.shard_units) hold disjoint parameters, most of the model's."""
    blocks = [2] * nets.num_groups_of(arch)
    with torch.device("meta"):
        model = nets.build_model(arch, num_blocks=blocks, width=8, num_classes=10)
    units = nets.shard_units(model)
    owned = [id(p) for unit in units for p in unit.parameters()]
    assert len(owned) == len(set(owned)) and len(units) >= blocks[0]
    inside = sum(p.numel() for unit in units for p in unit.parameters())
    assert inside > 0.5 * sum(p.numel() for p in model.parameters())
