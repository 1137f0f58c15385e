"""The shard layout (iat.data.shards): make_shards, then every reader of images reads them."""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, write_imagenet

import nets
from iat.data.augment import TRAIN_AUGMENTATIONS
from iat.data.client import ZMQBatchClient
from iat.data.layouts import (
    CorruptImageError,
    DataError,
    create_reader,
    detect_layout,
    read_image_bgr,
    tar_member_path,
)
from iat.data.make_shards import make_shards
from iat.data.sampling import TrainStream, check_eval_headers, undecodable_headers
from iat.data.shards import host_schedule
from main import main

TINY = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _run(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def sharded_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`python -m iat.data.make_shards` run once for the module: read it through `sharded`."""
    root = tmp_path_factory.mktemp("sharded")
    folder = write_imagenet(root / "imagenet")  # 12 training images, 7 validation
    out = root / "shards"
    proc = _run(["-m", "iat.data.make_shards", str(folder), str(out), "--shard-size", "5"])
    assert proc.stdout.strip() == f"train: 3 shards, val: 2 shards in {out}"
    return folder, out


@pytest.fixture
def sharded(sharded_once: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """The folder and its shards, copied for this test (a test may damage a shard)."""
    folder, out = (shutil.copytree(path, tmp_path / path.name) for path in sharded_once)
    return folder, out


def _decoded(samples: list) -> list:
    return sorted((read_image_bgr(path).tobytes(), label) for path, label in samples)


def test_shards_hold_every_image_and_label_of_the_folder(sharded) -> None:
    folder, out = sharded
    names = sorted(p.name for p in out.iterdir())
    assert names == ["classes.txt", *(f"train-00000{i}.tar" for i in range(3)),
                     "val-000000.tar", "val-000001.tar"]  # fmt: skip
    with tarfile.open(out / "train-000000.tar") as tar:
        members = tar.getnames()
        assert members[:2] == ["00000000.jpg", "00000000.cls"]
        labels = {int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name[-4:] == ".cls"}
    assert len(members) == 10 and len(labels) > 1  # the training images were shuffled
    assert detect_layout(out) == "shards"
    files, shards = create_reader(folder), create_reader(out)
    assert shards.classes() == files.classes()
    for split in ("train", "val"):
        assert _decoded(shards.samples(split)) == _decoded(files.samples(split))
    # Validation keeps its order: the same images, one for one (PNGs are not re-encoded).
    for (shard_path, a), (path, b) in zip(shards.samples("val"), files.samples("val"), strict=True):
        assert a == b and np.array_equal(read_image_bgr(shard_path), read_image_bgr(path))


def test_a_truncated_shard_is_a_corrupt_image(sharded, tmp_path: Path) -> None:
    _, out = sharded
    path, _ = create_reader(out).samples("val")[-1]
    shard = out / "val-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1024])
    with pytest.raises(CorruptImageError, match="val-000001.tar"):
        read_image_bgr(path)


def _pull(data: Path, flags: list[str], count: int = 3) -> list:
    """`count` batches of 2 from a data server of `data` (32x32, one worker)."""
    address = f"ipc://@iat-test-shards-{os.getpid()}"
    server = subprocess.Popen(
        [sys.executable, "third_party/serve-data.py", "--data", str(data), "--batch", "2",
         "--image-size", "32", "--workers", "1", "--bind", address, *flags],
        cwd=REPO, env=ENV, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with ZMQBatchClient(address, timeout_s=60, batch=2, image_size=32, num_classes=3) as c:
            return [next(c) for _ in range(count)]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_data_server_serves_shards(sharded) -> None:
    """Batches from shards are the stream over the shard reader's samples, byte for byte."""
    _, out = sharded
    received = _pull(out, [])
    samples = create_reader(out).samples("train")
    stream = TrainStream(samples, 2, 32, TRAIN_AUGMENTATIONS["fbresnet"], seed=0)
    for k, (images, labels) in enumerate(received):
        expected_images, expected_labels, _ = stream.batch(k)
        assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)


