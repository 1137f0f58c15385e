"""Data set layouts beyond ImageNet's: Tiny ImageNet, generic class folders, small images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO

from iat.data.augment import TRAIN_AUGMENTATIONS, pad_crop_flip
from iat.data.layouts import DataError, create_reader, detect_layout
from main import main

WNIDS = ["n02", "n00", "n01"]  # the release's order, not sorted: labels follow it


def write_tiny_imagenet(root: Path, per_class: int = 4, val: int = 6) -> Path:
    """Tiny ImageNet's release layout with class-dependent colours, 64x64 JPEGs."""
    rng = np.random.default_rng(0)
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")

    def image(label: int) -> np.ndarray:
        img = rng.integers(0, 60, (64, 64, 3)).astype(np.uint8)
        img[..., label] += np.uint8(150)
        return img

    for label, wnid in enumerate(WNIDS):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(per_class):
            assert cv2.imwrite(str(folder / f"{wnid}_{i}.JPEG"), image(label))
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i in range(val):
        label = i % len(WNIDS)
        assert cv2.imwrite(str(root / "val" / "images" / f"val_{i}.JPEG"), image(label))
        lines.append(f"val_{i}.JPEG\t{WNIDS[label]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return write_tiny_imagenet(tmp_path / "tiny-imagenet-200")


def test_tiny_imagenet_is_detected_and_labelled_by_wnids_order(tiny: Path) -> None:
    assert detect_layout(tiny) == "tiny-imagenet"
    reader = create_reader(tiny)
    assert reader.classes() == WNIDS
    train = reader.samples("train")
    assert len(train) == 12
    for path, label in train:  # the folder names the class; wnids.txt gives its index
        assert Path(path).parent.name == "images"
        assert WNIDS.index(Path(path).parent.parent.name) == label
    val = reader.samples("val")
    assert val == sorted((str(tiny / "val" / "images" / f"val_{i}.JPEG"), i % 3) for i in range(6))


def test_tiny_imagenet_bad_annotation_names_the_line(tiny: Path) -> None:
    (tiny / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_annotations.txt:1: expected"):
        create_reader(tiny).samples("val")


def test_generic_class_folders_use_the_imagenet_reader(tmp_path: Path) -> None:
    for split, names in (("train", ["cat", "airplane"]), ("val", ["cat"])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            assert cv2.imwrite(str(tmp_path / split / name / "0.png"), np.zeros((32, 32, 3)))
    assert detect_layout(tmp_path) == "imagenet"
    reader = create_reader(tmp_path)
    assert reader.classes() == ["airplane", "cat"]
    assert reader.samples("val") == [(str(tmp_path / "val" / "cat" / "0.png"), 1)]


def test_pad_crop_flip_is_a_window_of_the_padded_image() -> None:
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert TRAIN_AUGMENTATIONS["pad-crop-flip"] is pad_crop_flip
    flips = 0
    for seed in range(20):
        out = pad_crop_flip(img, np.random.default_rng(seed), 32)
        # Independently: the same draws, then the window of the zero-padded image.
        rng = np.random.default_rng(seed)
        y0, x0 = rng.integers(0, 9, size=2)
        window = np.pad(img, ((4, 4), (4, 4), (0, 0)))[y0 : y0 + 32, x0 : x0 + 32]
        flipped = rng.random() < 0.5
        flips += flipped
        assert np.array_equal(out, window[:, ::-1] if flipped else window)
    assert 0 < flips < 20
    resized = pad_crop_flip(img[:20, :24], np.random.default_rng(0), 32)
    assert resized.shape == (32, 32, 3) and resized.dtype == np.uint8


def test_train_and_evaluate_on_tiny_imagenet(tiny: Path, tmp_path: Path) -> None:
    logdir = tmp_path / "run"
    common = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8",
              "--image-size", "64", "--batch", "4", "--workers", "0"]  # fmt: skip
    args = ["--data", str(tiny), "--logdir", str(logdir), *common, "--loader", "local",
            "--train-augment", "pad-crop-flip", "--attack-iter", "1", "--steps-per-epoch", "2",
            "--epochs", "1", "--train-eval", "light"]  # fmt: skip
    assert main(args) == 0
    evals = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["images"] for r in evals if r.get("phase") == "eval-clean"] == [6]
    config = json.loads((logdir / "config.json").read_text())["config"]
    assert config["data_layout"] == "auto" and config["num_classes"] is None
    out = tmp_path / "eval.json"
    ckpt = logdir / "checkpoint-epoch0001.pt"
    assert main(["--eval", "--load", str(ckpt), "--data", str(tiny), *common,
                 "--attack-iter", "0", "--eval-output", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["images"] == 6


def test_the_data_server_serves_tiny_imagenet(tiny: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "third_party" / "serve-data.py"), "--data", str(tiny),
         "--batch", "4", "--image-size", "64", "--workers", "1", "--benchmark",
         "--max-batches", "3", "--train-augment", "pad-crop-flip", "--log-every", "100"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "serve-data: 3 batches" in run.stderr and "corrupt" not in run.stderr
