"""Per-machine ImageNet data server: decode + fbresnet-augment in worker processes, PUSH batches.

    python third_party/serve-data.py --data /path/to/imagenet --batch 32

Training processes on the same machine pull from it with ``iat.data.client.ZMQBatchClient``
(default address ``ipc://@imagenet-train-b<batch>``), as in the original's serve-data.py.

Design: W worker processes each build whole batches (worker k builds batches k, k+W, k+2W, ...
of an endless stream of per-epoch shuffles) and PUSH them, already encoded as raw-buffer frames,
over a private ipc socket to this main process, which re-stamps the header with its server id and
sequence number and forwards the frames zero-copy to the public PUSH socket. Which images make
up batch b, and how it is augmented, is ``iat.data.sampling``'s policy (shared with the local
loader): the stream does not depend on the number of workers. Torch is never imported.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import multiprocessing
import os
import signal
import socket
import stat
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import zmq

from iat.data.augment import TRAIN_AUGMENTATIONS
from iat.data.layouts import (
    AUTO_LAYOUT,
    READERS,
    DataError,
    Sample,
    create_reader,
    resolved_layout,
)
from iat.data.protocol import ProtocolError, decode_batch, default_address, encode_batch
from iat.data.sampling import TrainStream, fake_batch
from iat.data.shards import host_schedule
from iat.runtime.cli_help import DefaultsHelpFormatter
from iat.runtime.cpus import usable_cpus

WORKER_POLL_MS = 500  # how often a blocked worker checks that the server is still alive
MAIN_POLL_MS = 200
LINGER_MS = 30_000  # after max_batches, how long queued batches may take to be delivered
FAKE_CLASSES = 1000
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_WORKERS_S = 5.0  # all workers together: SIGTERM, then SIGKILL for those left after this
# A cleanup still running after this (the queued batches' linger, the workers' two deadlines
# and a margin) dumps its stacks and exits with status 1.
SHUTDOWN_LIMIT_S = LINGER_MS / 1000 + 2 * STOP_WORKERS_S + 10

Batch = tuple[np.ndarray, np.ndarray]  # images uint8 [B, S, S, 3], labels int32 [B]


class _Shutdown(Exception):
    """Raised by the SIGTERM/SIGINT handler to unwind the main loop."""


@dataclass(frozen=True)
class ServerConfig:
    data: str | None  # ImageNet folder with train/<wnid>/ (unused with fake)
    batch: int  # images per batch
    image_size: int  # side of the square augmented images
    augment: str  # training augmentation, a name of augment.TRAIN_AUGMENTATIONS
    layout: str  # data folder layout, a name of layouts.READERS or "auto"
    workers: int  # decoding processes
    bind: str  # public ZMQ address of the PUSH socket
    hwm: int  # send high-water mark of the public socket, in batches
    fake: bool  # serve one constant random batch instead of decoding images
    benchmark: bool  # do not send; print throughput
    seed: int  # shuffling and augmentation seed
    log_every: float  # seconds between status lines on stderr
    max_batches: int | None  # exit after this many batches (None: serve forever)
    hosts: int = 1  # data servers of the job, one per machine: each serves its share of the stream
    host_index: int = 0  # this server's place among them: global batches host_index + k * hosts


def _worker_send(sock: zmq.Socket, frames: list, parent_pid: int) -> bool:
    while not sock.poll(WORKER_POLL_MS, zmq.POLLOUT):
        if os.getppid() != parent_pid:
            return False
    sock.send_multipart(frames, copy=False)
    return True


def worker_main(worker_id: int, samples: list[Sample], cfg: ServerConfig, address: str) -> None:
    """Worker process: build batches worker_id, worker_id + W, ... and push them to ``address``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the main process's handler is inherited
    # Forked with these signals blocked (``_start_workers``): one sent meanwhile is delivered
    # now, to the handlers above, never to the inherited one.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SHUTDOWN_SIGNALS)
    cv2.setNumThreads(1)  # one process per core already; OpenCV threads would oversubscribe
    parent_pid = os.getppid()
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 1)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    transform = TRAIN_AUGMENTATIONS[cfg.augment]
    schedule = host_schedule(samples, cfg.batch, cfg.seed, cfg.hosts, cfg.host_index)
    stream = TrainStream(samples, cfg.batch, cfg.image_size, transform, cfg.seed, schedule)
    try:
        # Machines take turns along one stream: each epoch's batches are split between them,
        # so ranks on different machines never train on the same images of an epoch.
        for local_index in range(worker_id, sys.maxsize, cfg.workers):
            batch_index = cfg.host_index + local_index * cfg.hosts
            images, labels, new_corrupt = stream.batch(batch_index)
            meta = json.dumps({"corrupt": new_corrupt}).encode()
            frames = [meta, *encode_batch(images, labels, batch_index, f"worker{worker_id}")]
            if not _worker_send(sock, frames, parent_pid):
                return
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    finally:
        sock.close()
        context.term()


