"""Client side of the data server: pull ``(images, labels)`` batches from ``serve-data.py``.

Several training processes may connect to one server: ZMQ PUSH/PULL hands each batch to exactly
one of them (load balancing). A malformed message (bad header, wrong dtype or size, anything that
is not a batch, e.g. a pickle payload) is skipped and logged with its reason; it is never
interpreted. Decoded arrays are zero-copy views of the received ZMQ frames, which are writable,
so they can go straight to ``torch.from_numpy``; they are copied only when misaligned.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from types import TracebackType

import numpy as np
import zmq

from iat.data.protocol import ProtocolError, decode_batch

_LOG = logging.getLogger(__name__)
_POLL_MS = 100  # how often the receiver thread checks whether it should stop

Batch = tuple[np.ndarray, np.ndarray]


class DataServerTimeout(RuntimeError):
    """No batch arrived from the data server within the client's timeout."""


def _writable_aligned(array: np.ndarray) -> np.ndarray:
    return array if array.flags.writeable and array.flags.aligned else array.copy()


class ZMQBatchClient:
    """Iterate forever over ``(images uint8 [B, H, W, 3], labels int32 [B])`` from ``address``.

    A background thread receives and validates up to ``prefetch`` batches ahead; ``hwm`` is the
    ZMQ receive high-water mark (batches queued inside ZMQ). If no batch is available for
    ``timeout_s`` seconds the iterator raises ``DataServerTimeout``.
    """

    def __init__(
        self, address: str, timeout_s: float = 60.0, prefetch: int = 4, hwm: int = 8
    ) -> None:
        if timeout_s <= 0 or prefetch < 1 or hwm < 1:
            raise ValueError(
                f"need timeout_s > 0, prefetch >= 1, hwm >= 1; got {timeout_s}, {prefetch}, {hwm}"
            )
        self.address = address
        self.timeout_s = timeout_s
        self.rejected = 0
        self._last_rejection = ""
        self._queue: queue.Queue[Batch | BaseException] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._socket = self._connect(hwm)
        self._thread = threading.Thread(target=self._receive_loop, name="zmq-batch-client")
        self._thread.daemon = True
        self._thread.start()

    def _connect(self, hwm: int) -> zmq.Socket:
        sock = self._context.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)
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
        # The socket is used and closed by this thread only once it has started.
        try:
            while not self._stop.is_set():
                if self._socket.poll(_POLL_MS, zmq.POLLIN):
                    batch = self._decode(self._socket.recv_multipart(copy=False))
                    if batch is not None:
                        self._put(batch)
        except Exception as err:  # surfaced to the consumer by __next__
            self._put(err)
        finally:
            self._socket.close(linger=0)

    def _decode(self, frames: list[zmq.Frame]) -> Batch | None:
        try:
            images, labels, _, _ = decode_batch(frames)
        except ProtocolError as err:
            self.rejected += 1
            self._last_rejection = str(err)
            _LOG.error("rejected a malformed message from %s: %s", self.address, err)
            return None
        return _writable_aligned(images), _writable_aligned(labels)

    def _put(self, item: Batch | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_MS / 1000)
                return
            except queue.Full:
                continue

    def _timeout_error(self) -> DataServerTimeout:
        message = (
            f"data server at {self.address} is not answering (no batch for {self.timeout_s:g} s);"
            " start it with: python third_party/serve-data.py --data DIR --batch B"
        )
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
            item = self._queue.get(timeout=self.timeout_s)
        except queue.Empty:
            raise self._timeout_error() from None
        if isinstance(item, BaseException):
            raise RuntimeError(f"receiving from {self.address} failed: {item}") from item
        return item

    def close(self) -> None:
        """Stop the receiver thread and release the socket; safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
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
