"""The batch wire protocol, and the real ``serve-data.py`` process with ``ZMQBatchClient``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from iat.data.client import BatchShapeMismatch, DataServerTimeout, ZMQBatchClient
from iat.data.protocol import (
    ProtocolError,
    batch_settings,
    decode_batch,
    default_address,
    encode_batch,
)
from iat.data.sources import TrainSourceSpec, server_batches

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "third_party" / "serve-data.py"
CLASSES = ("n01440764", "n01443537", "n01484850")
IMAGES_PER_CLASS = 4


# ----------------------------------------------------------------------------- wire protocol


def _frames(images: np.ndarray, labels: np.ndarray, seq: int = 3) -> list[bytes]:
    return [bytes(memoryview(f)) for f in encode_batch(images, labels, seq, "host:1")]


def test_protocol_round_trip() -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    labels = np.array([7, 999], dtype=np.int64)
    frames = _frames(images, labels, seq=11)
    header = json.loads(frames[0])
    assert header["arrays"] == [
        {"dtype": "uint8", "shape": [2, 5, 4, 3]},
        {"dtype": "int32", "shape": [2]},
    ]
    assert len(frames[1]) == images.nbytes and len(frames[2]) == 2 * 4
    out_images, out_labels, seq, server = decode_batch(frames)
    np.testing.assert_array_equal(out_images, images)
    np.testing.assert_array_equal(out_labels, labels)
    assert out_labels.dtype == np.int32 and (seq, server) == (11, "host:1")
    assert default_address(32) == "ipc://@imagenet-train-b32"


class _TouchOnUnpickle:
    """Unpickling this object would create ``marker`` (the attack the protocol must not allow)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _header(**changes: object) -> bytes:
    header = {
        "magic": "IAT-BATCH",
        "version": 1,
        "server": "s",
        "seq": 0,
        "arrays": [{"dtype": "uint8", "shape": [1, 2, 2, 3]}, {"dtype": "int32", "shape": [1]}],
    }
    header.update(changes)
    return json.dumps(header).encode()


GOOD_IMAGES, GOOD_LABELS = bytes(12), np.array([1], dtype="<i4").tobytes()
MALFORMED = {
    "too few frames": [_header(), GOOD_IMAGES],
    "too many frames": [_header(), GOOD_IMAGES, GOOD_LABELS, b""],
    "header not JSON": [b"\x80\x04not json", GOOD_IMAGES, GOOD_LABELS],
    "header a list": [b"[1, 2]", GOOD_IMAGES, GOOD_LABELS],
    "bad magic": [_header(magic="PICKLE"), GOOD_IMAGES, GOOD_LABELS],
    "bad version": [_header(version=2), GOOD_IMAGES, GOOD_LABELS],
    "bool seq": [_header(seq=True), GOOD_IMAGES, GOOD_LABELS],
    "server id not str": [_header(server=["x"]), GOOD_IMAGES, GOOD_LABELS],
    "dtype not whitelisted": [
        _header(
            arrays=[{"dtype": "object", "shape": [1, 2, 2, 3]}, {"dtype": "int32", "shape": [1]}]
        ),
        GOOD_IMAGES,
        GOOD_LABELS,
    ],
    "negative dim": [
        _header(
            arrays=[{"dtype": "uint8", "shape": [1, -2, 2, 3]}, {"dtype": "int32", "shape": [1]}]
        ),
        GOOD_IMAGES,
        GOOD_LABELS,
    ],
    "huge shape": [
        _header(
            arrays=[
                {"dtype": "uint8", "shape": [60000, 8000, 8000, 3]},
                {"dtype": "int32", "shape": [60000]},
            ]
        ),
        GOOD_IMAGES,
        GOOD_LABELS,
    ],
    "labels do not match batch": [
        _header(
            arrays=[{"dtype": "uint8", "shape": [1, 2, 2, 3]}, {"dtype": "int32", "shape": [2]}]
        ),
        GOOD_IMAGES,
        GOOD_LABELS * 2,
    ],
    "buffer shorter than shape": [_header(), GOOD_IMAGES[:-1], GOOD_LABELS],
    "negative label": [_header(), GOOD_IMAGES, np.array([-1], dtype="<i4").tobytes()],
    "oversized header": [_header(server="x" * 5000), GOOD_IMAGES, GOOD_LABELS],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_protocol_rejects_malformed(case: str) -> None:
    with pytest.raises(ProtocolError):
        decode_batch(MALFORMED[case])


def test_protocol_rejects_pickle_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_TouchOnUnpickle(marker))
    for frames in ([payload], [payload, payload, payload], [_header(), payload, GOOD_LABELS]):
        with pytest.raises(ProtocolError):
            decode_batch(frames)
    assert not marker.exists()


