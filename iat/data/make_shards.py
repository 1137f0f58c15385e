"""Shards a data folder: each split as plain tar files of ``{key}.jpg`` + ``{key}.cls``.

    python -m iat.data.make_shards DIR OUT --shard-size N

writes ``OUT/classes.txt`` (the class names, one a line, in label order) and, for each split of
``DIR`` (any layout ``--data-layout`` reads), ``OUT/<split>-000000.tar``, ... of N images each
(the layout of ``iat.data.shards``, which reads them): no image is re-encoded. Training images
are shuffled once (``--seed``) before sharding, so that every shard mixes the classes; other
splits keep their order. Torch-free.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

import numpy as np

from iat.data.layouts import (
    AUTO_LAYOUT,
    READERS,
    DataError,
    Sample,
    create_reader,
    detect_layout,
    read_image_bytes,
)
from iat.data.shards import SHARD_CLASSES, shard_name


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_split(samples: list[Sample], out: Path, split: str, shard_size: int) -> int:
    """Shards of `samples` in this order; returns how many were written."""
    shards = [samples[i : i + shard_size] for i in range(0, len(samples), shard_size)]
    for index, chunk in enumerate(shards):
        partial = out / f".{shard_name(split, index)}.partial"
        try:
            with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
                for offset, (path, label) in enumerate(chunk):
                    key = f"{index * shard_size + offset:08d}"
                    extension = Path(path).suffix.lower()
                    extension = ".jpg" if extension == ".jpeg" else extension
                    _add(tar, key + extension, read_image_bytes(path))  # its size bounded
                    _add(tar, f"{key}.cls", str(label).encode())
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
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


if __name__ == "__main__":
    sys.exit(main())