class Status:
    """Counters of the main process and the periodic stderr status line."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.batches = 0
        self.corrupt: dict[str, None] = {}  # distinct corrupt files, in the order reported
        self.start = self.last_log = time.monotonic()
        self.last_batches = 0

    def maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        if now - self.last_log < self.cfg.log_every and not force:
            return
        rate = (self.batches - self.last_batches) * self.cfg.batch / (now - self.last_log)
        megabytes = rate * self.cfg.image_size**2 * 3 / 1e6
        line = f"serve-data: {self.batches} batches, {rate:.1f} images/s, {megabytes:.1f} MB/s"
        if self.corrupt:
            line += f"; skipped {len(self.corrupt)} corrupt images, e.g. {next(iter(self.corrupt))}"
        print(line, file=sys.stderr, flush=True)
        self.last_log, self.last_batches = now, self.batches

    def done(self) -> bool:
        return self.cfg.max_batches is not None and self.batches >= self.cfg.max_batches


def _receive_from_worker(pull: zmq.Socket, status: Status) -> Batch | None:
    frames = pull.recv_multipart(copy=False)
    try:
        meta = json.loads(frames[0].bytes)
        images, labels, _, _ = decode_batch(frames[1:])
        corrupt = meta["corrupt"]
        if not isinstance(corrupt, list):
            raise ProtocolError(f"bad corrupt-file list {corrupt!r:.100}")
    except (ValueError, KeyError, TypeError) as err:  # ProtocolError is a ValueError
        print(f"serve-data: dropped a malformed internal message: {err}", file=sys.stderr)
        return None
    status.corrupt.update((str(path), None) for path in corrupt)
    return images, labels


def _check_workers(workers: list[multiprocessing.Process]) -> None:
    for proc in workers:
        if not proc.is_alive():
            raise RuntimeError(f"worker {proc.name} died (exit code {proc.exitcode})")


def _next_batch(pull: zmq.Socket | None, fake: Batch | None, status: Status) -> Batch | None:
    if fake is not None:
        return fake
    if pull.poll(MAIN_POLL_MS, zmq.POLLIN):
        return _receive_from_worker(pull, status)
    return None


def run_loop(
    cfg: ServerConfig,
    pull: zmq.Socket | None,
    push: zmq.Socket | None,
    fake: Batch | None,
    workers: list[multiprocessing.Process],
    settings: dict | None = None,
) -> None:
    """Move batches from the workers (or the fake batch) to the public socket until done, each
    header advertising `settings` (``protocol.SETTINGS``)."""
    status = Status(cfg)
    server_id = f"{socket.gethostname()}:{os.getpid()}"
    frames = None
    while not status.done():
        if frames is None:
            batch = _next_batch(pull, fake, status)
            frames = (
                None if batch is None else encode_batch(*batch, status.batches, server_id, settings)
            )
        if frames is not None and (push is None or push.poll(MAIN_POLL_MS, zmq.POLLOUT)):
            if push is not None:
                push.send_multipart(frames, copy=False)
            status.batches += 1
            frames = None
        _check_workers(workers)
        status.maybe_log()
    status.maybe_log(force=True)


def _start_workers(
    cfg: ServerConfig, samples: list[Sample], address: str
) -> list[multiprocessing.Process]:
    # fork: the sample list is shared copy-on-write; no ZMQ context exists yet in this process.
    ctx = multiprocessing.get_context("fork")
    workers = [
        ctx.Process(target=worker_main, args=(k, samples, cfg, address), name=f"worker{k}")
        for k in range(cfg.workers)
    ]
    for proc in workers:
        proc.daemon = True
        proc.start()
    return workers


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGTERM and SIGINT held back (delivered once the block ends): for the forks (a worker
    inherits the main process's handler until worker_main resets it and unblocks them) and for
    the cleanup (which a signal must not cut short)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop_workers(workers: list[multiprocessing.Process]) -> None:
    """SIGTERM to every worker, SIGKILL to those alive after ``STOP_WORKERS_S`` (one deadline
    for all of them, not one per worker); each is reaped."""
    for proc in workers:
        proc.terminate()
    deadline = time.monotonic() + STOP_WORKERS_S
    for proc in workers:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in workers:
        if proc.is_alive():
            proc.kill()
    for proc in workers:
        proc.join(timeout=STOP_WORKERS_S)  # SIGKILL cannot be refused: at once


def _listening(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket file ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:  # the file outlived its server (e.g. SIGKILL)
            return False
    return True


def _claim_ipc_path(address: str) -> None:
    """Refuse a filesystem ipc address another process listens on; remove a stale socket file.

    ZMQ would unlink the file and bind silently, stealing the address from a running server
    (abstract ``ipc://@name`` addresses are refused by the kernel instead)."""
    if not address.startswith("ipc://") or address.startswith("ipc://@"):
        return
    path = address[len("ipc://") :]
    try:
        if not os.path.lexists(path):
            return
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise RuntimeError(f"cannot bind {address}: {path} exists and is not a socket")
        if _listening(path):
            raise RuntimeError(f"cannot bind {address}: address in use (a process listens on it)")
        os.unlink(path)
    except OSError as err:
        raise RuntimeError(f"cannot bind {address}: {err}") from err


def _open_public(context: zmq.Context, cfg: ServerConfig) -> zmq.Socket | None:
    if cfg.benchmark:
        return None
    _claim_ipc_path(cfg.bind)
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, cfg.hwm)
    push.setsockopt(zmq.LINGER, 0)
    try:
        push.bind(cfg.bind)
    except zmq.ZMQError as err:
        push.close()
        raise RuntimeError(f"cannot bind {cfg.bind}: {err}") from err
    return push


