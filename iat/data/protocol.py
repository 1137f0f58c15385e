"""Wire format of the batches sent by ``serve-data.py`` to training processes (never pickle).

A batch is one ZMQ multipart message of exactly three frames:

0. a JSON header (at most ``MAX_HEADER_BYTES``): ``{"magic": "IAT-BATCH", "version": 1,
   "server": <server id>, "seq": <sequence number>, "arrays": [{"dtype": "uint8", "shape":
   [B, H, W, 3]}, {"dtype": "int32", "shape": [B]}], "settings": {...}}``, where the optional
   ``settings`` say what else made the batch (``SETTINGS``: augmentation, data layout, class
   count, seed, fake data), so that a trainer compares them with its own;
1. the images, raw little-endian C-order bytes of a ``uint8 [B, H, W, 3]`` array;
2. the labels, raw little-endian bytes of an ``int32 [B]`` array.

The receiver trusts nothing: the header is parsed as JSON only, every field is type-checked, the
dtypes come from a whitelist, shapes are bounded and must match the byte length of their frame,
labels must be class indices. Any violation raises ``ProtocolError``; no payload is ever
interpreted as code.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MAGIC = "IAT-BATCH"
VERSION = 1
MAX_HEADER_BYTES = 4096
MAX_SERVER_ID_CHARS = 256
MAX_BATCH = 1 << 16
MAX_SIDE = 1 << 13
MAX_ARRAY_BYTES = 1 << 31
# Array name, dtype name, wire dtype (little-endian), upper bound of each dimension.
_ARRAYS = (
    ("images", "uint8", np.dtype("<u1"), (MAX_BATCH, MAX_SIDE, MAX_SIDE, 3)),
    ("labels", "int32", np.dtype("<i4"), (MAX_BATCH,)),
)

# The settings a server advertises in each batch's header, besides the shape: name -> type.
SETTINGS: dict[str, type] = {
    "augment": str,
    "layout": str,
    "classes": int,
    "seed": int,
    "fake": bool,
}
MAX_SETTING_CHARS = 64  # a string setting's length (a name of a registry)

Frame = Any  # bytes, memoryview, numpy array or zmq.Frame: anything exposing a buffer


class ProtocolError(ValueError):
    """A received message is not a well-formed batch; the message says what is wrong."""


def default_address(batch: int) -> str:
    """The server's default address (an abstract Unix socket), named as in the original."""
    return f"ipc://@imagenet-train-b{batch}"


