"""Two hosts on one machine: `torchrun --nnodes 2` across two network namespaces.

Each namespace is a host: its own loopback, so its own abstract-socket space and its own data
server at the default ipc address; the two are joined by a veth pair with link-local addresses
(169.254.0.0/16, never a real network's). The file system is shared, as a cluster's is. The
namespaces are removed after the tests (on failure too); where `ip netns` is not permitted the
tests are skipped. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, check_ranks_trained_alike, write_imagenet

import nets
from iat.data.augment import TRAIN_AUGMENTATIONS
from iat.data.client import ZMQBatchClient
from iat.data.layouts import create_reader
from iat.data.sampling import TrainStream

pytestmark = pytest.mark.hosts

RDZV_PORT = 29400
TINY = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8"]
SMALL = [*TINY, "--image-size", "32", "--batch", "2"]


@dataclass(frozen=True)
class Host:
    """A network namespace with one end of the veth pair."""

    namespace: str
    interface: str
    address: str

    def start(self, cmd: list[str], log: Path) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
            env.pop(name, None)
        # Gloo binds to the address of the host name, a loopback one on Debian (127.0.1.1):
        # name the interface that joins the hosts instead, as on a real cluster.
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=self.interface)
        with log.open("ab") as out:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, *cmd], cwd=REPO, env=env,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def kill_all(self) -> None:
        """SIGKILL every process of the namespace."""
        pids = _ip("netns", "pids", self.namespace, check=False).split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    def link(self, state: str) -> None:
        _ip("-n", self.namespace, "link", "set", self.interface, state)


def _ip(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def _remove(hosts: list[Host]) -> None:
    for host in hosts:
        host.kill_all()
    for host in hosts:
        _ip("netns", "del", host.namespace, check=False)  # takes its end of the veth along


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Host, Host]]:
    if shutil.which("ip") is None:
        pytest.skip("`ip` is not installed (Debian: apt-get install iproute2)")
    tag = f"{os.getpid() % 100000}"
    a = Host(f"iat-{tag}-a", f"iat{tag}a", "169.254.77.1")
    b = Host(f"iat-{tag}-b", f"iat{tag}b", "169.254.77.2")
    try:
        _ip("netns", "add", a.namespace)
    except RuntimeError as error:
        pytest.skip(f"network namespaces are not permitted here ({error})")
    try:
        _ip("netns", "add", b.namespace)
        _ip("link", "add", a.interface, "type", "veth", "peer", "name", b.interface)
        for host in (a, b):
            _ip("link", "set", host.interface, "netns", host.namespace)
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            host.link("up")
        yield a, b
    finally:
        _remove([a, b])
        _ip("link", "del", a.interface, check=False)  # if setup stopped before the move


@pytest.fixture
def pair(hosts: tuple[Host, Host]) -> Iterator[tuple[Host, Host]]:
    """The hosts, with no process of this test left on them afterwards."""
    yield hosts
    for host in hosts:
        host.kill_all()
        host.link("up")


def _torchrun(host: Host, hosts: tuple[Host, Host], run_id: str) -> list[str]:
    rdzv = hosts[0]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{rdzv.address}:{RDZV_PORT}",
        "--rdzv-id", run_id, "--rdzv-conf", f"is_host={int(host is rdzv)}",
        "--local-addr", host.address, "--max-restarts", "0",
    ]  # fmt: skip


def _run_on_both(hosts, run_id: str, args: list[str], logs: Path, timeout: float) -> None:
    procs = [h.start([*_torchrun(h, hosts, run_id), *args], logs / f"{run_id}-{i}.log")
             for i, h in enumerate(hosts)]  # fmt: skip
    deadline = time.monotonic() + timeout
    for i, proc in enumerate(procs):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{run_id} on host {i} still running after {timeout:g} s:\n"
                        + _tail(logs / f"{run_id}-{i}.log"))  # fmt: skip
        assert proc.returncode == 0, f"host {i}:\n{_tail(logs / f'{run_id}-{i}.log')}"


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def _served(log: Path) -> int:
    counts = re.findall(r"serve-data: (\d+) batches", log.read_text())
    return int(counts[-1]) if counts else 0


def test_host_data_servers_serve_their_shares_of_one_stream(tmp_path: Path) -> None:
    """--hosts 2: host i's server sends global batches i, i + 2, i + 4, ... of the one training
    stream, so each epoch's images are split between the machines (no namespaces needed)."""
    data = write_imagenet(tmp_path / "imagenet")  # 12 training images: 6 batches of 2 an epoch
    addresses = [f"ipc://@iat-test-{os.getpid()}-host{i}" for i in range(2)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    servers = [
        subprocess.Popen(
            [sys.executable, "third_party/serve-data.py", "--data", str(data), "--batch", "2",
             "--image-size", "32", "--workers", "1", "--hosts", "2", "--host-index", str(i),
             "--bind", address],
            cwd=REPO, env=env, stderr=subprocess.DEVNULL,
        )
        for i, address in enumerate(addresses)
    ]  # fmt: skip
    try:
        received = []
        for address in addresses:
            with ZMQBatchClient(address, timeout_s=60, batch=2, image_size=32, num_classes=3) as c:
                received.append([next(c) for _ in range(3)])
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
    samples = create_reader(data).samples("train")
    stream = TrainStream(samples, 2, 32, TRAIN_AUGMENTATIONS["fbresnet"], seed=0)
    images_of = []
    for host, batches in enumerate(received):
        for k, (images, labels) in enumerate(batches):
            expected_images, expected_labels, _ = stream.batch(host + 2 * k)
            assert np.array_equal(images, expected_images), (host, k)
            assert np.array_equal(labels, expected_labels), (host, k)
        indices = [stream.schedule.indices(host + 2 * k) for k in range(3)]
        images_of.append(set(np.concatenate(indices).tolist()))
    assert not images_of[0] & images_of[1] and len(images_of[0] | images_of[1]) == 12


def test_two_hosts_train_together_each_from_its_own_data_server(pair, tmp_path: Path) -> None:
    """One rank per host, each pulling from its host's server at the same default address (its
    share of the stream); after the steps both ranks hold the same weights, and they moved."""
    data = write_imagenet(tmp_path / "imagenet")
    servers = [
        host.start(
            [sys.executable, "third_party/serve-data.py", "--data", str(data), "--batch", "2",
             "--image-size", "32", "--workers", "1", "--log-every", "0.5", "--hosts", "2",
             "--host-index", str(i)],
            tmp_path / f"server{i}.log",
        )
        for i, host in enumerate(pair)
    ]  # fmt: skip
    flags = [
        "--data", str(data), "--logdir", str(tmp_path / "run"), *SMALL, "--attack-iter", "2",
        "--attack-epsilon", "8", "--steps-per-epoch", "3", "--epochs", "1", "--train-eval", "none",
    ]  # fmt: skip
    _run_on_both(pair, "train", ["tests/train_worker.py", str(tmp_path), *flags], tmp_path, 240)
    time.sleep(1.0)  # a last status line from each server
    for server in servers:
        assert server.poll() is None, "a data server stopped"
    for i in range(2):  # the rank of host i is its server's only possible client
        log = tmp_path / f"server{i}.log"
        assert f"serving on ipc://@imagenet-train-b2 (host {i} of 2)" in log.read_text()
        assert _served(log) >= 3, _tail(log)

    check_ranks_trained_alike(tmp_path)  # the same weights on both hosts, moved
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["run"]["world_size"], config["run"]["launcher"]) == (2, "torchrun")


