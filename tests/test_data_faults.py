"""Faults around the data server: a consumer that dies, hostile or mismatched batches, a server
that is killed, restarted or started twice. Real server processes and real ZMQ sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import test_data_server as served
import zmq

import iat.data.client
from iat.data.client import BatchShapeMismatch, DataServerTimeout, ZMQBatchClient
from iat.data.protocol import ProtocolError, decode_batch, encode_batch

REPO, SCRIPT = served.REPO, served.SCRIPT
address, start_server = served.address, served.start_server  # fixtures: a fresh address, servers
FAKE = ("--fake", "--batch", "2", "--image-size", "16")  # a server that starts in a second

# Pulls 3 batches through the trainer's source, then fails. The trainer holds its batch iterator
# in objects with reference cycles, freed only by the interpreter's last garbage collection.
CONSUMER = """
import atexit, sys
import iat.data.client
from iat.data.sources import TrainSourceSpec, server_batches

if sys.argv[2] == "without-atexit-hook":
    atexit.unregister(iat.data.client._close_open_clients)
spec = TrainSourceSpec(
    samples=None, batch=2, image_size=16, augment="fbresnet", num_classes=1000, workers=1,
    seed=0, rank=0, world_size=1, first_batch=0, address=sys.argv[1], timeout_s=10,
    pin_memory=False,
)

class Training:
    pass

def train():
    t = Training()
    t.itself, t.batches = t, server_batches(spec)
    for step in range(3):
        next(t.batches)
    raise RuntimeError("boom at step 3")

train()
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize("hook", ["with-atexit-hook", "without-atexit-hook"])
def test_consumer_failing_mid_stream_exits_promptly(address: str, start_server, hook: str) -> None:
    start_server(*FAKE, "--bind", address)
    start = time.monotonic()
    try:
        run = subprocess.run(
            [sys.executable, "-c", CONSUMER, address, hook],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the consumer hung at exit after its error")
    elapsed = time.monotonic() - start
    assert run.returncode == 1, run.stderr
    assert "RuntimeError: boom at step 3" in run.stderr
    assert elapsed < 10  # importing torch and 3 batches; a hung shutdown never returns


# ----------------------------------------------------------------------------- hostile messages


@pytest.fixture()
def push(address: str) -> Iterator[zmq.Socket]:
    """A PUSH socket bound at ``address``, standing in for the server."""
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 10_000)
    sock.bind(address)
    try:
        yield sock
    finally:
        sock.close()
        context.term()


def _batch(images: np.ndarray, labels: list[int]) -> list:
    return encode_batch(images, np.array(labels), 0, "test")


def _nested_header(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_deeply_nested_header_is_a_protocol_error() -> None:
    frames = [_nested_header(2000), bytes(12), bytes(4)]
    assert len(frames[0]) < 4096
    with pytest.raises(ProtocolError, match="nested too deeply"):
        decode_batch(frames)


def test_client_survives_deeply_nested_header(address: str, push: zmq.Socket) -> None:
    images = np.full((2, 4, 4, 3), 5, dtype=np.uint8)
    with ZMQBatchClient(address, timeout_s=10) as client:
        push.send_multipart([_nested_header(2000), bytes(12), bytes(4)])
        push.send_multipart(_batch(images, [0, 1]), copy=False)
        got_images, got_labels = next(client)
        assert client.rejected == 1
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, [0, 1])


def test_any_decoding_error_skips_one_message(address: str, push: zmq.Socket, monkeypatch) -> None:
    real_decode, calls = iat.data.client.decode_batch, []

    def fail_once(frames: list, num_classes: int | None) -> tuple:
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("decoding one message failed")
        return real_decode(frames, num_classes)

    monkeypatch.setattr(iat.data.client, "decode_batch", fail_once)
    images = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    with ZMQBatchClient(address, timeout_s=10) as client:
        for label in (1, 2):
            push.send_multipart(_batch(images, [label]), copy=False)
        _, labels = next(client)
        assert labels.tolist() == [2] and client.rejected == 1


def test_label_out_of_range_is_rejected(address: str, push: zmq.Socket) -> None:
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    with ZMQBatchClient(address, timeout_s=10, batch=2, image_size=4, num_classes=10) as client:
        push.send_multipart(_batch(images, [3, 100_000]), copy=False)
        push.send_multipart(_batch(images, [10, 0]), copy=False)
        push.send_multipart(_batch(images, [9, 0]), copy=False)
        _, labels = next(client)
        assert labels.tolist() == [9, 0] and client.rejected == 2
    with pytest.raises(ProtocolError, match="100000 >= 10 classes"):
        decode_batch(_batch(images, [3, 100_000]), num_classes=10)


def test_batch_of_another_shape_is_one_clear_error(address: str, push: zmq.Socket) -> None:
    images = np.zeros((7, 33, 17, 3), dtype=np.uint8)  # smaller than 4 x 32 x 32 x 3 bytes
    with ZMQBatchClient(address, timeout_s=10, batch=4, image_size=32) as client:
        push.send_multipart(_batch(images, [0] * 7), copy=False)
        with pytest.raises(BatchShapeMismatch) as err:
            next(client)
    assert isinstance(err.value, ValueError)  # the CLI's one-line user errors
    message = str(err.value)
    assert address in message and "7 images of 33x17" in message
    assert "--batch 4 --image-size 32" in message


