"""Reading an ImageNet-style folder: listing (path, label) samples and decoding images.

Two layouts are understood, as in the original's ``dataset.ILSVRC12Files``:

* ``root/<split>/<wnid>/<image>`` -- one folder per class (always used for ``train``);
* ``root/val/<image>`` plus ``root/val.txt`` with ``<filename> <label index>`` lines.

For any split other than ``train`` the class list is taken from ``root/train`` when it exists,
so that the labels of every split agree.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp"})

Sample = tuple[str, int]


class DataError(ValueError):
    """The data folder does not have the expected layout; the message names the path."""


class CorruptImageError(DataError):
    """An image file that OpenCV cannot decode; the message names the file."""


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted((p for p in split_dir.iterdir() if p.is_dir()), key=lambda p: p.name)


def _images_in(class_dir: Path) -> list[Path]:
    images = sorted((p for p in class_dir.iterdir() if _is_image(p)), key=lambda p: p.name)
    if not images:
        raise DataError(f"class folder {class_dir} contains no images ({sorted(IMAGE_EXTENSIONS)})")
    return images


def _train_classes(root: Path) -> list[str] | None:
    train_dir = root / "train"
    if not train_dir.is_dir():
        return None
    return [d.name for d in _class_dirs(train_dir)]


def _list_class_folders(split_dir: Path, classes: list[str]) -> list[Sample]:
    index = {wnid: i for i, wnid in enumerate(classes)}
    samples: list[Sample] = []
    for class_dir in _class_dirs(split_dir):
        if class_dir.name not in index:
            raise DataError(f"class folder {class_dir} is not a class of the training set")
        label = index[class_dir.name]
        samples.extend((str(p), label) for p in _images_in(class_dir))
    return samples


def _parse_label_file(label_file: Path, split_dir: Path) -> list[Sample]:
    samples: list[Sample] = []
    for lineno, line in enumerate(label_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(f"{label_file}:{lineno}: expected '<filename> <label>', got {line!r}")
        path = split_dir / parts[0]
        if not path.is_file():
            raise DataError(f"{label_file}:{lineno}: image {path} does not exist")
        samples.append((str(path), int(parts[1])))
    if not samples:
        raise DataError(f"label file {label_file} lists no images")
    return sorted(samples)


def _list_flat(root: Path, split: str, split_dir: Path) -> tuple[list[Sample], list[str]]:
    label_file = root / f"{split}.txt"
    if not label_file.is_file():
        raise DataError(f"{split_dir} has no class folders and there is no label file {label_file}")
    samples = _parse_label_file(label_file, split_dir)
    n_classes = max(label for _, label in samples) + 1
    classes = _train_classes(root) or [str(i) for i in range(n_classes)]
    if n_classes > len(classes):
        raise DataError(
            f"{label_file} uses label {n_classes - 1} but there are {len(classes)} classes"
        )
    return samples, classes


def list_split(root: str | Path, split: str) -> tuple[list[Sample], list[str]]:
    """Return the sorted ``(path, label)`` samples of ``root/split`` and the sorted class wnids."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"split folder {split_dir} does not exist")
    if split == "train" or _class_dirs(split_dir):
        classes = _train_classes(root) if split != "train" else None
        classes = classes or [d.name for d in _class_dirs(split_dir)]
        if not classes:
            raise DataError(f"split folder {split_dir} contains no class folders")
        return _list_class_folders(split_dir, classes), classes
    return _list_flat(root, split, split_dir)


def read_image_bgr(path: str) -> np.ndarray:
    """Decode an image file into an HxWx3 uint8 BGR array (gray expanded, alpha dropped)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise CorruptImageError(f"cannot read image {path}: {err}") from err
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise CorruptImageError(f"cannot decode image {path}")
    return image
