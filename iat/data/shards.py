"""The shard layout: each split as plain tar files of ``{key}.jpg`` + ``{key}.cls`` (torch-free).

    python -m iat.data.make_shards DIR OUT --shard-size N

writes ``OUT/classes.txt`` (the class names, one a line, in label order) and, for each split of
``DIR`` (any layout ``--data-layout`` reads), ``OUT/<split>-000000.tar``, ... of N images each:
member ``{key}.jpg`` is the image file's bytes as they were (another format keeps its own
extension: ``{key}.png``, so that no image is re-encoded) and ``{key}.cls`` its label in ASCII.
Training images are shuffled once (``--seed``) before sharding, so that every shard mixes the
classes; other splits keep their order. ``ShardReader`` (layout ``shards``, detected by
``classes.txt`` beside ``train-000000.tar``) lists the members from the tar headers and reads each
image by its offset in its shard, so the data server and the local loader sample them exactly as
they sample image folders.
"""

from __future__ import annotations

import argparse
import bisect
import io
import sys
import tarfile
from pathlib import Path

import numpy as np

from iat.data.layouts import (
    AUTO_LAYOUT,
    IMAGE_EXTENSIONS,
    READERS,
    SHARD_CLASSES,
    DataError,
    Sample,
    create_reader,
    detect_layout,
    shard_member_path,
    shard_of,
)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_split(samples: list[Sample], out: Path, split: str, shard_size: int) -> int:
    """Shards of `samples` in this order; returns how many were written."""
    shards = [samples[i : i + shard_size] for i in range(0, len(samples), shard_size)]
    for index, chunk in enumerate(shards):
        partial = out / f".{shard_name(split, index)}.partial"
        with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
            for offset, (path, label) in enumerate(chunk):
                key = f"{index * shard_size + offset:08d}"
                extension = Path(path).suffix.lower()
                extension = ".jpg" if extension == ".jpeg" else extension
                _add(tar, key + extension, Path(path).read_bytes())
                _add(tar, f"{key}.cls", str(label).encode())
        partial.replace(out / shard_name(split, index))
    return len(shards)


def make_shards(data: str, out: str, shard_size: int, layout: str, seed: int) -> dict[str, int]:
    """Shard every split of `data` into `out`; returns the number of shards per split."""
    if (detect_layout(data) if layout == AUTO_LAYOUT else layout) == "shards":
        raise DataError(f"{data} is sharded already")
    reader, out_dir = create_reader(data, layout), Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        if not reader.has_split(split):
            continue
        samples = list(reader.samples(split))
        if split == "train":
            order = np.random.default_rng(seed).permutation(len(samples))
            samples = [samples[i] for i in order]
        counts[split] = write_split(samples, out_dir, split, shard_size)
    (out_dir / SHARD_CLASSES).write_text("".join(f"{name}\n" for name in reader.classes()))
    return counts


class ShardReader:
    """The shard layout (``make_shards``): ``classes.txt`` and ``<split>-NNNNNN.tar`` files."""

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
            samples = [s for shard in self._shards(split) for s in _list_shard(shard)]
            if not samples:
                raise DataError(f"{self.root} has no {split} shards ({shard_name(split, 0)}, ...)")
            self._samples[split] = samples
        return self._samples[split]

    def split(self, split: str) -> tuple[list[Sample], list[str]]:
        return self.samples(split), self.classes()


def _list_shard(shard: Path) -> list[Sample]:
    """``(member reference, label)`` of each image of one shard, from its headers and labels."""
    images, labels = {}, {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                key, extension = (member.name.rsplit(".", 1) + [""])[:2]
                if extension == "cls":
                    labels[key] = int(tar.extractfile(member).read())
                elif f".{extension.lower()}" in IMAGE_EXTENSIONS:
                    images[key] = shard_member_path(
                        shard, member.name, member.offset_data, member.size
                    )
    except (OSError, tarfile.TarError, ValueError) as err:
        raise DataError(f"cannot read shard {shard}: {err}") from None
    if images.keys() != labels.keys():
        raise DataError(f"shard {shard}: images and .cls labels do not pair up")
    return [(images[key], labels[key]) for key in sorted(images)]


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
    shards = [shard_of(path) for path, _ in samples]
    if hosts == 1 or None in shards:
        return None
    return HostShardSchedule(shards, batch, seed, hosts, host)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="data folder (any --data-layout)")
    p.add_argument("out", help="output folder of the shards")
    p.add_argument("--shard-size", type=int, required=True, help="images per shard")
    folders = [name for name in READERS if name != "shards"]
    p.add_argument("--data-layout", choices=[AUTO_LAYOUT, *folders], default=AUTO_LAYOUT)
    p.add_argument("--seed", type=int, default=0, help="shuffles the training images once")
    a = p.parse_args(argv)
    if a.shard_size < 1:
        p.error("--shard-size must be positive")
    try:
        counts = make_shards(a.data, a.out, a.shard_size, a.data_layout, a.seed)
    except (DataError, OSError) as err:
        print(f"make_shards: error: {err}", file=sys.stderr)
        return 1
    print(", ".join(f"{split}: {n} shards" for split, n in counts.items()) + f" in {a.out}")
    return 0
