"""Atomic file writes, the one writer of every file a run keeps (checkpoints, config, results).

A temporary file beside the target is written, fsync'ed, given the mode any other new file
would get (0666 less the umask: colleagues on a shared cluster can read results), renamed over
the target, and the folder is fsync'ed so that the rename survives a power loss. Readers (and a
relaunched run) see the old file or the new one, never half of one; a write interrupted by an
exception leaves nothing behind. (A SIGKILL can leave a `.NAME.*.tmp` file, which nothing reads;
`iat.runs.state.remove_partial_checkpoints` clears those of a run.) A full disk is one
``NoSpaceError`` line saying how much the file needed (torch reports it as two chained
tracebacks ending in "unexpected pos").
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

NEW_FILE_MODE = 0o666  # as open() creates files, before the umask
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or a full quota
MB = 1 << 20


class NoSpaceError(OSError):
    """A file could not be written for lack of space (nothing half-written is left)."""

    def __str__(self) -> str:
        return self.strerror


def is_no_space(error: BaseException | None) -> bool:
    """Whether `error` or an exception it was raised from or while handling is ENOSPC/EDQUOT
    (torch.save re-raises its writer's OSError as a RuntimeError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return True
        error = error.__cause__ or error.__context__
    return False


class _CountingSink:
    """A binary file that keeps nothing and counts the bytes written to it."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.size += n
        return n

    def flush(self) -> None:
        pass


def _no_space(path: Path, write: Callable[[BinaryIO], None]) -> NoSpaceError:
    """The one line for a full disk: how much `path` needs (written again into a counter) and
    how much its folder has."""
    sink = _CountingSink()
    try:
        write(sink)
        needed = f"{max(1, round(sink.size / MB))} MB needed"
    except Exception:  # noqa: BLE001 - the size is a courtesy; the error stands without it
        needed = "size unknown"
    free = shutil.disk_usage(path.parent).free
    return NoSpaceError(
        errno.ENOSPC,
        f"no space left on device writing {path} ({needed}, {free / MB:.0f} MB free); "
        "nothing was replaced",
    )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(file)` on a temporary file in `path`'s folder, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, NEW_FILE_MODE & ~_umask())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if is_no_space(error):
            raise _no_space(path, write) from None
        raise
    _fsync_dir(path.parent)
    return path


def check_writable_file(flag: str, path: str | Path) -> None:
    """Fail before any work when `path` cannot be written by ``atomic_write``: it is a folder,
    its folder is missing, or a file cannot be created there (probed with a temporary file,
    removed at once: root passes ``os.access`` even on a read-only mount)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag}: {path} is a folder, not a file")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{flag}: {folder} is not an existing folder (for {path.name})")
    try:
        with tempfile.NamedTemporaryFile(prefix=f".{path.name}.", suffix=".probe", dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"{flag}: cannot write in {folder} ({error.strerror})") from None


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))
