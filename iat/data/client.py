"""Client side of the data server: pull ``(images, labels)`` batches from ``serve-data.py``.

Several training processes may connect to one server: ZMQ PUSH/PULL hands each batch to exactly
one of them (load balancing). A malformed message (bad header, wrong dtype or size, anything that
is not a batch, e.g. a pickle payload) is skipped and logged with its reason; it is never
interpreted. Decoded arrays are zero-copy views of the received ZMQ frames, which are writable,
so they can go straight to ``torch.from_numpy``; they are copied only when misaligned.

Given the trainer's configuration (batch, image size, number of classes), the client also refuses
labels out of range (malformed: skipped), frames larger than such a batch (ZMQ drops the
connection before allocating them; counted and logged as rejected too) and batches of another
shape (``BatchShapeMismatch``: the server was started for another configuration, which ends the
run with one clear error naming both shapes; when every frame is refused, one message read
through a probe socket with a looser bound names the server's). With no server reached after a
few seconds, a warning says so at once (and that ``--loader local`` needs none) while the client
waits out its timeout.

Shutdown never blocks: the receiver thread owns and closes the socket, ``close`` waits for it a
bounded time, and the context is terminated only once the socket is closed. Clients still open
when the interpreter exits are closed by an ``atexit`` hook, while their threads can still run.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from types import TracebackType

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from iat.data.protocol import MAX_HEADER_BYTES, ProtocolError, batch_settings, decode_batch

_LOG = logging.getLogger(__name__)
_POLL_MS = 100  # how often the receiver thread checks whether it should stop
_JOIN_S = 2.0  # how long close() waits for the receiver thread to close its socket
_RETRY_WAIT_S = 0.3  # after a dropped connection, how long ZMQ's own retry is waited for
_NOTICE_S = 3.0  # with no server reached by then, the consumer is told at once (not at timeout)
# Connections dropped this often on refused frames, with no batch between: the server sends
# larger batches. One message, read through a socket bounded by _PROBE_FRAME_BYTES, names them.
_REFUSALS_BEFORE_PROBE = 3
_PROBE_FRAME_BYTES = 1 << 28
_PROBE_MS = 2000

Batch = tuple[np.ndarray, np.ndarray]
# The flag (of serve-data.py and the trainer alike) that sets each advertised setting.
_SETTING_FLAGS = {
    "augment": "--train-augment",
    "layout": "--data-layout",
    "classes": "classes",
    "seed": "--seed",
}


class DataServerTimeout(RuntimeError):
    """No batch arrived from the data server within the client's timeout."""


class BatchShapeMismatch(ValueError):
    """The data server sends batches of another shape than this run is configured for."""


def _writable_aligned(array: np.ndarray) -> np.ndarray:
    return array if array.flags.writeable and array.flags.aligned else array.copy()


