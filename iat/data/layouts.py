"""Dataset layouts: listing ``(path, label)`` samples of each split, and decoding images.

A *reader* knows one layout family; ``create_reader(root, layout)`` picks it (``READERS`` is
the registry: a new layout is one class and one entry; ``auto`` detects it). Each split is
listed once per reader and cached. Torch-free: the data server imports it. Readers: ``imagenet``
(below; also any class-per-folder tree), ``tiny-imagenet`` (``TinyImageNetReader``) and
``shards`` (plain tar files: ``iat.data.shards``, which registers itself).

``imagenet`` -- the ImageNet release layouts, as the original's ``dataset.ILSVRC12Files``:

* ``root/<split>/<wnid>/<image>`` -- one folder per class (always used for ``train``);
* ``root/val/<image>`` plus ``root/val.txt`` with ``<filename> <label index>`` lines;
* split ``.``, the folder itself: an ``--export-adversarial`` folder (its ``labels.txt`` lists
  ``<relative path> <label index>``), or one folder per class.

For any split other than ``train`` the class list is taken from ``root/train`` when it exists,
so that the labels of every split agree.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp"})
# The largest image file (or shard member) read, checked (stat, tar header) before reading: far
# above a photograph's JPEG or PNG; a larger file is a corrupt image (named, or skipped as one).
MAX_IMAGE_BYTES = 256 << 20
FOLDER_ITSELF = "."  # the split that is the data folder itself
EXPORT_LABELS = "labels.txt"  # an exported folder's `<relative path> <label index>` lines

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
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(f"{label_file}:{lineno}: expected '<filename> <label>', got {line!r}")
        path = split_dir / parts[0]
        if not path.is_file():
            raise DataError(f"{label_file}:{lineno}: image {path} does not exist")
        samples.append((str(path), int(parts[1])))
    if not samples:
        raise DataError(f"label file {label_file} lists no images")
    return sorted(samples)


def is_export(root: str | Path, split: str) -> bool:
    """Whether split `split` of `root` is an ``--export-adversarial`` folder: the folder itself
    (``.``) with the ``labels.txt`` an export writes."""
    return split == FOLDER_ITSELF and (Path(root) / EXPORT_LABELS).is_file()


def _label_file(root: Path, split: str) -> Path:
    """A flat split's labels: ``root/<split>.txt``, an exported folder's ``labels.txt``."""
    return root / (EXPORT_LABELS if split == FOLDER_ITSELF else f"{split}.txt")


def _list_flat(root: Path, split: str, split_dir: Path) -> tuple[list[Sample], list[str]]:
    label_file = _label_file(root, split)
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
        exported = (root / EXPORT_LABELS).is_file()
        hint = f" ({root} is an --export-adversarial folder: --split .)" if exported else ""
        raise DataError(f"split folder {split_dir} does not exist{hint}")
    if is_export(root, split):
        return _list_flat(root, split, split_dir)  # an export: whatever its class folders hold
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

    def named_classes(self, split: str) -> list[str] | None:
        """The class names `split`'s labels index (``train/``'s class folders, else the split's
        own), without listing any image; None for a flat split whose label file gives only
        numbers (an export's labels.txt, or a missing split)."""
        split_dir = self.root / split
        if is_export(self.root, split) or not split_dir.is_dir():
            return None
        return _train_classes(self.root) or [d.name for d in _class_dirs(split_dir)] or None

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


class TinyImageNetReader:
    """Tiny ImageNet's release layout (200 classes, 64x64):

    * ``wnids.txt``: the class wnids, one per line, in the release's class-index order;
    * ``train/<wnid>/images/*.JPEG``;
    * ``val/images/*.JPEG`` with ``val/val_annotations.txt`` (``<file>\t<wnid>\t<box>`` lines).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._classes: list[str] | None = None
        self._splits: dict[str, list[Sample]] = {}

    def has_split(self, split: str) -> bool:
        return (self.root / split).is_dir()

    def classes(self) -> list[str]:
        if self._classes is None:
            path = self.root / TINY_IMAGENET_WNIDS
            try:
                self._classes = [w.strip() for w in path.read_text().splitlines() if w.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"cannot read the class list {path}: {e}") from None
            if not self._classes:
                raise DataError(f"{path} lists no classes")
        return self._classes

    def named_classes(self, split: str) -> list[str]:
        return self.classes()

    def samples(self, split: str) -> list[Sample]:
        if split not in self._splits:
            index = {wnid: i for i, wnid in enumerate(self.classes())}
            lister = self._list_val if split == "val" else self._list_train
            self._splits[split] = lister(self.root / split, index)
        return self._splits[split]

    def split(self, split: str) -> tuple[list[Sample], list[str]]:
        return self.samples(split), self.classes()

    @staticmethod
    def _list_train(split_dir: Path, index: dict[str, int]) -> list[Sample]:
        if not split_dir.is_dir():
            raise DataError(f"split folder {split_dir} does not exist")
        samples: list[Sample] = []
        for class_dir in _class_dirs(split_dir):
            if class_dir.name not in index:
                raise DataError(f"class folder {class_dir} is not listed in {TINY_IMAGENET_WNIDS}")
            images = class_dir / "images"
            folder = images if images.is_dir() else class_dir
            samples += [(str(p), index[class_dir.name]) for p in _images_in(folder)]
        return samples

    @staticmethod
    def _list_val(split_dir: Path, index: dict[str, int]) -> list[Sample]:
        annotations = split_dir / TINY_IMAGENET_VAL_LABELS
        try:
            lines = annotations.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {annotations}: {e}") from None
        samples: list[Sample] = []
        for lineno, line in enumerate(lines, start=1):
            parts = line.split("\t")
            if not line.strip():
                continue
            if len(parts) < 2 or parts[1] not in index:
                raise DataError(
                    f"{annotations}:{lineno}: expected '<file>\\t<wnid>', got {line!r:.80}"
                )
            path = split_dir / "images" / parts[0]
            if not path.is_file():
                raise DataError(f"{annotations}:{lineno}: image {path} does not exist")
            samples.append((str(path), index[parts[1]]))
        return sorted(samples)


TINY_IMAGENET_WNIDS = "wnids.txt"
TINY_IMAGENET_VAL_LABELS = "val_annotations.txt"
Reader = ImageNetReader | TinyImageNetReader
# --data-layout choices ("auto" detects): name -> reader of a data folder. Another module adds
# its layout with `register_layout` (the shard layout: iat.data.shards).
READERS: dict[str, Callable[[str | Path], Reader]] = {
    "imagenet": ImageNetReader,
    "tiny-imagenet": TinyImageNetReader,
}
# name -> whether a data folder has that layout, asked in this order by "auto".
_DETECTORS: dict[str, Callable[[Path], bool]] = {
    "tiny-imagenet": lambda root: (root / TINY_IMAGENET_WNIDS).is_file(),
}
AUTO_LAYOUT = "auto"


def register_layout(
    name: str, reader: Callable[[str | Path], Reader], detect: Callable[[Path], bool]
) -> None:
    """Make layout `name` a ``--data-layout`` choice, read by `reader` and chosen by ``auto``
    for a data folder where `detect` holds."""
    READERS[name] = reader
    _DETECTORS[name] = detect


def detect_layout(root: str | Path) -> str:
    """The first registered layout whose detector recognises ``root`` (Tiny ImageNet's class list
    and validation annotations, the shard layout's files), else ImageNet's class-folder layouts
    (which also cover any class-per-folder tree: Imagenette, CIFAR-10 exported as PNGs, ImageNet
    down-sampled to 64x64)."""
    root = Path(root)
    return next((name for name, detect in _DETECTORS.items() if detect(root)), "imagenet")


def resolved_layout(root: str | Path, layout: str = AUTO_LAYOUT) -> str:
    """`layout`, or for ``auto`` the layout detected in ``root``."""
    return detect_layout(root) if layout == AUTO_LAYOUT else layout


def create_reader(root: str | Path, layout: str = AUTO_LAYOUT) -> Reader:
    """The reader of ``layout`` (a ``READERS`` name, or ``auto``) for the data folder ``root``."""
    if layout == AUTO_LAYOUT:
        layout = detect_layout(root)
    if layout not in READERS:
        raise DataError(f"unknown data layout {layout!r}; known: {sorted(READERS)}")
    return READERS[layout](root)


def list_split(
    root: str | Path, split: str, layout: str = AUTO_LAYOUT
) -> tuple[list[Sample], list[str]]:
    """``(samples, classes)`` of one split of a data folder (one-off listing)."""
    return create_reader(root, layout).split(split)


# An image inside a tar file (a layout's, as the shards'): "<file>.tar:<member>@<offset>+<size>".
_TAR_MEMBER = re.compile(r"(?P<tar>.+\.tar):(?P<name>[^:@/]+)@(?P<offset>\d+)\+(?P<size>\d+)")


def tar_member_path(tar: str | Path, name: str, offset: int, size: int) -> str:
    """The sample path of member `name`, `size` bytes at `offset` of tar file `tar`."""
    return f"{tar}:{name}@{offset}+{size}"


def tar_of(path: str) -> str | None:
    """The tar file of a tar member's path; None for an image file."""
    member = _TAR_MEMBER.fullmatch(path)
    return None if member is None else member["tar"]


def _open_regular(path: str) -> tuple[int, int]:
    """``(descriptor, size)`` of regular file `path`, opened without blocking (a FIFO named
    ``x.JPEG`` would wait for a writer forever); anything else is an ``OSError``."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise OSError("not a regular file")
    return fd, info.st_size


def read_image_bytes(path: str, limit: int | None = None) -> bytes:
    """The bytes of an image file or tar member (its first `limit` only, when given), its size
    checked (stat, tar header) before any is read: a sparse 30 GB file costs nothing to make and
    would be allocated whole."""
    member = _TAR_MEMBER.fullmatch(path)
    offset, size = (0, None) if member is None else (int(member["offset"]), int(member["size"]))
    try:
        fd, file_size = _open_regular(path if member is None else member["tar"])
        with os.fdopen(fd, "rb") as f:
            size = file_size if size is None else size
            if size > MAX_IMAGE_BYTES:
                raise OSError(
                    f"{size:,} bytes, over the {MAX_IMAGE_BYTES >> 20} MiB an image may have"
                )
            size = size if limit is None else min(size, limit)
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError("truncated shard" if member else "the file shrank while read")
    except OSError as err:
        raise CorruptImageError(f"cannot read image {path}: {err}") from err
    return data


def read_image_bgr(path: str) -> np.ndarray:
    """Decode an image file, or an image inside a tar file, into an HxWx3 uint8 BGR array (gray
    expanded, alpha dropped)."""
    data = np.frombuffer(read_image_bytes(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise CorruptImageError(f"cannot decode image {path}")
    return image


def read_image_pil_bgr(path: str) -> np.ndarray:
    """Decode an image as torchvision's ``ImageFolder`` does (PIL, ``convert("RGB")``), into an
    HxWx3 uint8 BGR array: RobustBench's decoder, whose JPEG pixels may differ from OpenCV's."""
    try:
        with Image.open(io.BytesIO(read_image_bytes(path))) as image:
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"cannot decode image {path}: {err}") from err
    return np.ascontiguousarray(rgb[..., ::-1])


def check_labels(samples: list[Sample], num_classes: int, split: str) -> None:
    """Every label must be a class of the model."""
    top = max((label for _, label in samples), default=-1)
    if top >= num_classes:
        raise DataError(
            f"--data: {split} labels go up to {top} but the model has {num_classes} classes"
        )


def check_class_count(
    classes: list[str] | None, num_classes: int, where: str, subset: bool
) -> None:
    """The data's classes must be the model's outputs: a label is the index of its class folder
    in sorted order, so with another count every label but by chance names another class. With
    `subset`, fewer classes are accepted (the model's first ones, in that order)."""
    if classes is None or len(classes) == num_classes:
        return
    if subset and len(classes) < num_classes:
        return
    hint = "; if they are its first classes, in this order, give --class-subset" * (
        len(classes) < num_classes
    )
    raise DataError(
        f"--data: {where} has {len(classes)} classes ({', '.join(classes[:3])}"
        f"{', ...' * (len(classes) > 3)}) but the model has {num_classes} outputs{hint}"
    )