# ----------------------------------------------------------------------------- real processes


def _write_folder(root: Path, corrupt: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for wnid in CLASSES:
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            assert cv2.imwrite(str(root / "train" / wnid / f"{wnid}_{i}.JPEG"), pixels)
    if corrupt:
        (root / "train" / CLASSES[1] / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


@pytest.fixture()
def address() -> str:
    return f"ipc://@test-{uuid.uuid4().hex}"


Server = tuple[subprocess.Popen, Path]  # the process and the file receiving its stderr


@pytest.fixture()
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``serve-data.py`` in its own process group; the whole group is killed afterwards."""
    procs: list[subprocess.Popen] = []

    def start(*args: str, cwd: Path = REPO) -> Server:
        log_path = tmp_path / f"server{len(procs)}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), *args],
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        procs.append(proc)
        return proc, log_path

    try:
        yield start
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):  # the group may have exited
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_until(condition: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _drain(client: ZMQBatchClient, limit: int = 1000) -> list[tuple[np.ndarray, np.ndarray]]:
    batches = []
    for _ in range(limit):
        try:
            batches.append(next(client))
        except DataServerTimeout:
            return batches
    raise AssertionError(f"more than {limit} batches")


def _server_args(
    folder: Path, address: str, *extra: str, size: int = 32, workers: int = 1
) -> list[str]:
    return [
        "--data", str(folder), "--batch", "4", "--image-size", str(size),
        "--workers", str(workers), "--bind", address, "--seed", "5", *extra,
    ]  # fmt: skip


def test_serves_one_epoch_of_every_class(tmp_path: Path, address: str, start_server) -> None:
    folder = _write_folder(tmp_path / "imagenet")
    start_server(*_server_args(folder, address))
    with ZMQBatchClient(address, timeout_s=30) as client:
        batches = [next(client) for _ in range(len(CLASSES) * IMAGES_PER_CLASS // 4)]
    for images, labels in batches:
        assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
        assert labels.shape == (4,) and labels.dtype == np.int32
        assert images.flags.writeable and labels.flags.writeable
        assert images.std() > 10  # decoded noise images, not blank buffers
    # One worker serves batches in order, and the first 3 batches are one shuffled epoch.
    counts = Counter(int(y) for _, labels in batches for y in labels)
    assert counts == dict.fromkeys(range(len(CLASSES)), IMAGES_PER_CLASS)


def test_two_clients_share_exactly_max_batches(tmp_path: Path, address: str, start_server) -> None:
    folder = _write_folder(tmp_path / "imagenet")
    n = 20
    # Both clients connect before the server binds, so PUSH alternates between them; 128-px
    # batches and HWM 1 keep one client from absorbing the whole run before the other connects.
    with (
        ZMQBatchClient(address, timeout_s=2, prefetch=1, hwm=1) as a,
        ZMQBatchClient(address, timeout_s=2, prefetch=1, hwm=1) as b,
    ):
        args = _server_args(folder, address, "--max-batches", str(n), "--hwm", "1", size=128)
        server, _ = start_server(*args)
        first = [next(a), next(b)]
        got_a, got_b = _drain(a), _drain(b)
    assert server.wait(timeout=30) == 0
    assert len(got_a) + len(got_b) + len(first) == n
    assert all(images.shape == (4, 128, 128, 3) for images, _ in first + got_a + got_b)


def test_client_times_out_when_server_killed(tmp_path: Path, address: str, start_server) -> None:
    folder = _write_folder(tmp_path / "imagenet")
    server, _ = start_server(*_server_args(folder, address))
    timeout_s = 1.5
    with ZMQBatchClient(address, timeout_s=30) as client:
        next(client)
        workers = _children(server.pid)
        assert len(workers) == 1
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        client.timeout_s = timeout_s
        start = time.monotonic()
        with pytest.raises(DataServerTimeout, match=address):
            _drain_forever(client)
        elapsed = time.monotonic() - start
    assert timeout_s <= elapsed < timeout_s + 30  # prefetched batches are served first
    # The orphaned worker notices that the server is gone and exits on its own.
    assert _wait_until(lambda: not _alive(workers[0]))


def _drain_forever(client: ZMQBatchClient) -> None:
    for _ in range(1000):
        next(client)
    raise AssertionError("the killed server kept sending")


def test_corrupt_image_is_skipped_and_logged(tmp_path: Path, address: str, start_server) -> None:
    folder = _write_folder(tmp_path / "imagenet", corrupt=True)
    server, log = start_server(*_server_args(folder, address, "--log-every", "0.2"))
    with ZMQBatchClient(address, timeout_s=30) as client:
        # 13 files, 4 per batch: 8 batches cover two epochs, so the broken file is met.
        for _ in range(8):
            images, labels = next(client)
            assert images.shape == (4, 32, 32, 3) and set(labels.tolist()) <= {0, 1, 2}
        bad = str(folder / "train" / CLASSES[1] / "broken.JPEG")
        expected = f"skipped 1 corrupt images, e.g. {bad}"
        assert _wait_until(lambda: expected in log.read_text())
        next(client)  # still serving
    assert server.poll() is None


def test_malicious_message_is_skipped_not_unpickled(tmp_path: Path, address: str, caplog) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_TouchOnUnpickle(marker))
    images = np.full((2, 4, 4, 3), 9, dtype=np.uint8)
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    try:
        push.bind(address)
        with (
            caplog.at_level(logging.ERROR, logger="iat.data.client"),
            ZMQBatchClient(address, timeout_s=10) as client,
        ):
            push.send_multipart([payload])
            push.send_multipart([_header(), payload, GOOD_LABELS])
            push.send_multipart(encode_batch(images, np.array([0, 1]), 0, "test"), copy=False)
            got_images, got_labels = next(client)
            assert client.rejected == 2
    finally:
        push.close()
        context.term()
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, [0, 1])
    assert not marker.exists()
    assert sum("rejected a malformed message" in r.getMessage() for r in caplog.records) == 2


def test_missing_data_folder_fails_clearly(tmp_path: Path, address: str, start_server) -> None:
    missing = tmp_path / "no-such-imagenet"
    # Run from an unrelated directory: the script must find its package by itself.
    server, log = start_server(
        "--data", str(missing), "--batch", "4", "--bind", address, cwd=tmp_path
    )
    assert server.wait(timeout=30) == 1  # as main.py for the same mistake
    lines = log.read_text().strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "error" in lines[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_server_and_workers(
    tmp_path: Path, address: str, start_server, signum: int
) -> None:
    folder = _write_folder(tmp_path / "imagenet")
    server, _ = start_server(*_server_args(folder, address, workers=2))
    with ZMQBatchClient(address, timeout_s=30) as client:
        next(client)
        workers = _children(server.pid)
        assert len(workers) == 2
        server.send_signal(signum)
        assert server.wait(timeout=20) == 0
    assert not any(_alive(pid) for pid in workers)


def test_a_burst_of_signals_stops_the_server_once_and_cleanly(
    tmp_path: Path, address: str, start_server
) -> None:
    """Signals repeated during the cleanup (a launcher's SIGTERM then its SIGINT, an impatient
    Ctrl-C) neither cut it short nor leave a traceback: the workers are reaped, exit status 0."""
    folder = _write_folder(tmp_path / "imagenet")
    server, log = start_server(*_server_args(folder, address, workers=2))
    with ZMQBatchClient(address, timeout_s=30) as client:
        next(client)
        workers = _children(server.pid)
        started, sent = time.monotonic(), 0
        while server.poll() is None and time.monotonic() - started < 3:
            server.send_signal((signal.SIGTERM, signal.SIGINT)[sent % 2])
            sent += 1
            time.sleep(0.002)
        assert server.wait(timeout=20) == 0, log.read_text()
    assert not any(_alive(pid) for pid in workers)
    text = log.read_text()
    assert "Traceback" not in text and text.count("shutting down") == 1, text


def test_fake_benchmark_reports_throughput(address: str, start_server) -> None:
    server, log = start_server(
        "--fake", "--benchmark", "--batch", "2", "--image-size", "16", "--bind", address,
        "--max-batches", "50", "--log-every", "0.1",
    )  # fmt: skip
    assert server.wait(timeout=30) == 0
    assert "serve-data: 50 batches" in log.read_text()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity masks here")
def test_default_workers_follow_the_affinity_mask() -> None:
    """Under `taskset` or a Slurm cgroup the server may use fewer CPUs than the machine has:
    its default decoding processes (all usable CPUs but one) follow the mask."""
    code = (
        "import os\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "os.cpu_count = lambda: 64  # a large machine, of which this process may use one CPU\n"
        "from iat.data.server import parse_args\n"
        "print(parse_args(['--fake', '--batch', '1']).workers)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


def test_protocol_carries_bounded_settings() -> None:
    """A header's settings round-trip; unknown names, wrong types and long strings are refused."""
    images, labels = np.zeros((1, 2, 2, 3), np.uint8), np.zeros(1, np.int32)
    settings = {"augment": "fbresnet", "layout": "shards", "classes": 3, "seed": 0, "fake": False}
    frames = encode_batch(images, labels, 0, "s", settings)
    assert batch_settings(frames[0]) == settings
    assert batch_settings(encode_batch(images, labels, 0, "s")[0]) is None
    for bad in ({"pickle": "x"}, {"classes": "3"}, {"fake": 1}, {"augment": "x" * 65}, [1]):
        header = json.loads(frames[0])
        header["settings"] = bad
        with pytest.raises(ProtocolError, match="settings"):
            batch_settings(json.dumps(header).encode())


def _spec(augment: str, address: str, timeout_s: float, data: Path) -> TrainSourceSpec:
    return TrainSourceSpec(
        samples=None, batch=4, image_size=32, augment=augment, num_classes=len(CLASSES),
        workers=0, seed=5, rank=0, world_size=1, first_batch=0, address=address,
        timeout_s=timeout_s, pin_memory=False, data=str(data), layout="imagenet",
        classes=len(CLASSES),
    )  # fmt: skip


def test_a_server_of_another_augmentation_is_one_error_with_the_command(
    tmp_path: Path, address: str, start_server
) -> None:
    """The trainer's --train-augment pad-crop-flip against a fbresnet server: one line naming
    both and the exact command of the matching server (issue 33); with no server, the hint is
    that command too."""
    folder = _write_folder(tmp_path / "imagenet")
    command = (
        f"python third_party/serve-data.py --data {folder} --batch 4 --image-size 32 "
        "--train-augment pad-crop-flip --seed 5"
    )
    with pytest.raises(DataServerTimeout, match=f"start it with: {command}, or give"):
        next(server_batches(_spec("pad-crop-flip", address, 4, folder)))
    start_server(*_server_args(folder, address))
    with pytest.raises(BatchShapeMismatch) as err:
        next(server_batches(_spec("pad-crop-flip", address, 30, folder)))
    assert str(err.value) == (
        f"the data server at {address} serves batches of --train-augment fbresnet, but this run "
        f"trains with --train-augment pad-crop-flip: start the server with: {command}"
    )
    images, _ = next(server_batches(_spec("fbresnet", address, 30, folder)))
    assert images.shape == (4, 32, 32, 3)
    with pytest.raises(BatchShapeMismatch, match="serves batches of --seed 5, but this run trains"
                       " with --seed 6: start the server with: .* --seed 6$"):  # fmt: skip
        next(server_batches(dataclasses.replace(_spec("fbresnet", address, 30, folder), seed=6)))
