"""Mixed-precision training (--amp): the precision chosen per device, bf16 tracking fp32, fp32
weights and optimizer state, fp16's loss scaler (CPU autocast runs fp16, emulated) and a resumed
--amp run equal to the uninterrupted one, scaler state included."""

from __future__ import annotations

import json

import pytest
import torch
from test_run_state_faults import PGD_RUN, assert_same_run_state
from test_train import train_args

import nets
from iat.attacks.core import NoOpAttacker
from iat.config import Config
from iat.train.amp import FP32, TrainingPrecision, build_scaler
from iat.train.builders import training_precision
from iat.train.trainer import LossSettings, train_step
from main import main

CPU = torch.device("cpu")
BF16 = TrainingPrecision(torch.bfloat16, "bf16")
FP16 = TrainingPrecision(torch.float16, "fp16")


def with_units(monkeypatch, *units: str) -> None:
    """This process's CPU reports only `units` (e.g. "avx512_bf16")."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict.fromkeys(units, True))


# --- what --amp gives on each device ---------------------------------------------------------
def test_amp_precision_per_cpu_kind(monkeypatch):
    assert training_precision(False, None, CPU) is FP32
    with_units(monkeypatch, "avx512_bf16")
    assert training_precision(True, None, CPU).dtype == torch.bfloat16
    assert not training_precision(True, "bfloat16", CPU).scaled
    with pytest.raises(ValueError, match="^--amp-dtype float16: cpu has no fp16 units"):
        training_precision(True, "float16", CPU)
    with_units(monkeypatch)  # AVX2 only: bf16 emulated, the step stays fp32 and says why
    fallback = training_precision(True, None, CPU)
    assert fallback.dtype is None and "no bf16 units" in fallback.description
    with_units(monkeypatch, "avx512_fp16", "avx512_bf16")
    assert training_precision(True, "float16", CPU).scaled


def test_amp_dtype_needs_amp():
    with pytest.raises(ValueError, match="^--amp-dtype float16: needs --amp$"):
        Config(fake=True, amp_dtype="float16")
    with pytest.raises(ValueError, match="^--amp-dtype: .half. is not one of"):
        Config(fake=True, amp=True, amp_dtype="half")


# --- training under autocast -----------------------------------------------------------------
TINY_MODELS = {  # architecture, blocks, image side, steps (bf16 is emulated on AVX2 CPUs: slow)
    "resnet": ("ResNet", (1, 1, 1, 1), 16, 60),
    "vit": ("vit_small_patch16_224", (2,), 32, 120),
}


def colour_batches(steps: int, side: int = 32, batch: int = 16, classes: int = 4):
    """Learnable batches: each class a colour, with pixel noise; BGR pixels in [0, 255]."""
    g = torch.Generator().manual_seed(1)
    colours = torch.rand(classes, 3, 1, 1, generator=g) * 255
    for _ in range(steps):
        labels = torch.randint(classes, (batch,), generator=g)
        noise = torch.randn(batch, 3, side, side, generator=g) * 40
        yield (colours[labels] + noise).clamp(0, 255), labels


def train_tiny(name: str, precision: TrainingPrecision):
    """Clean training of a tiny model: the per-step losses, the model and the optimizer."""
    torch.manual_seed(0)
    arch, blocks, side, steps = TINY_MODELS[name]
    model = nets.build_model(arch, num_blocks=blocks, width=8, num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    scaler = build_scaler(precision, CPU) if precision.scaled else None
    losses = []
    for batch in colour_batches(steps, side):
        result = train_step(
            model, model, NoOpAttacker(), optimizer, [batch], LossSettings(0.1), precision, scaler
        )
        losses.append(result.loss.item())
    return torch.tensor(losses), model, optimizer


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_bf16_amp_tracks_fp32_with_fp32_weights(name):
    torch.set_num_threads(1)
    reference, _, _ = train_tiny(name, FP32)
    losses, model, optimizer = train_tiny(name, BF16)
    assert torch.isfinite(losses).all()
    final, final_fp32 = losses[-20:].mean().item(), reference[-20:].mean().item()
    assert final < 0.6 * losses[:5].mean().item()  # it learned
    assert abs(final - final_fp32) < 0.1 + 0.1 * final_fp32, (final, final_fp32)
    assert not torch.equal(losses, reference)  # bf16 did compute something
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype in (torch.float32, torch.int64) for b in model.buffers())
    for state in optimizer.state.values():
        assert state["momentum_buffer"].dtype == torch.float32


def test_fp16_scaler_skips_overflowing_steps_and_unscales():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nets.build_model("ResNet", num_blocks=(1, 1, 1, 1), width=8, num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16's gradients overflow
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    batches = colour_batches(30)
    loss = LossSettings(0.1, clip_grad=1.0)
    train_step(model, model, NoOpAttacker(), optimizer, [next(batches)], loss, FP16, scaler)
    assert scaler.get_scale() == 2.0**39  # backed off, and the step skipped
    after = dict(model.named_parameters())
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    for batch in batches:
        result = train_step(model, model, NoOpAttacker(), optimizer, [batch], loss, FP16, scaler)
        assert torch.isfinite(result.loss)
    assert scaler.get_scale() < 2.0**24  # it found a scale whose gradients are finite
    assert not torch.equal(before["linear.weight"], model.linear.weight)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# --- a run under --amp -----------------------------------------------------------------------
def test_resumed_fp16_amp_run_equals_the_uninterrupted_run(
    tiny_imagenet, tmp_path, monkeypatch, capsys
):
    with_units(monkeypatch, "avx512_fp16", "avx512_bf16")  # CPU fp16 autocast allowed
    amp = [*PGD_RUN, "--amp", "--amp-dtype", "float16", "--moving-average-decay", "0.9"]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert main([*train_args(tiny_imagenet, whole), *amp, "--epochs", "2"]) == 0
    assert "training step: fp16 autocast, loss scaled" in capsys.readouterr().err
    assert main([*train_args(tiny_imagenet, halves), *amp, "--epochs", "1"]) == 0
    assert main([*train_args(tiny_imagenet, halves), *amp, "--epochs", "2"]) == 0
    assert_same_run_state(whole / "checkpoint-epoch0002.pt", halves / "checkpoint-epoch0002.pt")
    states = [
        torch.load(run / "checkpoint-epoch0002.pt", weights_only=True) for run in (whole, halves)
    ]
    assert states[0]["grad_scaler"] == states[1]["grad_scaler"]
    assert (
        states[0]["grad_scaler"]["_growth_tracker"] > 0
        or states[0]["grad_scaler"]["scale"] != 2.0**16
    )  # the state moved: a fresh scaler on resume would differ
    assert all(
        t.dtype == torch.float32 for t in states[0]["model"].values() if t.is_floating_point()
    )
    record = json.loads((halves / "config.json").read_text())
    assert record["config"]["amp"] and record["config"]["amp_dtype"] == "float16"
    assert record["run"]["training_precision"].startswith("fp16 autocast")


def test_amp_on_a_cpu_without_bf16_units_trains_fp32_and_says_so(
    tiny_imagenet, tmp_path, monkeypatch, capsys
):
    with_units(monkeypatch)
    assert (
        main([*train_args(tiny_imagenet, tmp_path / "run"), *PGD_RUN, "--amp", "--epochs", "1"])
        == 0
    )
    assert "training step: fp32: this CPU has no bf16 units" in capsys.readouterr().err
    state = torch.load(tmp_path / "run" / "checkpoint-epoch0001.pt", weights_only=True)
    assert "grad_scaler" not in state
