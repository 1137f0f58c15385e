"""Hostile files in a data folder or a shard: one line naming them, never a huge allocation, a
hang or a traceback (README "Errors and reliability")."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import REPO, write_imagenet

from iat.data.layouts import DataError, create_reader
from iat.data.make_shards import make_shards

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
# Runs argv[1] as code with the address space capped 1 GiB above what the imports took, so that
# reading a 3 or 30 GB file whole fails with MemoryError instead of being tried.
BOUNDED = """
import resource, sys
from iat.data.layouts import CorruptImageError, DataError, create_reader, read_image_bgr
size = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:"))
limit = size * 1024 + (1 << 30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
exec(sys.argv[1])
"""


def _bounded(code: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", BOUNDED, code, *args],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """12 training images in 2 shards, 7 validation images in 2; 3 classes."""
    out = tmp_path / "shards"
    make_shards(str(write_imagenet(tmp_path / "imagenet")), str(out), 6, "auto", seed=0)
    return out


def _write_shard(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def _member(name: str, data: bytes = b"", **fields) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for field, value in fields.items():
        setattr(info, field, value)
    return info, data


def _one_image_shard(out: Path, label: tuple[tarfile.TarInfo, bytes]) -> None:
    """Replaces train-000001.tar by a shard of one image and the label member `label`."""
    image = (out / "train-000000.tar").read_bytes()[512:1024]  # any bytes: never decoded
    _write_shard(out / "train-000001.tar", [_member("00000099.jpg", image), label])


def test_a_30_gb_sparse_image_file_is_a_corrupt_image_before_it_is_read(tmp_path: Path) -> None:
    image = tmp_path / "huge.JPEG"
    image.touch()
    os.truncate(image, 30 << 30)  # no disk: a hole
    code = "try: read_image_bgr(sys.argv[2])\nexcept CorruptImageError as e: print(e)"
    assert _bounded(code, str(image)) == (
        f"cannot read image {image}: 32,212,254,720 bytes, over the 256 MiB an image may have"
    )


def test_make_shards_refuses_a_30_gb_image_unread(tmp_path: Path) -> None:
    folder = write_imagenet(tmp_path / "imagenet")
    image = folder / "train" / "n00000" / "huge.JPEG"
    image.touch()
    os.truncate(image, 30 << 30)
    code = (
        "from iat.data.make_shards import make_shards\n"
        "try: make_shards(sys.argv[2], sys.argv[3], 100, 'auto', 0)\n"
        "except DataError as e: print(e)"
    )
    out = _bounded(code, str(folder), str(tmp_path / "shards"))
    assert (
        out
        == f"cannot read image {image}: 32,212,254,720 bytes, over the 256 MiB an image may have"
    )
    assert not list((tmp_path / "shards").iterdir())  # no partial shard left


def test_a_30_gb_image_member_of_a_shard_is_a_corrupt_image(shards: Path) -> None:
    info = tarfile.TarInfo("00000099.jpg")
    info.size = 30 << 30
    with (shards / "train-000001.tar").open("wb") as f:
        f.write(info.tobuf(tarfile.GNU_FORMAT))
        f.seek(f.tell() + info.size)  # a hole of 30 GB
        cls = _member("00000099.cls", b"1")[0]
        f.write(cls.tobuf(tarfile.GNU_FORMAT) + b"1".ljust(512, b"\0") + bytes(1024))
    code = (
        "path = create_reader(sys.argv[2]).samples('train')[-1][0]\n"
        "try: read_image_bgr(path)\nexcept CorruptImageError as e: print(e)"
    )
    out = _bounded(code, str(shards))
    assert "train-000001.tar:00000099.jpg" in out and "over the 256 MiB" in out, out


def test_a_3_gb_gnu_sparse_label_in_a_small_shard_is_refused_unread(shards: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("GNU tar writes the sparse member")
    folder = shards.parent / "members"
    folder.mkdir()
    (folder / "00000099.jpg").write_bytes(b"x")
    (folder / "00000099.cls").touch()
    os.truncate(folder / "00000099.cls", 3 << 30)
    shard = shards / "train-000001.tar"
    subprocess.run(
        ["tar", "--sparse", "--format=gnu", "-cf", str(shard), "-C", str(folder),
         "00000099.jpg", "00000099.cls"], check=True,
    )  # fmt: skip
    assert shard.stat().st_size < 100_000
    code = "try: create_reader(sys.argv[2]).samples('train')\nexcept DataError as e: print(e)"
    assert _bounded(code, str(shards)) == (
        f"shard {shard}: member 00000099.cls is a sparse file, not a regular file"
    )


def test_a_compressed_shard_is_refused(shards: Path) -> None:
    shard = shards / "train-000001.tar"
    shard.write_bytes(gzip.compress(shard.read_bytes(), compresslevel=1))
    with pytest.raises(DataError, match=f"shard {shard} is gzip-compressed: shards are plain tar"):
        create_reader(shards).samples("train")


@pytest.mark.parametrize(
    "fields, kind",
    [
        ({"type": tarfile.SYMTYPE, "linkname": "missing.cls"}, "symbolic link"),
        ({"type": tarfile.SYMTYPE, "linkname": "00000099.cls"}, "symbolic link"),  # a loop
        ({"type": tarfile.DIRTYPE}, "directory"),
        ({"type": tarfile.FIFOTYPE}, "special file"),
    ],
)
def test_a_label_member_that_is_not_a_regular_file_is_one_error(shards, fields, kind) -> None:
    _one_image_shard(shards, _member("00000099.cls", **fields))
    with pytest.raises(DataError) as err:
        create_reader(shards).samples("train")
    shard = shards / "train-000001.tar"
    assert str(err.value) == f"shard {shard}: member 00000099.cls is a {kind}, not a regular file"


@pytest.mark.parametrize("label", [b"-1", b"3", b"1e3", b"\xff", b"0" * 40])
def test_a_label_that_is_no_class_is_refused_when_listed(shards: Path, label: bytes) -> None:
    _one_image_shard(shards, _member("00000099.cls", label))
    with pytest.raises(DataError, match=r"train-000001.tar: member 00000099.cls is not a label "):
        create_reader(shards).samples("train")


def test_a_shard_cut_inside_a_header_is_refused(shards: Path) -> None:
    shard = shards / "train-000000.tar"
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        seventh = tar.getmembers()[6].offset  # 3 images and their labels before it
    shard.write_bytes(data[: seventh + 100])
    with pytest.raises(DataError, match=f"shard {shard} is truncated or damaged at byte"):
        create_reader(shards).samples("train")


def _serve(data: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "third_party/serve-data.py", "--data", str(data), "--batch", "2",
         "--image-size", "32", "--workers", "1", "--bind", f"ipc://@iat-shard-faults-{os.getpid()}",
         "--max-batches", "1", "--benchmark", *flags],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_data_server_refuses_a_bad_label_and_more_hosts_than_shards(shards: Path) -> None:
    proc = _serve(shards, "--hosts", "3")
    assert proc.returncode == 1
    assert proc.stderr == "serve-data: error: 2 training shards cannot be shared by 3 hosts\n"
    _one_image_shard(shards, _member("00000099.cls", b"-1"))
    proc = _serve(shards)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "member 00000099.cls is not a label 0 .. 2" in proc.stderr