def test_two_hosts_evaluate_each_image_once(pair, tmp_path: Path) -> None:
    """--eval on two hosts counts exactly what one process counts."""
    data = write_imagenet(tmp_path / "imagenet")
    ckpt = tmp_path / "w.pt"
    torch.manual_seed(0)
    nets.save_weights(
        nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=3), ckpt
    )
    flags = [
        "main.py", "--eval", "--load", str(ckpt), "--data", str(data), *SMALL, "--workers", "0",
        "--attack-iter", "2", "--attack-epsilon", "16",
    ]  # fmt: skip
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, *flags, "--eval-output", str(one)], cwd=REPO, env=env, check=True,
        capture_output=True, timeout=180,
    )  # fmt: skip
    _run_on_both(pair, "eval", [*flags, "--eval-output", str(two)], tmp_path, 240)
    results = [json.loads(path.read_text()) for path in (one, two)]
    assert [r["world_size"] for r in results] == [1, 2]
    for key in ("images", "top1_error", "top5_error", "attack_success_rate"):
        assert results[0][key] == results[1][key], key
    assert results[1]["images"] == 7


def test_a_dead_host_is_named_within_the_collective_timeout(pair, tmp_path: Path) -> None:
    """Host B vanishes mid-training (its link goes down, its processes are killed: no FIN, no
    RST); host A's rank names rank 1 within --collective-timeout and its torchrun exits."""
    data = write_imagenet(tmp_path / "imagenet")
    logdir, timeout_s = tmp_path / "run", 10
    flags = [
        "main.py", "--data", str(data), "--logdir", str(logdir), *SMALL, "--loader", "local",
        "--workers", "0", "--attack-iter", "1", "--attack-epsilon", "8", "--steps-per-epoch",
        "2", "--epochs", "100", "--train-eval", "none", "--collective-timeout", str(timeout_s),
    ]  # fmt: skip
    host_a, host_b = pair
    logs = [tmp_path / f"host{i}.log" for i in range(2)]
    procs = [
        h.start([*_torchrun(h, pair, "dead"), *flags], log)
        for h, log in zip(pair, logs, strict=True)
    ]
    deadline = time.monotonic() + 180
    while not (logdir / "checkpoint-epoch0001.pt").exists():
        assert all(p.poll() is None for p in procs), _tail(logs[0]) + _tail(logs[1])
        assert time.monotonic() < deadline, "no checkpoint after 180 s:\n" + _tail(logs[0])
        time.sleep(0.2)

    host_b.link("down")
    host_b.kill_all()
    died = time.monotonic()
    try:
        procs[0].wait(timeout=timeout_s + 60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"host A still running {timeout_s + 60} s after host B died:\n{_tail(logs[0])}")
    elapsed = time.monotonic() - died
    output = logs[0].read_text(errors="replace")
    assert procs[0].returncode != 0
    assert re.search(r"rank 1 \(last at step \d+\) stopped answering", output), _tail(logs[0])
    assert f"after at most {timeout_s} s (--collective-timeout)" in output
    print(f"host A's torchrun exited {elapsed:.1f} s after host B died")