def test_training_and_evaluation_read_shards(sharded, tmp_path: Path, capsys) -> None:
    """--loader local trains from shards, evaluating on them; --eval on shards counts what it
    counts on the folder."""
    folder, out = sharded
    small = [*TINY, "--image-size", "32", "--batch", "2", "--workers", "0", "--threads", "1"]
    train = ["--data", str(out), "--logdir", str(tmp_path / "run"), *small,
             "--loader", "local", "--attack-iter", "1", "--attack-epsilon", "8",
             "--steps-per-epoch", "2", "--epochs", "1", "--train-eval", "light"]  # fmt: skip
    assert main(train) == 0  # its in-training evaluation reads the val shards (issue 33)
    assert "epoch 1 eval-10step: PGD-10" in "".join(capsys.readouterr())
    assert (tmp_path / "run" / "checkpoint-epoch0001.pt").exists()
    ckpt = tmp_path / "w.pt"
    torch.manual_seed(0)
    nets.save_weights(
        nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=3), ckpt
    )
    results = []
    for data in (folder, out):
        result = tmp_path / f"{data.name}.json"
        flags = ["--attack-iter", "2", "--attack-epsilon", "16", "--eval-output", str(result)]
        assert main(["--eval", "--load", str(ckpt), "--data", str(data), *small, *flags]) == 0
        results.append(json.loads(result.read_text()))
    for key in ("images", "top1_error", "top5_error", "attack_success_rate"):
        assert results[0][key] == results[1][key], key


def test_hosts_read_disjoint_shards_reshuffled_every_epoch(tmp_path: Path) -> None:
    """--hosts 2 on shards: every epoch each machine reads its own shards (dealt out anew), each
    of their images once."""
    out = tmp_path / "shards"
    make_shards(str(write_imagenet(tmp_path / "imagenet")), str(out), 2, "auto", seed=0)
    samples = create_reader(out).samples("train")  # 12 images in 6 shards
    schedules = [host_schedule(samples, 2, 0, 2, host) for host in range(2)]
    dealt = [[frozenset(s.shards_of(e)) for e in range(4)] for s in schedules]
    for epoch in range(4):
        assert not dealt[0][epoch] & dealt[1][epoch]
        assert dealt[0][epoch] | dealt[1][epoch] == set(range(6))
    assert len(set(dealt[0])) > 1, "the same shards every epoch"
    for host, schedule in enumerate(schedules):
        first_epoch = np.concatenate([schedule.indices(host + 2 * k) for k in range(3)])
        expected = [i for s in dealt[host][0] for i in schedule.members[s]]
        assert sorted(first_epoch.tolist()) == sorted(expected)  # its shards' images, once each
    assert host_schedule(samples, 2, 0, 1, 0) is None  # one machine: the one stream
    with pytest.raises(DataError, match="6 training shards cannot be shared by 7 hosts"):
        host_schedule(samples, 2, 0, 7, 0)


def test_the_data_server_of_a_host_serves_its_shards(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    make_shards(str(write_imagenet(tmp_path / "imagenet")), str(out), 2, "auto", seed=0)
    received = _pull(out, ["--hosts", "2", "--host-index", "1"])
    samples = create_reader(out).samples("train")
    schedule = host_schedule(samples, 2, 0, 2, 1)
    stream = TrainStream(samples, 2, 32, TRAIN_AUGMENTATIONS["fbresnet"], 0, schedule)
    for k, (images, labels) in enumerate(received):
        expected_images, expected_labels, _ = stream.batch(1 + 2 * k)
        assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)


def _data_imports(module: Path) -> set[str]:
    """The iat.data modules `module` imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "iat.data":
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("iat.data."):
            names.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[2] for a in node.names if a.name.startswith("iat.data.")}
    return names


def test_the_data_modules_import_one_another_without_a_cycle() -> None:
    """The shard format is one unit: layouts knows no shard module, the shard reader registers
    itself as a layout, the writer (make_shards) imports the reader."""
    graph = {p.stem: _data_imports(p) for p in (REPO / "iat" / "data").glob("*.py")}
    assert "shards" not in graph["layouts"] and "make_shards" not in graph["shards"]
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for imported in graph.get(name, ()):
                visit(imported, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())


def test_the_header_check_of_in_training_evaluation_reads_shard_members(sharded) -> None:
    """--train-eval's check before training reads a shard's members as evaluation does: the
    members of a good shard pass, an empty or non-image member is named (issue 33)."""
    _, out = sharded
    samples = create_reader(out).samples("val")
    check_eval_headers(samples, "val", skip_unreadable=False)  # no error, no OpenCV warning
    bad = out / "val-bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in (("a.jpg", b""), ("b.jpg", b"not an image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(bad) as tar:
        members = [(tar_member_path(bad, m.name, m.offset_data, m.size), 0) for m in tar]
    assert undecodable_headers(samples + members) == [path for path, _ in members]
    with pytest.raises(CorruptImageError, match="2 image"):
        check_eval_headers(samples + members, "val", skip_unreadable=False)