def advertised(cfg: ServerConfig, classes: int) -> dict:
    """What this server's batches are made with besides their shape (``protocol.SETTINGS``),
    sent in every header for the trainer to compare with its own settings."""
    layout = cfg.layout if cfg.fake else resolved_layout(cfg.data, cfg.layout)
    return {
        "augment": cfg.augment,
        "layout": layout,
        "classes": classes,
        "seed": cfg.seed,
        "fake": cfg.fake,
    }


def serve(cfg: ServerConfig, samples: list[Sample], classes: int = FAKE_CLASSES) -> None:
    """Run the server until SIGTERM/SIGINT or ``max_batches``; workers are always reaped.
    `classes`: the class count of --data (advertised)."""
    internal = f"ipc://@serve-data-{os.getpid()}-{uuid.uuid4().hex}"
    workers: list[multiprocessing.Process] = []
    context = pull = push = None
    try:
        with _signals_blocked():  # a signal meanwhile arrives once `workers` can be stopped
            workers = [] if cfg.fake else _start_workers(cfg, samples, internal)
        context = zmq.Context()
        if not cfg.fake:
            pull = context.socket(zmq.PULL)
            pull.setsockopt(zmq.RCVHWM, 2 * cfg.workers)
            pull.bind(internal)
        push = _open_public(context, cfg)
        fake = fake_batch(cfg.batch, cfg.image_size, FAKE_CLASSES, cfg.seed) if cfg.fake else None
        share = f" (host {cfg.host_index} of {cfg.hosts})" * (cfg.hosts > 1)
        print(f"serve-data: serving on {cfg.bind}{share}", file=sys.stderr, flush=True)
        run_loop(cfg, pull, push, fake, workers, advertised(cfg, classes))
        if push is not None:
            push.close(linger=LINGER_MS)  # deliver the batches still queued (max_batches)
    finally:
        _clean_up(workers, context)


def _clean_up(workers: list[multiprocessing.Process], context: zmq.Context | None) -> None:
    """Reap the workers and close every socket, uninterrupted and bounded: a signal arriving
    meanwhile waits until it is done, and a cleanup that still hangs after
    ``SHUTDOWN_LIMIT_S`` dumps every thread's stack and exits with status 1."""
    with _signals_blocked():
        faulthandler.dump_traceback_later(SHUTDOWN_LIMIT_S, exit=True)
        try:
            _stop_workers(workers)
            if context is not None:
                context.destroy(linger=0)  # closes the sockets left open, then terminates
        finally:
            faulthandler.cancel_dump_traceback_later()


