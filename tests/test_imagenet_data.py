"""Listing ImageNet-style folders and decoding images with ``iat.data.layouts``."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from iat.data.layouts import CorruptImageError, DataError, list_split, read_image_bgr


def _write_jpeg(path: Path, seed: int, shape: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    # Classes written out of order, with mixed-case extensions and a non-image file.
    for c, wnid in enumerate(["n03", "n01", "n02"]):
        for i in range(2):
            _write_jpeg(tmp_path / "train" / wnid / f"img{1 - i}.JPEG", seed=10 * c + i)
        (tmp_path / "train" / wnid / "notes.txt").write_text("not an image")
    return tmp_path


def test_train_folders_sorted_and_labelled(folder: Path) -> None:
    samples, classes = list_split(folder, "train")
    assert classes == ["n01", "n02", "n03"]
    expected = [
        (str(folder / "train" / wnid / f"img{i}.JPEG"), label)
        for label, wnid in enumerate(classes)
        for i in range(2)
    ]
    assert samples == expected


def test_val_class_folders_take_train_classes(folder: Path) -> None:
    # val has only one class folder; its label must be its index among the *train* classes.
    _write_jpeg(folder / "val" / "n03" / "a.jpg", seed=99)
    samples, classes = list_split(folder, "val")
    assert classes == ["n01", "n02", "n03"]
    assert samples == [(str(folder / "val" / "n03" / "a.jpg"), 2)]


def test_flat_val_with_label_file(folder: Path) -> None:
    _write_jpeg(folder / "val" / "v2.png", seed=1)
    _write_jpeg(folder / "val" / "v1.png", seed=2)
    (folder / "val.txt").write_text("v2.png 0\nv1.png 2\n\n")
    samples, classes = list_split(folder, "val")
    assert classes == ["n01", "n02", "n03"]
    assert samples == [(str(folder / "val" / "v1.png"), 2), (str(folder / "val" / "v2.png"), 0)]


def test_flat_val_without_train_numbers_classes(tmp_path: Path) -> None:
    _write_jpeg(tmp_path / "val" / "x.jpg", seed=1)
    (tmp_path / "val.txt").write_text("x.jpg 4\n")
    samples, classes = list_split(tmp_path, "val")
    assert classes == ["0", "1", "2", "3", "4"]
    assert samples == [(str(tmp_path / "val" / "x.jpg"), 4)]


@pytest.mark.parametrize(
    ("setup", "culprit"),
    [
        ("missing_root", "nowhere"),
        ("missing_split", "train"),
        ("no_classes", "train"),
        ("empty_class", "n02"),
        ("val_missing_file", "ghost.jpg"),
        ("val_bad_line", "val.txt:1"),
    ],
)
def test_layout_errors_name_the_culprit(tmp_path: Path, setup: str, culprit: str) -> None:
    root, split = tmp_path, "train"
    if setup == "missing_root":
        root = tmp_path / "nowhere"
    elif setup == "no_classes":
        (tmp_path / "train").mkdir()
    elif setup == "empty_class":
        _write_jpeg(tmp_path / "train" / "n01" / "a.jpg", seed=0)
        (tmp_path / "train" / "n02").mkdir()
    elif setup.startswith("val_"):
        split = "val"
        _write_jpeg(tmp_path / "val" / "real.jpg", seed=0)
        line = "ghost.jpg 0" if setup == "val_missing_file" else "real.jpg zero"
        (tmp_path / "val.txt").write_text(line + "\n")
    with pytest.raises(DataError, match=culprit):
        list_split(root, split)


def test_read_image_bgr_matches_cv2_and_expands_gray(tmp_path: Path) -> None:
    color = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), color)
    np.testing.assert_array_equal(read_image_bgr(str(tmp_path / "c.png")), color)

    gray = np.arange(35, dtype=np.uint8).reshape(5, 7)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    out = read_image_bgr(str(tmp_path / "g.png"))
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[..., 3] = 0
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    out = read_image_bgr(str(tmp_path / "a.png"))
    assert out.shape == (4, 4, 3)
    assert (out == np.array([10, 20, 30], dtype=np.uint8)).all()


def test_read_image_bgr_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(CorruptImageError, match="bad.jpg"):
        read_image_bgr(str(bad))
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(CorruptImageError, match="empty.jpg"):
        read_image_bgr(str(tmp_path / "empty.jpg"))
    with pytest.raises(CorruptImageError, match="absent.jpg"):
        read_image_bgr(str(tmp_path / "absent.jpg"))


def test_prepare_val_builds_class_folders_from_kaggle_csv(folder: Path) -> None:
    from iat.data.prepare_val import main as prepare_val

    val = folder / "val"
    for i in range(1, 4):
        _write_jpeg(val / f"ILSVRC2012_val_{i:08d}.JPEG", seed=i)
    truth = folder / "LOC_val_solution.csv"
    truth.write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000002,n03 10 20 30 40 n03 1 2 3 4\n"
        "ILSVRC2012_val_00000001,n01 5 6 7 8\n"
        "ILSVRC2012_val_00000003,n03 1 1 2 2\n"
    )
    assert prepare_val([str(val), str(truth)]) == 0
    samples, classes = list_split(folder, "val")
    assert classes == ["n01", "n02", "n03"]  # the train/ classes: labels agree with training
    assert samples == [
        (str(val / "n01" / "ILSVRC2012_val_00000001.JPEG"), 0),
        (str(val / "n03" / "ILSVRC2012_val_00000002.JPEG"), 2),
        (str(val / "n03" / "ILSVRC2012_val_00000003.JPEG"), 2),
    ]


def test_prepare_val_moves_nothing_when_an_image_is_missing(folder: Path, capsys) -> None:
    from iat.data.prepare_val import main as prepare_val

    val = folder / "val"
    _write_jpeg(val / "a.JPEG", seed=1)
    truth = folder / "labels.txt"
    truth.write_text("a n01\nb.JPEG n02\n")
    assert prepare_val([str(val), str(truth)]) == 1
    assert "1 labelled images are missing, e.g. b" in capsys.readouterr().err
    assert sorted(p.name for p in val.iterdir()) == ["a.JPEG"]
