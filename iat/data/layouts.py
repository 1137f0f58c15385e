"""Dataset layouts: listing ``(path, label)`` samples of each split, and decoding images.

A *reader* knows one layout family; ``create_reader(root)`` picks it (``READERS`` is the
registry: a new layout is one class and one entry). Each split is listed once per reader and
cached. Torch-free: the data server imports it.

``imagenet`` -- the ImageNet release layouts, as the original's ``dataset.ILSVRC12Files``:

* ``root/<split>/<wnid>/<image>`` -- one folder per class (always used for ``train``);
* ``root/val/<image>`` plus ``root/val.txt`` with ``<filename> <label index>`` lines.

For any split other than ``train`` the class list is taken from ``root/train`` when it exists,
so that the labels of every split agree.
"""

from __future__ import annotations

from collections.abc import Callable
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


def _list_imagenet_split(root: Path, split: str) -> tuple[list[Sample], list[str]]:
    """The sorted ``(path, label)`` samples of ``root/split`` and the sorted class wnids."""
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


class ImageNetReader:
    """The ImageNet release layouts (class folders; flat ``val/`` + ``val.txt``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._splits: dict[str, tuple[list[Sample], list[str]]] = {}

    def has_split(self, split: str) -> bool:
        return (self.root / split).is_dir()

    def split(self, split: str) -> tuple[list[Sample], list[str]]:
        """``(samples, classes)`` of ``split``, listed on first use and then cached."""
        if split not in self._splits:
            self._splits[split] = _list_imagenet_split(self.root, split)
        return self._splits[split]

    def samples(self, split: str) -> list[Sample]:
        return self.split(split)[0]

    def classes(self) -> list[str]:
        """The class names: those of ``train/`` when it exists, else those of ``val/``."""
        if not self.root.is_dir():
            raise DataError(f"data folder {self.root} does not exist or is not a folder")
        if not (self.has_split("train") or self.has_split("val")):
            raise DataError(
                f"data folder {self.root} has neither train/ nor val/ "
                "(expected train/<wnid>/*.JPEG and val/<wnid>/* or val/ + val.txt)"
            )
        return self.split("train" if self.has_split("train") else "val")[1]


Reader = ImageNetReader
READERS: dict[str, Callable[[str | Path], Reader]] = {"imagenet": ImageNetReader}


def create_reader(root: str | Path, layout: str = "imagenet") -> Reader:
    """The reader of ``layout`` (a ``READERS`` name) for the data folder ``root``."""
    if layout not in READERS:
        raise DataError(f"unknown data layout {layout!r}; known: {sorted(READERS)}")
    return READERS[layout](root)


def list_split(root: str | Path, split: str) -> tuple[list[Sample], list[str]]:
    """``(samples, classes)`` of one split of an ImageNet-layout folder (one-off listing)."""
    return create_reader(root).split(split)


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


def check_labels(samples: list[Sample], num_classes: int, split: str) -> None:
    """Every label must be a class of the model."""
    top = max((label for _, label in samples), default=-1)
    if top >= num_classes:
        raise DataError(
            f"--data: {split} labels go up to {top} but the model has {num_classes} classes"
        )