class ZMQBatchClient:
    """Iterate forever over ``(images uint8 [B, H, W, 3], labels int32 [B])`` from ``address``.

    A background thread receives and validates up to ``prefetch`` batches ahead; ``hwm`` is the
    ZMQ receive high-water mark (batches queued inside ZMQ). If no batch is available for
    ``timeout_s`` seconds the iterator raises ``DataServerTimeout``. ``batch`` and
    ``image_size``, when given, are the shape every batch must have (else ``BatchShapeMismatch``)
    and bound the size of a received frame; labels must be below ``num_classes`` when given.
    ``expect`` holds the settings (``protocol.SETTINGS``) every batch must have been made with,
    where the server advertises them (else ``BatchShapeMismatch``); ``command``, the command that
    starts the server this run expects, is what the errors and the no-server warning give.
    """

    def __init__(
        self,
        address: str,
        timeout_s: float = 60.0,
        prefetch: int = 4,
        hwm: int = 8,
        *,
        batch: int | None = None,
        image_size: int | None = None,
        num_classes: int | None = None,
        expect: Mapping[str, object] | None = None,
        command: str | None = None,
    ) -> None:
        if timeout_s <= 0 or prefetch < 1 or hwm < 1:
            raise ValueError(
                f"need timeout_s > 0, prefetch >= 1, hwm >= 1; got {timeout_s}, {prefetch}, {hwm}"
            )
        self.address = address
        self.timeout_s = timeout_s
        self.batch, self.image_size, self.num_classes = batch, image_size, num_classes
        self.expect, self.command = dict(expect or {}), command
        self.rejected = 0
        self._last_rejection = ""
        self._refused = 0  # connections dropped by ZMQ on a refused frame, then made anew
        self._refused_before = 0  # ... when the last batch arrived
        self._connected = False  # a server was reached (ZMQ's connected event)
        self._noticed = False  # the consumer was told that no server is reachable
        self._queue: queue.Queue[Batch | BaseException] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._socket = self._connect(hwm)
        # Connection drops, watched to reconnect: ZMQ does not after a refused frame.
        self._monitor = self._socket.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CONNECTED
        )
        self._lost_at: float | None = None  # when a connection dropped that ZMQ did not retry
        self._thread = threading.Thread(target=self._receive_loop, name="zmq-batch-client")
        self._thread.daemon = True
        self._thread.start()
        _OPEN_CLIENTS.add(self)

    def _max_frame_bytes(self) -> int:
        """The largest frame a batch of the expected shape has (-1: no limit, shape unknown)."""
        if self.batch is None or self.image_size is None:
            return -1
        return max(self.batch * self.image_size**2 * 3, MAX_HEADER_BYTES)

    def _connect(self, hwm: int) -> zmq.Socket:
        sock = self._context.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)
        # A larger frame is refused (and its connection dropped) before it is allocated.
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_frame_bytes())
        try:
            sock.connect(self.address)
        except zmq.ZMQError as err:
            sock.close()
            self._context.term()
            raise ValueError(
                f"cannot connect to data server address {self.address!r}: {err}"
            ) from err
        return sock

    def _receive_loop(self) -> None:
        # The sockets are used and closed by this thread only once it has started.
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(_POLL_MS))
                if self._monitor in ready:
                    self._on_connection_event(recv_monitor_message(self._monitor))
                if self._socket in ready:
                    batch = self._decode(self._socket.recv_multipart(copy=False))
                    if batch is not None:
                        self._refused_before = self._refused
                        self._put(batch)
                self._revive_connection()
                if self._refused - self._refused_before >= _REFUSALS_BEFORE_PROBE:
                    raise self._larger_batches()
        except Exception as err:  # surfaced to the consumer by __next__
            self._put(err)
        finally:
            self._monitor.close(linger=0)
            self._socket.close(linger=0)

    def _on_connection_event(self, event: dict) -> None:
        """A dropped connection is followed at once by ZMQ's own retry when the server went away,
        but not after a protocol error (e.g. a frame over ``_max_frame_bytes``)."""
        lost = event["event"] == zmq.EVENT_DISCONNECTED
        self._lost_at = time.monotonic() if lost else None
        self._connected = self._connected or event["event"] == zmq.EVENT_CONNECTED

    def _revive_connection(self) -> None:
        """Connect anew if a dropped connection has not been retried by ZMQ.

        Only then: disconnecting discards the batches already received and not yet read."""
        if self._lost_at is None or time.monotonic() - self._lost_at < _RETRY_WAIT_S:
            return
        self._lost_at = None
        self._refused += 1
        # Counted and named like any other malformed message (ZMQ itself says nothing).
        self.rejected += 1
        self._last_rejection = (
            f"a frame over {self._max_frame_bytes()} bytes, refused by ZMQ before it was "
            "allocated (the connection was made anew)"
        )
        _LOG.error("rejected a message from %s: %s", self.address, self._last_rejection)
        with contextlib.suppress(zmq.ZMQError):  # the endpoint may be gone already
            self._socket.disconnect(self.address)
        self._socket.connect(self.address)

    def _decode(self, frames: list[zmq.Frame]) -> Batch | None:
        """The message's batch, or None if it is malformed (skipped, counted, logged)."""
        try:
            images, labels, _, _ = decode_batch(frames, self.num_classes)
            settings = batch_settings(frames[0])
        except Exception as err:  # whatever one message does, the receiver goes on
            self.rejected += 1
            self._last_rejection = str(err)
            _LOG.error("rejected a malformed message from %s: %s", self.address, err)
            return None
        self._check_shape(images.shape)
        self._check_settings(settings)
        return _writable_aligned(images), _writable_aligned(labels)

    def _check_settings(self, settings: dict | None) -> None:
        """The server's advertised settings against ``expect`` (not for fake batches, which no
        setting makes; nor from a server that advertises none)."""
        if settings is None or settings.get("fake"):
            return
        differ = [
            (_SETTING_FLAGS.get(name, name), settings[name], want)
            for name, want in self.expect.items()
            if want is not None and name in settings and settings[name] != want
        ]
        if differ:
            sent = ", ".join(f"{flag} {got}" for flag, got, _ in differ)
            wanted = ", ".join(f"{flag} {want}" for flag, _, want in differ)
            raise BatchShapeMismatch(
                f"the data server at {self.address} serves batches of {sent}, but this run "
                f"trains with {wanted}: {self._start_hint()}"
            )

    def _start_hint(self) -> str:
        if self.command:
            return f"start the server with: {self.command}"
        return "start the server with the same --batch and --image-size"

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        batch, height, width, _ = shape
        size = self.image_size
        if (batch, height, width) != (self.batch or batch, size or height, size or width):
            raise self._mismatch(f"batches of {batch} images of {height}x{width}")

    def _mismatch(self, sent: str) -> BatchShapeMismatch:
        return BatchShapeMismatch(
            f"the data server at {self.address} sends {sent}, but this run is configured for"
            f" --batch {self.batch} --image-size {self.image_size}: {self._start_hint()}"
        )

    def _larger_batches(self) -> BatchShapeMismatch:
        """The error for a server whose every frame is refused: its batch shape, read from one
        message through a probe socket that accepts frames up to ``_PROBE_FRAME_BYTES``."""
        probe = self._context.socket(zmq.PULL)
        probe.setsockopt(zmq.LINGER, 0)
        probe.setsockopt(zmq.RCVHWM, 1)
        probe.setsockopt(zmq.MAXMSGSIZE, _PROBE_FRAME_BYTES)
        try:
            probe.connect(self.address)
            if probe.poll(_PROBE_MS):
                images, _, _, _ = decode_batch(probe.recv_multipart(copy=False))
                batch, height, width, _ = images.shape
                return self._mismatch(f"batches of {batch} images of {height}x{width}")
        except (zmq.ZMQError, ProtocolError) as err:
            _LOG.debug("probing %s for its batch shape failed: %s", self.address, err)
        finally:
            probe.close(linger=0)
        return self._mismatch(f"frames over {self._max_frame_bytes()} bytes (larger batches)")

    def _put(self, item: Batch | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_MS / 1000)
                return
            except queue.Full:
                continue

    def _without_server(self) -> str:
        """How to start the missing server, and how to train without one."""
        image_size = f" --image-size {self.image_size}" if self.image_size else ""
        command = self.command or (
            f"python third_party/serve-data.py --data DIR --batch {self.batch or 'B'}{image_size}"
        )
        return f"start it with: {command}, or give --loader local to read --data directly"

    def _timeout_error(self) -> DataServerTimeout:
        message = (
            f"data server at {self.address} is not answering (no batch for {self.timeout_s:g} s);"
            f" {self._without_server()}"
        )
        if self._refused:
            message += f" (the connection was dropped {self._refused} times on a refused frame)"
        if self.rejected:
            message += (
                f" ({self.rejected} malformed messages rejected, last: {self._last_rejection})"
            )
        return DataServerTimeout(message)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._stop.is_set():
            raise RuntimeError(f"ZMQBatchClient for {self.address} is closed")
        try:
            item = self._get()
        except queue.Empty:
            raise self._timeout_error() from None
        if isinstance(item, BatchShapeMismatch):
            raise item
        if isinstance(item, BaseException):
            raise RuntimeError(f"receiving from {self.address} failed: {item}") from item
        return item

    def _get(self) -> Batch | BaseException:
        """The next item within ``timeout_s`` (else ``queue.Empty``); if no server has been
        reached after ``_NOTICE_S``, a warning says so at once, and how to do without one."""
        waited = 0.0
        if not self._connected and not self._noticed:
            waited = min(_NOTICE_S, self.timeout_s)
            with contextlib.suppress(queue.Empty):
                return self._queue.get(timeout=waited)
            if not self._connected:
                self._noticed = True
                _LOG.warning(
                    "no data server is reachable at %s; waiting up to %g s for one"
                    " (--data-timeout); %s",
                    self.address,
                    self.timeout_s,
                    self._without_server(),
                )
        return self._queue.get(timeout=self.timeout_s - waited)

    def close(self) -> None:
        """Stop the receiver thread and release the socket; never blocks; safe to call twice.

        If the thread has not closed its socket in time (it is stuck, or was killed by the
        interpreter's shutdown, which also makes it look stopped), terminating the context would
        wait for that socket forever: the context is left to the process's exit instead."""
        if self._stop.is_set():
            return
        self._stop.set()
        _OPEN_CLIENTS.discard(self)
        self._thread.join(timeout=_JOIN_S)
        if not self._socket.closed:
            _LOG.warning("the receiver thread for %s did not stop; not waiting", self.address)
            return
        self._context.term()

    def __enter__(self) -> ZMQBatchClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_OPEN_CLIENTS: weakref.WeakSet[ZMQBatchClient] = weakref.WeakSet()


@atexit.register
def _close_open_clients() -> None:
    """Close the clients still open at exit (e.g. held by an error's traceback): at this point
    their threads still run; at the final garbage collection they would be frozen."""
    for client in list(_OPEN_CLIENTS):
        client.close()
