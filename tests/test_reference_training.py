"""Adversarial training and the strong evaluation run unchanged on tiny ConvNeXt and ViT: a
short PGD training from the command line, then --eval --attack strong of its checkpoint without
architecture flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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
