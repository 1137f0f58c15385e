"""Which images make up each training batch, and what happens to an unreadable one.

One policy for both batch sources, the data server and the local loader (torch-free):

* the training set is an endless stream of epochs, each a fresh permutation seeded by
  ``(seed, epoch)``; global batch ``b`` holds stream positions ``[b * B, (b + 1) * B)``;
* augmenting batch ``b`` draws from an RNG seeded by ``(seed, b)`` only, so the bytes do not
  depend on which worker or process builds it;
* ``--fake`` data is one constant random batch, drawn from ``seed`` alone;
* an image that cannot be decoded is replaced by a random other image (drawn from the batch's
  RNG), remembered and reported once; ``MAX_CORRUPT_RETRIES`` in a row is an error;
* the evaluation split of a training run is checked at start (``check_eval_headers``): an
  empty file or one no decoder recognises is an error then, not after a whole epoch.
"""

from __future__ import annotations

import sys

import cv2
import numpy as np

from iat.data.augment import TrainTransform
from iat.data.layouts import (
    CorruptImageError,
    DataError,
    Sample,
    read_image_bgr,
    read_image_bytes,
    tar_of,
)

MAX_CORRUPT_RETRIES = 100  # consecutive undecodable replacements before giving up


# The signatures of the formats a shard member may hold (layouts.IMAGE_EXTENSIONS).
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")


def _recognised(path: str) -> bool:
    """Whether `path` starts as an image does: a file by ``cv2.haveImageReader`` (its
    signature only), a tar member (a shard's) by its first bytes, read as evaluation reads it."""
    if tar_of(path) is None:
        return cv2.haveImageReader(path)
    try:
        head = read_image_bytes(path, limit=12)
    except CorruptImageError:
        return False
    return head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def undecodable_headers(samples: list[Sample]) -> list[str]:
    """The images among `samples` that are empty or whose header no decoder recognises (a
    signature only: cheap enough to check a whole evaluation split at the start,
    bench/RESULTS.md, section 13)."""
    return [path for path, _ in samples if not _recognised(path)]


def check_eval_headers(samples: list[Sample], split: str, skip_unreadable: bool) -> None:
    """Before training: the in-training evaluation would stop on an undecodable image of
    `split` after a whole epoch. An error naming them; a warning with --skip-unreadable."""
    bad = undecodable_headers(samples)
    if not bad:
        return
    shown = ", ".join(bad[:3]) + (f", ... and {len(bad) - 3} more" if len(bad) > 3 else "")
    if skip_unreadable:
        print(
            f"warning: {split}/: {len(bad)} undecodable image(s) skipped: {shown}", file=sys.stderr
        )
        return
    raise CorruptImageError(
        f"--data: {len(bad)} image(s) of {split}/ cannot be decoded (empty, or not an image): "
        f"{shown}; found before training (--skip-unreadable skips them)"
    )


class EpochSchedule:
    """Sample indices of batch b of an endless stream of epochs, each a fresh seeded shuffle."""

    def __init__(self, n_samples: int, batch: int, seed: int) -> None:
        if n_samples < 1:
            raise DataError("the training set is empty")
        self.n_samples, self.batch, self.seed = n_samples, batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = np.random.default_rng([self.seed, 0, epoch]).permutation(
                self.n_samples
            )
        return self._perms[epoch]

    def indices(self, batch_index: int) -> np.ndarray:
        positions = np.arange(batch_index * self.batch, (batch_index + 1) * self.batch)
        epochs, offsets = np.divmod(positions, self.n_samples)
        return np.array([self._perm(int(e))[o] for e, o in zip(epochs, offsets, strict=True)])


def fake_batch(
    batch: int, image_size: int, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """One constant random batch, as the original's --fake (measures the model, not the data):
    ``(images uint8 [B, S, S, 3], labels int32 [B])``."""
    rng = np.random.default_rng([seed, 2])
    images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    return images, rng.integers(0, num_classes, batch, dtype=np.int32)


def augment_rng(seed: int, batch_index: int) -> np.random.Generator:
    """Augmentation RNG of one batch: depends on (seed, batch) only, not on the worker count."""
    return np.random.default_rng([seed, 1, batch_index])


class BatchBuilder:
    """Decodes and augments the samples of one batch, replacing corrupt images by random others."""

    def __init__(self, samples: list[Sample], image_size: int, transform: TrainTransform) -> None:
        self.samples, self.image_size, self.transform = samples, image_size, transform
        self.corrupt: set[str] = set()

    def _load(
        self, index: int, rng: np.random.Generator, new_corrupt: list[str]
    ) -> tuple[np.ndarray, int]:
        for _ in range(MAX_CORRUPT_RETRIES):
            path, label = self.samples[index]
            if path not in self.corrupt:
                try:
                    return self.transform(read_image_bgr(path), rng, self.image_size), label
                except CorruptImageError:
                    self.corrupt.add(path)
                    new_corrupt.append(path)
            index = int(rng.integers(len(self.samples)))
        raise DataError(f"{MAX_CORRUPT_RETRIES} undecodable images in a row, e.g. {path}")

    def build(
        self, indices: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(images uint8 [B, S, S, 3], labels int32 [B], newly found corrupt paths)``."""
        size = self.image_size
        images = np.empty((len(indices), size, size, 3), dtype=np.uint8)
        labels = np.empty(len(indices), dtype=np.int32)
        new_corrupt: list[str] = []
        for i, index in enumerate(indices):
            images[i], labels[i] = self._load(int(index), rng, new_corrupt)
        return images, labels, new_corrupt


class TrainStream:
    """Global batch ``b`` of the training stream, built by ``BatchBuilder`` (any process)."""

    def __init__(
        self,
        samples: list[Sample],
        batch: int,
        image_size: int,
        transform: TrainTransform,
        seed: int,
        schedule: EpochSchedule | None = None,  # which samples make up batch b; default: above
    ) -> None:
        self.schedule = schedule or EpochSchedule(len(samples), batch, seed)
        self.builder = BatchBuilder(samples, image_size, transform)
        self.seed = seed

    def batch(self, batch_index: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        rng = augment_rng(self.seed, batch_index)
        return self.builder.build(self.schedule.indices(batch_index), rng)
