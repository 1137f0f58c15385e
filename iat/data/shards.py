"""The shard layout: each split as plain tar files of ``{key}.jpg`` + ``{key}.cls`` (torch-free).

A data folder of ``classes.txt`` (the class names, one a line, in label order) and, for each
split, ``<split>-000000.tar``, ...: member ``{key}.jpg`` is the image file's bytes as they were
(another format keeps its own extension: ``{key}.png``) and ``{key}.cls`` its label in ASCII.
``iat.data.make_shards`` writes it. ``ShardReader`` (layout ``shards``, registered below and
detected by ``classes.txt`` beside ``train-000000.tar``) lists the members from the tar headers
and reads each image by its offset in its shard, so the data server and the local loader sample
them exactly as they sample image folders. Listing checks what reading later trusts: a plain
(uncompressed) tar, whole up to its end-of-archive block, whose image and label members are
regular files, and labels of at most ``MAX_LABEL_BYTES`` that are classes of ``classes.txt``.
"""

from __future__ import annotations

import bisect
import re
import tarfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from iat.data.layouts import (
    IMAGE_EXTENSIONS,
    DataError,
    Sample,
    register_layout,
    tar_member_path,
    tar_of,
)

SHARD_CLASSES = "classes.txt"  # the class list of a sharded data folder


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class ShardReader:
    """A sharded data folder: ``classes.txt`` and ``<split>-NNNNNN.tar`` files."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._samples: dict[str, list[Sample]] = {}

    def _shards(self, split: str) -> list[Path]:
        return sorted(self.root.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))

    def has_split(self, split: str) -> bool:
        return bool(self._shards(split))

    def classes(self) -> list[str]:
        path = self.root / SHARD_CLASSES
        try:
            return [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as err:
            raise DataError(f"cannot read the class list {path}: {err}") from None

    def named_classes(self, split: str) -> list[str] | None:
        return self.classes() if self.has_split(split) else None

    def samples(self, split: str) -> list[Sample]:
        if split not in self._samples:
            num_classes = len(self.classes())
            shards = self._shards(split)
            samples = [s for shard in shards for s in _list_shard(shard, num_classes)]
            if not samples:
                raise DataError(f"{self.root} has no {split} shards ({shard_name(split, 0)}, ...)")
            self._samples[split] = samples
        return self._samples[split]

    def split(self, split: str) -> tuple[list[Sample], list[str]]:
        return self.samples(split), self.classes()


MAX_LABEL_BYTES = 32  # a ``.cls`` member's size: a label in ASCII (make_shards writes no more)
_LABEL = re.compile(rb"\s*(\d+)\s*")
# Shards are plain tar files: tarfile would inflate these transparently (a bomb, unbounded).
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"(\xb5/\xfd": "zstd"}


def _kind(member: tarfile.TarInfo) -> str | None:
    """What a member of an image or label name is when it is not a regular file's bytes."""
    if member.issparse():
        return "sparse file"  # its stored bytes are not the file's: make_shards writes none
    if member.isfile():
        return None
    kinds = {"issym": "symbolic link", "islnk": "hard link", "isdir": "directory"}
    return next((name for test, name in kinds.items() if getattr(member, test)()), "special file")


def _label(shard: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, num_classes: int) -> int:
    """The label of a ``.cls`` member, its size bounded before reading and its value a class."""
    text = b""
    if member.size <= MAX_LABEL_BYTES:
        text = tar.extractfile(member).read(MAX_LABEL_BYTES)
    match = _LABEL.fullmatch(text)
    if match is None or int(match[1]) >= num_classes:
        shown = (
            f"{member.size:,} bytes"
            if member.size > MAX_LABEL_BYTES
            else repr(text.decode(errors="replace"))
        )
        raise DataError(
            f"shard {shard}: member {member.name} is not a label 0 .. {num_classes - 1} "
            f"({SHARD_CLASSES} lists {num_classes} classes): {shown:.60}"
        )
    return int(match[1])


def _list_members(
    shard: Path, tar: tarfile.TarFile, num_classes: int
) -> tuple[dict[str, str], dict[str, int]]:
    images, labels = {}, {}
    for member in tar:
        key, extension = (member.name.rsplit(".", 1) + [""])[:2]
        is_label = extension == "cls"
        if not is_label and f".{extension.lower()}" not in IMAGE_EXTENSIONS:
            continue
        kind = _kind(member)
        if kind is not None:
            raise DataError(f"shard {shard}: member {member.name} is a {kind}, not a regular file")
        found = labels if is_label else images
        if key in found:
            raise DataError(f"shard {shard}: two {'labels' if is_label else 'images'} of key {key}")
        if is_label:
            labels[key] = _label(shard, tar, member, num_classes)
        else:
            images[key] = tar_member_path(shard, member.name, member.offset_data, member.size)
    return images, labels


