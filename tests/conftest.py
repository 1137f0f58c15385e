"""Shared fixtures: small ImageNet-layout folders written by the tests themselves."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def write_imagenet(
    root: Path, classes: int = 3, train_per_class: int = 4, val_images: int = 7, seed: int = 0
) -> Path:
    """train/n0000K/*.JPEG and val/n0000K/*.png with class-dependent colours (learnable)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", classes * train_per_class), ("val", val_images)):
        for i in range(count):
            label = i % classes
            h, w = rng.integers(36, 60, size=2)
            img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
            img[..., label % 3] += np.uint8(150)
            folder = root / split / f"n{label:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            ext = "JPEG" if split == "train" else "png"
            assert cv2.imwrite(str(folder / f"img{i:03d}.{ext}"), img)
    return root


def copy_sources(dest: Path, names: Iterable[str]) -> Path:
    """A copy of the repository's files and folders `names` in `dest` (no __pycache__)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def check_ranks_trained_alike(out_dir: Path) -> None:
    """tests/train_worker.py's rank0.pt and rank1.pt (the tiny ResNet of 3 classes) hold the same
    tensors, and training moved some weight away from the initial model."""
    import torch

    import nets

    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    initial = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=3)
    moved = 0
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), f"{name} differs between ranks"
        if name.endswith("weight") and value.shape == initial.state_dict()[name].shape:
            moved += not torch.equal(value, initial.state_dict()[name])
    assert moved > 0, "training changed no weight"


@pytest.fixture(scope="session")
def trained_digits() -> dict:
    """The digits model, trained once per session (ten modules use it): read it through
    `digits`, never directly."""
    import torch
    from digits_model import train_digits_model

    trained = train_digits_model()
    return {**trained, "rng": torch.get_rng_state()}


@pytest.fixture(scope="module")
def digits(trained_digits: dict) -> dict:
    """A small conv net with BatchNorm trained on 1500 digits; 297 held out (left in train mode).
    Each module gets its own copy, and torch's global generator as the training left it, as when
    each module trained its own: a test may change the model's modes or draw numbers."""
    import torch

    torch.set_rng_state(trained_digits["rng"])
    return {key: copy.deepcopy(trained_digits[key]) for key in ("model", "x", "y")}


@pytest.fixture()
def tiny_imagenet(tmp_path: Path) -> Path:
    return write_imagenet(tmp_path / "imagenet")


def train_tiny(data: Path, logdir: Path, epochs: int, *flags: str) -> dict:
    """A 2-steps-per-epoch run of a tiny ResNet on 32x32 crops, one thread, no evaluation;
    returns its last checkpoint."""
    import torch

    from main import main

    tiny = [
        "--data", str(data), "--logdir", str(logdir), "--arch", "ResNet", "--num-blocks", "1",
        "1", "1", "1", "--width", "8", "--image-size", "32", "--batch", "4", "--workers", "0",
        "--loader", "local", "--steps-per-epoch", "2", "--train-eval", "none", "--threads", "1",
    ]  # fmt: skip
    assert main([*tiny, *flags, "--epochs", str(epochs)]) == 0
    return torch.load(logdir / f"checkpoint-epoch{epochs:04d}.pt", weights_only=True)


def assert_resumes_bit_for_bit(data: Path, tmp_path: Path, *flags: str) -> dict:
    """Two epochs in one go, and one epoch then a relaunch to two: the same weights and
    optimizer state. Returns the uninterrupted run's checkpoint."""
    import torch

    whole = train_tiny(data, tmp_path / "whole", 2, *flags)
    train_tiny(data, tmp_path / "halves", 1, *flags)
    resumed = train_tiny(data, tmp_path / "halves", 2, *flags)
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for index, state in whole["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, resumed["optimizer"]["state"][index][name]), name
    return whole
