"""The attack-failure checks (iat.eval.masking): they warn on a model built to mislead gradient
attacks, and stay quiet on one that does not."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from digits_model import NUM_CLASSES
from test_eval_outputs import COMMON
from torch import nn

import nets
from iat.builders import build_attacker
from iat.config import Config, eval_attack
from iat.eval.evaluate import attack_images
from iat.eval.masking import MaskingProbe, run_checks
from main import main


class ZeroGradient(nn.Module):
    """`inner` behind a rounding of its input to whole pixel values: the same predictions,
    and a zero input gradient everywhere (a quantising layer attacked without BPDA)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x))


def _in_memory_attack(model: nn.Module):
    """run_checks' `attack` on tensors: which images stay correctly classified."""

    def attack(attacker, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        adv, _ = attack_images(model, attacker, images, labels, torch.Generator())
        with torch.no_grad():
            return model(adv).argmax(dim=1) == labels

    return attack


def _probed(model: nn.Module, cfg: Config, x: torch.Tensor, y: torch.Tensor) -> MaskingProbe:
    """The evaluation's attack on x (in batches of 20), watched by a probe of its first
    cfg.masking_checks images."""
    inner = build_attacker(
        cfg, attack_iter=cfg.attack_iter, num_classes=NUM_CLASSES, name=eval_attack(cfg)
    )
    probe = MaskingProbe(inner, limit=cfg.masking_checks)
    stats = probe.stats_template(torch.device("cpu"))
    for i in range(0, len(x), 20):
        attack_images(model, probe, x[i : i + 20], y[i : i + 20], torch.Generator())
        for key, value in probe.batch_stats().items():
            stats[key] += value
    probe.describe_stats(stats, len(x))
    return probe


def _checks(model: nn.Module, digits: dict) -> dict:
    cfg = Config(
        mode="eval", data="-", load="-", attack="strong", attack_iter=10, attack_epsilon=32.0,
        apgd_targets=3, num_classes=NUM_CLASSES, masking_checks=60,
    )  # fmt: skip
    model.eval()
    # The evaluation: its first 80 images (the probe watches 60 of them).
    probe = _probed(model, cfg, digits["x"][:80], digits["y"][:80])
    checks = run_checks(cfg, probe, _in_memory_attack(model))
    return {c.name: c for c in checks}


def test_a_zero_gradient_layer_is_flagged(digits):
    checks = _checks(ZeroGradient(digits["model"]), digits)
    flat, unbounded = checks["flat loss"], checks["unbounded epsilon"]
    print(f"zero gradient: flat share {flat.value:.3f}, unbounded accuracy {unbounded.value:.3f}")
    assert flat.warn and flat.value > 0.9, flat
    assert unbounded.warn and unbounded.value > 0.5, unbounded
    assert "zero input gradient" in flat.message and "BPDA" in flat.message
    free = checks["gradient-free"]  # Square needs no gradient: it breaks what strong could not
    print(f"zero gradient: Square broke {free.value:.0f} images strong left correct")
    assert free.warn and free.value >= 10, free


def test_a_plain_model_passes_the_checks(digits):
    checks = _checks(digits["model"], digits)
    flat, unbounded = checks["flat loss"], checks["unbounded epsilon"]
    print(f"plain: flat share {flat.value:.3f}, unbounded accuracy {unbounded.value:.3f}")
    assert not flat.warn and flat.value < 0.05, flat
    assert not unbounded.warn and unbounded.value == 0.0, unbounded
    assert checks["more iterations"].value <= 0.05  # strong-10 vs strong-20


def test_the_probe_counts_and_keeps_the_inner_attack_images(digits):
    model = digits["model"].eval()
    x, y = digits["x"][:40], digits["y"][:40]
    cfg = Config(
        mode="eval",
        data="-",
        load="-",
        attack="pgd",
        attack_iter=3,
        attack_epsilon=16.0,
        num_classes=10,
    )
    inner = build_attacker(dataclasses.replace(cfg, attack_target="none"), attack_iter=3,
                           num_classes=10, name="pgd")  # fmt: skip
    probe = MaskingProbe(inner, limit=30)
    adv, targets = probe.attack(model, x, y, generator=torch.Generator().manual_seed(0))
    expected, _ = inner.attack(model, x, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(adv, expected) and (targets == -1).all()
    correct, flat, zero, robust, probed = probe.batch_stats()["probe"].tolist()
    with torch.no_grad():  # only the first 30 images (the limit) are probed
        assert correct == (model(x[:30]).argmax(1) == y[:30]).sum().item()
        assert robust == (model(adv[:30]).argmax(1) == y[:30]).sum().item()
    assert zero == 0 and probed == 30 and flat <= correct
    images, labels, kept_correct, kept_robust = probe.kept_images()
    assert torch.equal(images, x[:30]) and torch.equal(labels, y[:30])
    assert kept_robust.sum() == robust and kept_correct.sum() == correct
    probe.attack(model, x, y)  # past the limit: nothing more is probed
    assert probe.batch_stats()["probe"].sum() == 0 and len(probe.kept_images()[0]) == 30


def test_eval_prints_its_result_then_the_checks_and_records_them(
    tiny_imagenet: Path, tmp_path: Path, capsys
):
    torch.manual_seed(0)
    ckpt = tmp_path / "w.pt"
    nets.save_weights(nets.build_model("ResNet", num_blocks=[1] * 4, width=8, num_classes=3), ckpt)
    out = tmp_path / "r.json"
    args = ["--eval", "--load", str(ckpt), "--data", str(tiny_imagenet), *COMMON,
            "--attack", "strong", "--attack-iter", "2", "--apgd-targets", "1",
            "--masking-checks", "5", "--eval-output", str(out)]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    captured = capsys.readouterr()
    printed = captured.out
    # The result first (its expected time before it, on stderr with the progress bar), then the
    # checks, never the same attack again: one progress line per evaluation, none for a check.
    assert "first batch of" in captured.err and "about" in captured.err
    summary = printed.index("strong (worst case")
    assert summary < printed.index("attack-failure checks on 5 of the images")
    record = json.loads(out.read_text())
    names = [c["name"] for c in record["masking_checks"]]
    assert names == ["flat loss", "gradient-free", "unbounded epsilon", "more iterations"]
    for check in record["masking_checks"]:
        assert set(check) == {"name", "value", "threshold", "warn", "message"}
        assert (f"warning: possible attack failure ({check['name']})" in printed) == check["warn"]
    assert main([*args, "--masking-checks", "0"]) == 0
    assert "masking_checks" not in json.loads(out.read_text())