def _positive(kind: type) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> ServerConfig:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--data", help="ImageNet folder containing train/<wnid>/*.JPEG")
    p.add_argument("--batch", type=_positive(int), required=True, help="images per batch")
    p.add_argument("--image-size", type=_positive(int), default=224, help="output side")
    p.add_argument(
        "--train-augment",
        choices=sorted(TRAIN_AUGMENTATIONS),
        default="fbresnet",
        help="augmentation",
    )
    p.add_argument(
        "--data-layout",
        choices=[AUTO_LAYOUT, *READERS],
        default=AUTO_LAYOUT,
        help="layout of --data (auto: tiny-imagenet if wnids.txt, else imagenet)",
    )
    default_workers = max(1, usable_cpus() - 1)  # all usable cores but one
    p.add_argument(
        "--workers", type=_positive(int), default=default_workers, help="decoding processes"
    )
    p.add_argument("--bind", help="ZMQ address (default ipc://@imagenet-train-b<batch>)")
    p.add_argument("--hwm", type=_positive(int), default=150, help="send queue, in batches")
    p.add_argument("--fake", action="store_true", help="serve a constant random batch")
    p.add_argument("--benchmark", action="store_true", help="do not send; print throughput")
    p.add_argument("--seed", type=int, default=0, help="seeds shuffling and augmentation")
    p.add_argument("--log-every", type=_positive(float), default=60.0, help="seconds")
    p.add_argument("--max-batches", type=_positive(int), help="exit after sending N batches")
    p.add_argument(
        "--hosts", type=_positive(int), default=1, help="data servers of the job, one per machine"
    )
    p.add_argument("--host-index", type=int, default=0, help="this machine's, 0 .. --hosts - 1")
    a = p.parse_args(argv)
    if not a.fake and not a.data:
        p.error("--data is required unless --fake is given")
    if not 0 <= a.host_index < a.hosts:
        p.error(f"--host-index {a.host_index} is not in 0 .. {a.hosts - 1} (--hosts {a.hosts})")
    return ServerConfig(
        data=a.data,
        batch=a.batch,
        image_size=a.image_size,
        augment=a.train_augment,
        layout=a.data_layout,
        workers=a.workers,
        bind=a.bind or default_address(a.batch),
        hwm=a.hwm,
        fake=a.fake,
        benchmark=a.benchmark,
        seed=a.seed,
        log_every=a.log_every,
        max_batches=a.max_batches,
        hosts=a.hosts,
        host_index=a.host_index,
    )


def _raise_shutdown(signum: int, frame: object) -> None:
    # Once: a second signal (an impatient Ctrl-C, a launcher's repeated SIGTERM) must not
    # interrupt the cleanup the first one started. A Python no-op rather than SIG_IGN: a signal
    # already caught by the C handler would otherwise raise "ignored due to race condition".
    for other in SHUTDOWN_SIGNALS:
        signal.signal(other, _ignore)
    raise _Shutdown(signal.Signals(signum).name)


def _ignore(signum: int, frame: object) -> None:
    """The handler once shutting down: the shutdown under way is not started again."""


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        reader = None if cfg.fake else create_reader(cfg.data, cfg.layout)
        samples = reader.samples("train") if reader else []
        classes = len(reader.classes()) if reader else FAKE_CLASSES
        if samples:  # fewer shards than hosts: said here once, not by every worker as it dies
            host_schedule(samples, cfg.batch, cfg.seed, cfg.hosts, cfg.host_index)
    except DataError as err:
        print(f"serve-data: error: {err}", file=sys.stderr)
        return 1
    for signum in SHUTDOWN_SIGNALS:  # SIGINT may arrive ignored (background job)
        signal.signal(signum, _raise_shutdown)
    try:
        serve(cfg, samples, classes)
    except _Shutdown:
        print("serve-data: shutting down", file=sys.stderr)
        # Done: a signal still arriving stays pending until exit, rather than ending the
        # interpreter (its handlers are the defaults again while it finalizes) with its status.
        signal.pthread_sigmask(signal.SIG_BLOCK, SHUTDOWN_SIGNALS)
    except (RuntimeError, zmq.ZMQError) as err:
        print(f"serve-data: error: {err}", file=sys.stderr)
        return 1
    return 0
