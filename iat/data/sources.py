"""Batch sources: the torch side of the data pipeline, and the one place that picks a source.

Every training source yields ``(images, labels)`` with images as uint8 NHWC BGR tensors on the
CPU; the conversion to float NCHW happens on the device (``to_model_input``), so only bytes
cross the bus. Training sources (``TRAIN_SOURCES``): the per-machine ZMQ data server
(``third_party/serve-data.py``, as the original), a local folder decoded by DataLoader worker
processes with the server's own sampling policy (``iat.data.sampling``), and constant fake
batches (``--fake``). Evaluation has one sharding (``rank_batches``), used by every evaluator.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from iat.data.augment import TRAIN_AUGMENTATIONS, eval_transform
from iat.data.client import ZMQBatchClient
from iat.data.layouts import (
    EXPORT_LABELS,
    CorruptImageError,
    DataError,
    Sample,
    read_image_bgr,
)
from iat.data.protocol import default_address, server_command
from iat.data.sampling import TrainStream, fake_batch
from nets.layers import PIXEL_MAX, PIXEL_MIN

Batch = tuple[torch.Tensor, torch.Tensor]


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in pixel units [0, 255] on `device`.

    On CUDA the result stays channels-last in memory (the permuted NHWC bytes), the layout of
    cuDNN's tensor-core convolutions; on the CPU, oneDNN runs these networks faster on plain NCHW
    (bench/RESULTS.md, section 1, "Input layout on this CPU")."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    return x if device.type == "cuda" else x.contiguous()


def resize_batch(images: torch.Tensor, side: int) -> torch.Tensor:
    """Model-input images (float NCHW, pixel units) resized to side x side on their device:
    bilinear, antialiased when shrinking (as a crop decoded at that size would be)."""
    resized = torch.nn.functional.interpolate(
        images, size=(side, side), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.clamp(PIXEL_MIN, PIXEL_MAX)


# --- training sources ------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSourceSpec:
    """What a training batch source needs to know (from the configuration and the job)."""

    samples: Sequence[Sample] | None  # the training split (None for fake data)
    batch: int  # images per process and step
    image_size: int
    augment: str  # a name of augment.TRAIN_AUGMENTATIONS
    num_classes: int
    workers: int  # local loader: decoding processes
    seed: int
    rank: int
    world_size: int
    first_batch: int  # steps already taken by this run (a resumed run continues the stream)
    address: str | None  # data server address; None: the default for `batch`
    timeout_s: float  # data server: seconds without a batch before it is declared gone
    pin_memory: bool  # page-locked host memory for an asynchronous copy (CUDA)
    # The data server's handshake: the trainer's --data, its layout (resolved) and class count
    # (None: not compared), which the server's batches must have been made with too (as the
    # augmentation and the seed above).
    data: str | None = None
    layout: str | None = None
    classes: int | None = None


def fake_batches(spec: TrainSourceSpec) -> Iterator[Batch]:
    """The constant batch of ``sampling.fake_batch`` (each rank its own), forever."""
    images, labels = fake_batch(
        spec.batch, spec.image_size, spec.num_classes, spec.seed + spec.rank
    )
    batch = torch.from_numpy(images), torch.from_numpy(labels).long()
    while True:
        yield batch


def server_batches(spec: TrainSourceSpec) -> Iterator[Batch]:
    """Batches pulled from the machine's data server; raises DataServerTimeout when it is gone,
    BatchShapeMismatch when it serves another batch or image size, augmentation, layout or class
    count than `spec`'s (each error giving the command that starts the matching server).

    With `pin_memory` (CUDA), images land in page-locked memory for an asynchronous copy."""
    address = spec.address or default_address(spec.batch)
    with ZMQBatchClient(
        address,
        timeout_s=spec.timeout_s,
        batch=spec.batch,
        image_size=spec.image_size,
        num_classes=spec.num_classes,
        expect={
            "augment": spec.augment,
            "layout": spec.layout,
            "classes": spec.classes,
            "seed": spec.seed,
        },
        command=server_command(
            data=spec.data,
            batch=spec.batch,
            image_size=spec.image_size,
            augment=spec.augment,
            layout=spec.layout or "auto",
            seed=spec.seed,
        ),
    ) as client:
        for images, labels in client:
            images = torch.from_numpy(images)
            images = images.pin_memory() if spec.pin_memory else images
            yield images, torch.from_numpy(labels).long()


class _StreamBatches(Dataset):
    """Item k is global batch ``first + k * world_size`` of the training stream (one rank's)."""

    def __init__(self, stream: TrainStream, first: int, world_size: int, count: int) -> None:
        self.stream, self.first, self.world_size, self.count = stream, first, world_size, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        return self.stream.batch(self.first + k * self.world_size)


LOCAL_CHUNK = 1 << 20  # batches per DataLoader pass (any large number: the stream is endless)


def local_batches(spec: TrainSourceSpec) -> Iterator[Batch]:
    """This rank's batches of the training stream, decoded by DataLoader worker processes.

    Step s of the run uses global batch ``s * world_size + rank``, so ranks see disjoint
    images, and a resumed run continues where the killed one stopped."""
    stream = TrainStream(
        list(spec.samples),
        spec.batch,
        spec.image_size,
        TRAIN_AUGMENTATIONS[spec.augment],
        spec.seed,
    )
    step = spec.first_batch
    while True:
        first = step * spec.world_size + spec.rank
        loader = DataLoader(
            _StreamBatches(stream, first, spec.world_size, LOCAL_CHUNK),
            batch_size=None,
            num_workers=spec.workers,
            pin_memory=spec.pin_memory,
        )
        for images, labels, corrupt in loader:
            for path in corrupt:
                tqdm.write(f"warning: skipping corrupt training image {path}", file=sys.stderr)
            yield images, labels.long()
            step += 1


TRAIN_SOURCES: dict[str, Callable[[TrainSourceSpec], Iterator[Batch]]] = {
    "server": server_batches,
    "local": local_batches,
}


def train_batches(loader: str, fake: bool, spec: TrainSourceSpec) -> Iterator[Batch]:
    """The run's training batches, step after step: fake data, or the `loader` source."""
    return fake_batches(spec) if fake else TRAIN_SOURCES[loader](spec)


# --- evaluation and prediction ---------------------------------------------------------------
def rank_batches(num_images: int, batch: int, rank: int, world_size: int) -> list[int]:
    """The global batches of rank `rank`: batch j (images [j*batch, (j+1)*batch)) belongs to
    rank j % world_size."""
    return list(range(rank, math.ceil(num_images / batch), world_size))


def batch_images(batch_index: int, batch: int, num_images: int) -> list[int]:
    """The images of global batch `batch_index`."""
    return list(range(batch_index * batch, min((batch_index + 1) * batch, num_images)))


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """The original's black-box prediction transform: a naive cubic resize to size x size."""
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)