def _check_outgoing(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have shape [{images.shape[0]}], got {labels.shape}")
    return np.ascontiguousarray(images), np.ascontiguousarray(labels, dtype="<i4")


def server_command(
    *, data: str | None, batch: int, image_size: int, augment: str, layout: str, seed: int
) -> str:
    """The command that starts the data server a trainer of these settings expects."""
    words = ["python", "third_party/serve-data.py", "--data", shlex.quote(data) if data else "DIR"]
    words += ["--batch", str(batch), "--image-size", str(image_size), "--train-augment", augment]
    words += ["--data-layout", layout] * (layout not in ("auto", "imagenet"))
    return " ".join(words + ["--seed", str(seed)] * (seed != 0))


def _valid_settings(settings: object) -> dict:
    """`settings` as ``SETTINGS`` allows (known names, their types, bounded strings), else a
    ProtocolError."""
    if not isinstance(settings, dict) or not set(settings) <= set(SETTINGS):
        raise ProtocolError(f"settings: expected an object of {sorted(SETTINGS)}")
    for name, value in settings.items():
        kind = SETTINGS[name]
        if type(value) is not kind or (kind is str and len(value) > MAX_SETTING_CHARS):
            raise ProtocolError(f"settings: {name} {value!r:.80} is not a {kind.__name__}")
    return settings


def encode_batch(
    images: np.ndarray,
    labels: np.ndarray,
    seq: int,
    server_id: str,
    settings: Mapping[str, object] | None = None,
) -> list[Frame]:
    """Frames of one batch message; send them with ``copy=False`` and do not modify the arrays
    until ZMQ has sent them (the array frames are the arrays' own buffers)."""
    images, labels = _check_outgoing(images, labels)
    header = {
        "magic": MAGIC,
        "version": VERSION,
        "server": server_id,
        "seq": int(seq),
        "arrays": [
            {"dtype": spec[1], "shape": list(a.shape)}
            for spec, a in zip(_ARRAYS, (images, labels), strict=True)
        ],
    }
    if settings is not None:
        header["settings"] = _valid_settings(dict(settings))
    return [json.dumps(header).encode(), images, labels]


def _buffer(frame: Frame) -> memoryview:
    view = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


def _parse_header(frame: Frame) -> dict:
    raw = _buffer(frame)
    if raw.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header frame has {raw.nbytes} bytes (limit {MAX_HEADER_BYTES})")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"header frame is not JSON: {err}") from None
    except RecursionError:  # e.g. 2000 nested lists: short enough, but too deep for the parser
        raise ProtocolError("header frame is JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    if header.get("magic") != MAGIC:
        raise ProtocolError(f"bad magic {header.get('magic')!r} (expected {MAGIC!r})")
    if header.get("version") != VERSION:
        raise ProtocolError(f"unsupported version {header.get('version')!r} (expected {VERSION})")
    return header


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_shape(
    spec: object, name: str, dtype_name: str, bounds: tuple[int, ...]
) -> tuple[int, ...]:
    if not isinstance(spec, dict) or spec.get("dtype") != dtype_name:
        raise ProtocolError(f"{name}: expected dtype {dtype_name}, got {spec!r:.200}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or len(shape) != len(bounds) or not all(map(_is_int, shape)):
        raise ProtocolError(
            f"{name}: expected {len(bounds)} integer dimensions, got {shape!r:.200}"
        )
    if not all(1 <= d <= bound for d, bound in zip(shape, bounds, strict=True)):
        raise ProtocolError(f"{name}: shape {shape} out of bounds {list(bounds)}")
    return tuple(shape)


def _check_shapes(header: dict) -> list[tuple[int, ...]]:
    specs = header.get("arrays")
    if not isinstance(specs, list) or len(specs) != len(_ARRAYS):
        raise ProtocolError(f"header must describe {len(_ARRAYS)} arrays")
    shapes = [
        _check_shape(spec, name, dtype_name, bounds)
        for spec, (name, dtype_name, _, bounds) in zip(specs, _ARRAYS, strict=True)
    ]
    images, labels = shapes
    if images[3] != 3:
        raise ProtocolError(f"images: shape {list(images)} does not have 3 channels")
    if labels != images[:1]:
        raise ProtocolError(f"labels: shape {list(labels)} does not match batch {images[0]}")
    if int(np.prod(images, dtype=np.int64)) > MAX_ARRAY_BYTES:
        raise ProtocolError(f"images: shape {list(images)} exceeds {MAX_ARRAY_BYTES} bytes")
    return shapes


def _array(name: str, frame: Frame, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    view = _buffer(frame)
    expected = int(np.prod(shape)) * dtype.itemsize
    if view.nbytes != expected:
        raise ProtocolError(
            f"{name}: frame has {view.nbytes} bytes, shape {list(shape)} needs {expected}"
        )
    return np.frombuffer(view, dtype=dtype).reshape(shape)


def _check_labels(labels: np.ndarray, num_classes: int | None) -> None:
    if labels.min() < 0:
        raise ProtocolError(f"labels: negative label {int(labels.min())}")
    if num_classes is not None and labels.max() >= num_classes:
        raise ProtocolError(f"labels: label {int(labels.max())} >= {num_classes} classes")


def decode_batch(
    frames: Sequence[Frame], num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray, int, str]:
    """Validate a received message; return ``(images, labels, seq, server_id)``.

    The arrays are zero-copy views of the frames (writable when the frames are, as ``zmq.Frame``
    objects received with ``copy=False`` are); labels are checked to be non-negative, and below
    ``num_classes`` when it is given (an out-of-range label would reach the loss).
    """
    if len(frames) != 1 + len(_ARRAYS):
        raise ProtocolError(f"expected {1 + len(_ARRAYS)} frames, got {len(frames)}")
    header = _parse_header(frames[0])
    seq, server_id = header.get("seq"), header.get("server")
    if not _is_int(seq) or seq < 0:
        raise ProtocolError(f"bad sequence number {seq!r:.100}")
    if not isinstance(server_id, str) or len(server_id) > MAX_SERVER_ID_CHARS:
        raise ProtocolError(f"bad server id {server_id!r:.100}")
    shapes = _check_shapes(header)
    images, labels = (
        _array(name, frame, dtype, shape)
        for (name, _, dtype, _), frame, shape in zip(_ARRAYS, frames[1:], shapes, strict=True)
    )
    _check_labels(labels, num_classes)
    return images, labels.astype(np.int32, copy=False), seq, server_id


def batch_settings(frame: Frame) -> dict | None:
    """The settings a batch's header frame advertises (None from a server that sends none);
    a ProtocolError when they are malformed."""
    settings = _parse_header(frame).get("settings")
    return None if settings is None else _valid_settings(settings)
