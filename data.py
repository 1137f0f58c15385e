"""Batch sources for training and evaluation (the torch side of the data pipeline).

Every source yields `(images, labels)` with images as uint8 NHWC BGR tensors on the CPU; the
conversion to float NCHW happens on the device (`to_model_input`), so only bytes cross the bus.
Sources: a local folder decoded by DataLoader worker processes, the per-machine ZMQ data server
(`third_party/serve-data.py`, as the original), and constant fake batches (`--fake`).
Evaluation batches also carry each image's global index, so that attacks can draw per-image
randomness and results do not depend on how the split is sharded across processes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from third_party import augment
from third_party.data_client import ZMQBatchClient
from third_party.imagenet import CorruptImageError, read_image_bgr

Sample = tuple[str, int]
Batch = tuple[torch.Tensor, torch.Tensor]


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in pixel units [0, 255] on `device`.

    On CUDA the result stays channels-last in memory (the permuted NHWC bytes), the layout of
    cuDNN's tensor-core convolutions; on the CPU, oneDNN runs these networks faster on plain NCHW
    (bench/RESULTS.md: attack iteration 154 ms vs 172 ms on ResNet-50 at 64x64)."""
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    return x if device.type == "cuda" else x.contiguous()


def _train_transform(img: np.ndarray, rng: np.random.Generator, size: int, kind: str):
    if kind == "fbresnet":
        return augment.fbresnet_augment(img, rng, size)
    img = augment.eval_transform(img, size)
    return img[:, ::-1] if kind == "flip" and rng.random() < 0.5 else img


class TrainDataset(Dataset):
    """Indexed by (epoch, index) pairs so that augmentation is a pure function of the seed.

    A corrupt image is replaced by the next readable one and named on stderr: a multi-day run
    does not die on one bad file of 1.28 million.
    """

    def __init__(self, samples: Sequence[Sample], image_size: int, kind: str, seed: int):
        self.samples = samples
        self.image_size = image_size
        self.kind = kind
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        rng = np.random.default_rng((self.seed, epoch, index))
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = read_image_bgr(path)
            except CorruptImageError as e:
                print(f"warning: skipping corrupt training image: {e}", file=sys.stderr)
                continue
            img = _train_transform(img, rng, self.image_size, self.kind)
            return torch.from_numpy(np.ascontiguousarray(img)), label
        raise CorruptImageError("no readable image in the training set")


class EvalDataset(Dataset):
    """Validation images with the original's transform; a corrupt image is an error."""

    def __init__(self, samples: Sequence[Sample], image_size: int):
        self.samples = samples
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        path, label = self.samples[index]
        img = augment.eval_transform(read_image_bgr(path), self.image_size)
        return torch.from_numpy(np.ascontiguousarray(img)), label, index


def epoch_order(num_samples: int, num_needed: int, seed: int, epoch: int) -> list[int]:
    """A fresh permutation per epoch, repeated when an epoch needs more images than exist."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    reps = -(-num_needed // num_samples)
    order = torch.cat([torch.randperm(num_samples, generator=g) for _ in range(reps)])
    return order[:num_needed].tolist()


def local_train_batches(
    samples: Sequence[Sample],
    *,
    epoch: int,
    steps: int,
    batch: int,
    rank: int,
    world_size: int,
    image_size: int,
    augment_kind: str,
    workers: int,
    seed: int,
) -> Iterator[Batch]:
    """One epoch of `steps` batches for this rank: disjoint slices of one shared permutation."""
    order = epoch_order(len(samples), steps * batch * world_size, seed, epoch)
    mine = [(epoch, i) for i in order[rank::world_size]]
    dataset = TrainDataset(samples, image_size, augment_kind, seed)
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=mine,
        num_workers=workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
    yield from loader


def eval_batches(
    samples: Sequence[Sample],
    *,
    batch: int,
    rank: int,
    world_size: int,
    image_size: int,
    workers: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This rank's share (every world_size-th image): every image is seen exactly once overall."""
    dataset = EvalDataset(samples, image_size)
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=list(range(rank, len(samples), world_size)),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )
    yield from loader


def fake_batches(batch: int, image_size: int, num_classes: int, seed: int) -> Iterator[Batch]:
    """Constant random batches, as the original's --fake: measures the model, not the data."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, image_size, image_size, 3), generator=g)
    images = images.to(torch.uint8)
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    while True:
        yield images, labels


def server_batches(address: str, timeout_s: float, pin_memory: bool) -> Iterator[Batch]:
    """Batches pulled from the machine's data server; raises DataServerTimeout when it is gone.

    With `pin_memory` (CUDA), images land in page-locked memory for an asynchronous copy."""
    with ZMQBatchClient(address, timeout_s=timeout_s) as client:
        for images, labels in client:
            images = torch.from_numpy(images)
            yield (images.pin_memory() if pin_memory else images), torch.from_numpy(labels).long()