def _check_end(shard: Path, f: BinaryIO, offset: int, members: int) -> None:
    """tarfile stops without a word at a header cut short or damaged after the first: the end of
    a whole archive is a zero block."""
    f.seek(offset)
    if f.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
        raise DataError(
            f"shard {shard} is truncated or damaged at byte {offset:,}, after {members} "
            "members (no end-of-archive block)"
        )


def _list_shard(shard: Path, num_classes: int) -> list[Sample]:
    """``(member reference, label)`` of each image of one shard, from its headers and labels."""
    if not shard.is_file():
        raise DataError(f"shard {shard} is not a regular file")
    try:
        with shard.open("rb") as f:
            magic = f.read(6)
            compressed = [name for head, name in _COMPRESSED.items() if magic.startswith(head)]
            if compressed:
                raise DataError(
                    f"shard {shard} is {compressed[0]}-compressed: shards are plain tar files"
                )
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r:") as tar:
                images, labels = _list_members(shard, tar, num_classes)
                _check_end(shard, f, tar.offset, len(tar.members))
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"cannot read shard {shard}: {err}") from None
    if images.keys() != labels.keys():
        raise DataError(f"shard {shard}: images and .cls labels do not pair up")
    return [(images[key], labels[key]) for key in sorted(images)]


def is_sharded(root: Path) -> bool:
    """Whether the data folder `root` has the shard layout."""
    return (root / SHARD_CLASSES).is_file() and any(root.glob("*-000000.tar"))


register_layout("shards", ShardReader, is_sharded)


class HostShardSchedule:
    """Machine `host`'s batches when the training set is sharded (``EpochSchedule``'s interface).

    Every epoch the shards are dealt out anew: shuffled by ``(seed, epoch)``, machine h takes
    every `hosts`-th from the h-th, so the machines read disjoint shards; the images of its
    shards are then shuffled by ``(seed, epoch, h)``. Global batch ``h + k * hosts`` (the data
    server's numbering, see ``--host-index``) is its k-th batch."""

    def __init__(self, shards: list[str], batch: int, seed: int, hosts: int, host: int) -> None:
        names = sorted(set(shards))
        if len(names) < hosts:
            raise DataError(f"{len(names)} training shards cannot be shared by {hosts} hosts")
        index = {name: i for i, name in enumerate(names)}
        self.members = [[] for _ in names]  # sample indices of each shard
        for i, name in enumerate(shards):
            self.members[index[name]].append(i)
        self.batch, self.seed, self.hosts, self.host = batch, seed, hosts, host
        self._starts = [0]  # where each epoch begins in this host's stream (epochs' lengths vary)
        self._orders: dict[int, np.ndarray] = {}  # the latest epochs' sample orders

    def shards_of(self, epoch: int) -> list[int]:
        """The shards this host reads in `epoch`."""
        order = np.random.default_rng([self.seed, 3, epoch]).permutation(len(self.members))
        return sorted(order[self.host :: self.hosts].tolist())

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            mine = np.concatenate([self.members[s] for s in self.shards_of(epoch)])
            rng = np.random.default_rng([self.seed, 4, epoch, self.host])
            self._orders[epoch] = mine[rng.permutation(len(mine))]
        return self._orders[epoch]

    def _sample(self, position: int) -> int:
        while self._starts[-1] <= position:
            epoch = len(self._starts) - 1
            self._starts.append(
                self._starts[-1] + sum(len(self.members[s]) for s in self.shards_of(epoch))
            )
        epoch = bisect.bisect_right(self._starts, position) - 1
        return int(self._order(epoch)[position - self._starts[epoch]])

    def indices(self, batch_index: int) -> np.ndarray:
        k, rest = divmod(batch_index - self.host, self.hosts)
        if rest or k < 0:
            raise ValueError(f"batch {batch_index} is not host {self.host}'s of {self.hosts}")
        return np.array([self._sample(p) for p in range(k * self.batch, (k + 1) * self.batch)])


def host_schedule(
    samples: list[Sample], batch: int, seed: int, hosts: int, host: int
) -> HostShardSchedule | None:
    """Shard-wise schedule for machine `host` of `hosts` when `samples` are in shards; None
    (the data server's batch-wise split of one stream) otherwise or on one machine."""
    shards = [tar_of(path) for path, _ in samples]
    if hosts == 1 or None in shards:
        return None
    return HostShardSchedule(shards, batch, seed, hosts, host)