def test_trainer_and_server_of_different_image_sizes(
    tmp_path: Path, address: str, start_server
) -> None:
    folder = served._write_folder(tmp_path / "imagenet")
    start_server("--data", str(folder), "--batch", "4", "--image-size", "16", "--workers", "1",
                 "--bind", address)  # fmt: skip
    run = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "--data", str(folder), "--logdir",
         str(tmp_path / "run"), "--arch", "ResNet", "--num-blocks", "1", "1", "1", "1",
         "--width", "8", "--image-size", "32", "--batch", "4", "--attack-iter", "1",
         "--train-eval", "none", "--loader", "server", "--data-server", address,
         "--data-timeout", "20"],
        env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]  # no traceback
    assert len(errors) == 1 and errors[0].startswith("error: the data server at " + address)
    assert "4 images of 16x16" in errors[0] and "--image-size 32" in errors[0]


# ----------------------------------------------------------------------------- memory bound

# Binds, sends one message whose header claims 1x4x4x3 with an images frame of argv[2] bytes,
# then valid batches: ZMQ drops the connection that carried the big frame and reconnects.
OVERSIZED_SENDER = """
import sys, time
import numpy as np, zmq
from iat.data.protocol import encode_batch

push = zmq.Context().socket(zmq.PUSH)
push.setsockopt(zmq.LINGER, 0)
push.bind(sys.argv[1])
header, _, labels = encode_batch(np.zeros((1, 4, 4, 3), np.uint8), np.zeros(1), 0, "big")
push.send_multipart([header, bytes(int(sys.argv[2])), labels])
good = encode_batch(np.full((1, 4, 4, 3), 7, np.uint8), np.array([3]), 1, "big")
for _ in range(400):
    push.send_multipart(good, copy=False)
    time.sleep(0.02)
"""


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def test_oversized_frame_is_refused_before_allocation(address: str) -> None:
    big = 256 << 20
    with ZMQBatchClient(address, timeout_s=10, batch=1, image_size=4, num_classes=10) as client:
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak RSS count from now
        before = _peak_rss_bytes()
        sender = subprocess.Popen([sys.executable, "-c", OVERSIZED_SENDER, address, str(big)],
                                  env=_env())  # fmt: skip
        try:
            images, labels = next(client)
        finally:
            sender.kill()
            sender.wait(timeout=10)
        growth = _peak_rss_bytes() - before
    assert images.tolist() == np.full((1, 4, 4, 3), 7).tolist() and labels.tolist() == [3]
    assert growth < big // 4, f"the client's peak memory grew by {growth >> 20} MiB"


def test_larger_server_times_out_with_a_hint(address: str, start_server) -> None:
    start_server("--fake", "--batch", "2", "--image-size", "64", "--bind", address)
    with (
        ZMQBatchClient(address, timeout_s=3, batch=2, image_size=16) as client,
        pytest.raises(DataServerTimeout) as err,
    ):
        next(client)
    message = str(err.value)
    assert "--batch 2 --image-size 16" in message and "frames over 4096 bytes" in message
    assert "the connection was dropped" in message and client.rejected >= 1


# ----------------------------------------------------------------------------- server lifecycle


def _socket_path_address(tmp_path: Path) -> str:
    return f"ipc://{tmp_path / 'data.sock'}"


def test_second_server_on_a_filesystem_path_is_refused(tmp_path: Path, start_server) -> None:
    address = _socket_path_address(tmp_path)
    first, _ = start_server(*FAKE, "--bind", address)
    with ZMQBatchClient(address, timeout_s=10) as client:
        next(client)
    second, log = start_server(*FAKE, "--bind", address)
    assert second.wait(timeout=20) == 1
    lines = log.read_text().strip().splitlines()
    assert len(lines) == 1 and "address in use" in lines[0] and address in lines[0]
    assert first.poll() is None
    with ZMQBatchClient(address, timeout_s=10) as client:  # still reaches the first server
        next(client)


@pytest.mark.parametrize("kind", ["abstract", "filesystem"])
def test_killed_server_times_out_and_restarted_one_serves(
    tmp_path: Path, address: str, start_server, kind: str
) -> None:
    address = address if kind == "abstract" else _socket_path_address(tmp_path)
    server, _ = start_server(*FAKE, "--bind", address)
    timeout_s = 3.0
    with ZMQBatchClient(address, timeout_s=timeout_s, prefetch=1, hwm=1) as client:
        next(client)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        killed = time.monotonic()
        with pytest.raises(DataServerTimeout, match="not answering") as err:
            for _ in range(100):
                next(client)
        elapsed = time.monotonic() - killed
    assert str(err.value).startswith(f"data server at {address} is not answering")
    assert timeout_s <= elapsed < timeout_s + 2
    restarted, log = start_server(*FAKE, "--bind", address)
    with ZMQBatchClient(address, timeout_s=10, batch=2, image_size=16) as client:
        images, _ = next(client)
    assert images.shape == (2, 16, 16, 3)
    assert restarted.poll() is None, log.read_text()


def test_bind_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "data.sock"
    path.write_text("precious")
    run = subprocess.run([sys.executable, str(SCRIPT), *FAKE, "--bind", f"ipc://{path}"],
                         capture_output=True, text=True, timeout=20)  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"serve-data: error: cannot bind ipc://{path}: {path} exists and is not a socket"
    ]
    assert path.read_text() == "precious"