@dataclass(frozen=True)
class DecodedBy:
    """An evaluation transform whose pixels assume the decoder `read` (path -> HxWx3 uint8 BGR),
    not OpenCV's: ``ImageFiles`` decodes with it (RobustBench's protocol decodes with PIL)."""

    read: Callable[[str], np.ndarray]
    transform: Callable[[np.ndarray, int], np.ndarray]

    def __call__(self, img: np.ndarray, size: int) -> np.ndarray:
        return self.transform(img, size)


class ImageFiles(Dataset):
    """``(image uint8 HxWx3, label, index, readable?)`` of each file, after ``transform``.

    Unreadable files give a black image and ``readable = False``; the caller decides."""

    def __init__(
        self, samples: Sequence[Sample], image_size: int, transform: Callable = eval_transform
    ) -> None:
        self.samples, self.image_size, self.transform = samples, image_size, transform
        # a transform may name the decoder its pixels assume (DecodedBy); else OpenCV's
        self.read = getattr(transform, "read", read_image_bgr)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, bool]:
        path, label = self.samples[index]
        try:
            img = self.transform(self.read(path), self.image_size)
        except CorruptImageError:
            img, ok = np.zeros((self.image_size, self.image_size, 3), np.uint8), False
        else:
            ok = True
        return torch.from_numpy(np.ascontiguousarray(img)), label, index, ok


def eval_loader(
    samples: Sequence[Sample],
    *,
    batch: int,
    image_size: int,
    workers: int,
    rank: int,
    world_size: int,
    pin_memory: bool,
    transform: Callable = eval_transform,
    batches: Sequence[int] | None = None,
) -> DataLoader:
    """This rank's share of ``samples`` in ``rank_batches`` order (every image exactly once), or
    the global `batches` given (a resumed evaluation's remaining ones)."""
    if batches is None:
        batches = rank_batches(len(samples), batch, rank, world_size)
    return DataLoader(
        ImageFiles(samples, image_size, transform),
        batch_sampler=[batch_images(j, batch, len(samples)) for j in batches],
        num_workers=workers,
        pin_memory=pin_memory,
    )


def unreadable(samples: Sequence[Sample], indices: torch.Tensor, ok: torch.Tensor) -> list[str]:
    """The paths of a batch's unreadable files."""
    return [samples[i][0] for i in indices[~ok].tolist()]


def list_directory(directory: str | Path) -> list[Path]:
    """Every regular, non-hidden file under `directory` (subfolders too, e.g. the class folders
    of exported adversarial images; an export's label file aside), sorted by relative path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"--eval-directory: {directory} is not a directory")
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
        and p != directory / EXPORT_LABELS
    )
    if not files:
        raise DataError(f"--eval-directory: {directory} contains no files")
    return files
