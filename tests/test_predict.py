"""--eval-directory: black-box prediction files in the original's `filename,label` format."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import nets
from main import main

ARCH = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8"]
SIZE = 32


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=10)
    # Perturb the zero-initialised gammas so that predictions depend on the image.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    path = tmp_path / "model.npz"
    nets.save_npz(model, path)
    return path


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    colour = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    assert cv2.imwrite(str(folder / "b_colour.png"), colour)
    assert cv2.imwrite(
        str(folder / "a_photo.jpg"), rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    )
    assert cv2.imwrite(str(folder / "c_grey.png"), rng.integers(0, 256, (29, 31), dtype=np.uint8))
    rgba = rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)
    assert cv2.imwrite(str(folder / "d_alpha.png"), rgba)
    assert cv2.imwrite(str(folder / "e_bitmap.bmp"), colour[:21, :17])
    return folder


def expected_labels(folder: Path, checkpoint: Path) -> dict[str, int]:
    """Independent computation: OpenCV reads BGR, naive cubic resize, one model call."""
    model = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=10).eval()
    nets.load_weights(model, checkpoint)
    names = sorted(p.name for p in folder.iterdir())
    images = [
        cv2.resize(
            cv2.imread(str(folder / n), cv2.IMREAD_COLOR),
            (SIZE, SIZE),
            interpolation=cv2.INTER_CUBIC,
        )
        for n in names
    ]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        return dict(zip(names, model(x).argmax(1).tolist(), strict=True))


def predict_args(folder: Path, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [
        "--eval-directory", str(folder), "--prediction-file", str(out), "--load", str(checkpoint),
        *ARCH, "--image-size", str(SIZE), "--batch", "2", "--workers", "0",
        *extra,
    ]  # fmt: skip


def test_one_line_per_image_in_name_order(image_dir, checkpoint, tmp_path):
    out = tmp_path / "predictions.txt"
    assert main(predict_args(image_dir, out, checkpoint)) == 0
    lines = out.read_text().splitlines()
    expected = expected_labels(image_dir, checkpoint)
    assert [line.split(",")[0] for line in lines] == sorted(expected)
    assert {name: int(label) for name, label in (line.split(",") for line in lines)} == expected
    assert len(set(expected.values())) > 1, "a constant model would not test anything"


def test_unreadable_files_fail_and_write_nothing(image_dir, checkpoint, tmp_path, capsys):
    (image_dir / "notes.txt").write_text("not an image")
    (image_dir / "f_cut.jpg").write_bytes((image_dir / "a_photo.jpg").read_bytes()[:40])
    out = tmp_path / "predictions.txt"
    assert main(predict_args(image_dir, out, checkpoint)) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "notes.txt" in line and "f_cut.jpg" in line
    assert not out.exists()
    assert not list(tmp_path.glob(".predictions.txt*")), "temporary file left behind"


def test_skip_unreadable_writes_the_rest(image_dir, checkpoint, tmp_path, capsys):
    (image_dir / "notes.txt").write_text("not an image")
    out = tmp_path / "predictions.txt"
    assert main(predict_args(image_dir, out, checkpoint, "--skip-unreadable")) == 0
    assert "notes.txt" in capsys.readouterr().err
    names = [line.split(",")[0] for line in out.read_text().splitlines()]
    assert names == ["a_photo.jpg", "b_colour.png", "c_grey.png", "d_alpha.png", "e_bitmap.bmp"]


def test_print_top5_with_class_names(image_dir, checkpoint, tmp_path, capsys):
    names = tmp_path / "synsets.txt"
    names.write_text("".join(f"n{i:08d} class number {i}\n" for i in range(10)))
    out = tmp_path / "predictions.txt"
    args = predict_args(image_dir, out, checkpoint, "--print-top5", "--class-names", str(names))
    assert main(args) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if ": " in line]
    expected = expected_labels(image_dir, checkpoint)
    assert len(printed) == 5
    for line in printed:
        name, top = line.split(": ", 1)
        first = top.split(", ")[0]
        assert first.startswith(f"{expected[name]} (n{expected[name]:08d} class number")
        assert len(top.split(") ")) == 6  # five "label (name) prob" entries


def test_missing_directory(checkpoint, tmp_path, capsys):
    assert main(predict_args(tmp_path / "nope", tmp_path / "p.txt", checkpoint)) == 1
    assert "nope" in capsys.readouterr().err


def test_class_names_must_name_every_class(image_dir, checkpoint, tmp_path, capsys):
    names = tmp_path / "synsets.txt"
    names.write_text("".join(f"n{i:08d}\n" for i in range(9)))  # the model has 10 classes
    out = tmp_path / "predictions.txt"
    args = predict_args(image_dir, out, checkpoint, "--print-top5", "--class-names", str(names))
    assert main(args) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "names 9 classes but the model has 10" in line and str(names) in line
    assert not out.exists()
