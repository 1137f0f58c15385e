"""Adversarial training and the strong evaluation run unchanged on tiny ConvNeXt and ViT: a
short PGD training from the command line, then --eval --attack strong of its checkpoint without
architecture flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_imagenet

from main import main

MODELS = {
    "convnext_tiny": ["--num-blocks", "1", "1", "1", "1", "--width", "4"],
    "vit_small_patch16_224": [
        "--num-blocks",
        "1",
        "--width",
        "4",
        "--drop-path",
        "0.1",
        "--grad-checkpointing",
    ],  # fmt: skip
}
COMMON = ["--image-size", "32", "--batch", "4", "--workers", "0", "--threads", "1"]


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_adversarial_training_then_strong_evaluation(arch: str, tmp_path: Path) -> None:
    data = write_imagenet(tmp_path / "data", classes=4)
    run = tmp_path / "run"
    train = [
        "--data", str(data), "--logdir", str(run), "--arch", arch, *MODELS[arch], *COMMON,
        "--loader", "local", "--attack-iter", "2", "--attack-epsilon", "8",
        "--steps-per-epoch", "2", "--epochs", "1", "--train-eval", "none",
    ]  # fmt: skip
    assert main(train) == 0
    out = tmp_path / "eval.json"
    evaluate = [
        "--eval", "--load", str(run / "checkpoint-epoch0001.pt"), "--data", str(data), *COMMON,
        "--attack", "strong", "--attack-iter", "2", "--attack-epsilon", "8",
        "--masking-checks", "0", "--eval-output", str(out),
    ]  # fmt: skip
    assert main(evaluate) == 0
    record = json.loads(out.read_text())
    assert record["images"] == 7
    assert 0.0 <= record["top1_error"] <= 1.0


def test_a_run_with_stochastic_depth_resumes_bit_for_bit(tmp_path: Path) -> None:
    data = write_imagenet(tmp_path / "data", classes=4)

    def train(run: Path, epochs: int) -> None:
        args = [
            "--data", str(data), "--logdir", str(run), "--arch", "vit_small_patch16_224",
            "--num-blocks", "2", "--width", "4", "--drop-path", "0.5", *COMMON,
            "--loader", "local", "--attack-iter", "1", "--attack-epsilon", "4",
            "--steps-per-epoch", "2", "--epochs", str(epochs), "--train-eval", "none",
        ]  # fmt: skip
        assert main(args) == 0

    train(tmp_path / "straight", 2)
    train(tmp_path / "resumed", 1)
    train(tmp_path / "resumed", 2)
    straight, resumed = (
        torch.load(tmp_path / run / "checkpoint-epoch0002.pt", weights_only=True)["model"]
        for run in ("straight", "resumed")
    )
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
