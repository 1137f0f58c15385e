"""Atomic file writes, the one writer of every file a run keeps (checkpoints, config, results).

A temporary file beside the target is written, fsync'ed, given the mode any other new file
would get (0666 less the umask: colleagues on a shared cluster can read results), renamed over
the target, and the folder is fsync'ed so that the rename survives a power loss. Readers (and a
relaunched run) see the old file or the new one, never half of one; a write interrupted by an
exception leaves nothing behind. (A SIGKILL can leave a `.NAME.*.tmp` file, which nothing reads;
`iat.runs.state.remove_partial_checkpoints` clears those of a run.) A full disk, or a file
size limit reached (``ulimit -f``: EFBIG), is one ``NoSpaceError`` line saying how much the file
needed (torch reports it as two chained tracebacks ending in "unexpected pos").

The files a run or an evaluation appends to or reads back (the ``.lock``, ``metrics.jsonl``, an
evaluation state's rank files) are opened by ``open_no_follow`` and ``read_regular``: never
through a symbolic link (which could point anywhere outside the run directory), only when they
are regular files (a FIFO would block, ``/dev/zero`` never ends), and read up to a bound. A folder
inside a run or beside an output (``RUN/eval``, ``<out>.state``) that is a symbolic link out of
its parent is refused by ``check_inner_folder``.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO

NEW_FILE_MODE = 0o666  # as open() creates files, before the umask
# A full disk, a full quota, or the file size limit (ulimit -f; Python ignores SIGXFSZ).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
MB = 1 << 20


class NoSpaceError(OSError):
    """A file could not be written for lack of space (nothing half-written is left)."""

    def __str__(self) -> str:
        return self.strerror


class UnsafeFileError(ValueError):
    """A file of a run or evaluation directory that is a symbolic link, a FIFO, a device or too
    large, or a folder that is a symbolic link out of its parent (one line naming it)."""


def no_space_errno(error: BaseException | None) -> int | None:
    """ENOSPC, EDQUOT or EFBIG when `error` or an exception it was raised from or while handling
    is one of those (torch.save re-raises its writer's OSError as a RuntimeError), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return error.errno
        error = error.__cause__ or error.__context__
    return None


def is_no_space(error: BaseException | None) -> bool:
    """Whether `error` (or one it was raised from) is a full disk, quota or file size limit."""
    return no_space_errno(error) is not None


def space_reason(code: int) -> str:
    """What a NO_SPACE errno means, in words."""
    if code == errno.EFBIG:
        return "file size limit (ulimit -f) reached"
    return "no space left on device"


def space_error(path: str | Path, error: BaseException) -> NoSpaceError:
    """The one line for an append that found no room (`error` is_no_space): names the file."""
    code = no_space_errno(error) or errno.ENOSPC
    return NoSpaceError(code, f"{space_reason(code)} writing {path}")


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


def _no_space(path: Path, write: Callable[[BinaryIO], None], code: int) -> NoSpaceError:
    """The one line for a full disk (or file size limit): how much `path` needs (written again
    into a counter) and how much its folder has."""
    sink = _CountingSink()
    try:
        write(sink)
        needed = f"{max(1, round(sink.size / MB))} MB needed"
    except Exception:  # noqa: BLE001 - the size is a courtesy; the error stands without it
        needed = "size unknown"
    free = shutil.disk_usage(path.parent).free
    return NoSpaceError(
        code,
        f"{space_reason(code)} writing {path} ({needed}, {free / MB:.0f} MB free); "
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
        code = no_space_errno(error)
        if code is not None:
            raise _no_space(path, write, code) from None
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


_APPEND = os.O_APPEND | os.O_CREAT
_OPEN_FLAGS = {  # the modes of open() used in run directories, as os.open flags
    "rb": os.O_RDONLY,
    "ab": os.O_WRONLY | _APPEND,
    "a": os.O_WRONLY | _APPEND,
    "a+b": os.O_RDWR | _APPEND,
    "r+b": os.O_RDWR | os.O_CREAT,
}


def open_no_follow(path: str | Path, mode: str = "ab", **kwargs) -> IO:
    """``open(path, mode)`` for a file inside a run or evaluation directory: never through a
    symbolic link (``O_NOFOLLOW``), and only a regular file (opened without blocking, so a FIFO
    is refused rather than waited on). `mode` is one of ``_OPEN_FLAGS``; `kwargs` go to
    ``os.fdopen`` (``buffering``, ``encoding``)."""
    path = Path(path)
    flags = _OPEN_FLAGS[mode] | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, NEW_FILE_MODE)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafeFileError(
                f"{path} is a symbolic link; a file of a run or evaluation directory is never "
                "followed out of it (remove the link)"
            ) from None
        if error.errno == errno.ENXIO:  # a FIFO opened for writing with no reader
            raise UnsafeFileError(f"{path} is not a regular file (a FIFO); remove it") from None
        raise
    try:
        _require_regular(path, fd)
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def _require_regular(path: Path, fd: int) -> os.stat_result:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(
            f"{path} is not a regular file (a FIFO, a device or a folder); remove it"
        )
    return info


def read_regular(path: str | Path, limit: int) -> bytes:
    """The contents of the regular file `path` (never through a symbolic link), refused with
    one line when they exceed `limit` bytes (read up to the bound: a file growing meanwhile
    cannot make the read endless)."""
    with open_no_follow(path, "rb", buffering=0) as f:
        size = _require_regular(Path(path), f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise UnsafeFileError(f"{path}: more than {limit} bytes, not a file this project wrote")
    return data


def check_inner_folder(flag: str, folder: str | Path) -> None:
    """Refuse, in one line, a folder the project writes in (``RUN/eval``, ``<out>.state``) that
    is a symbolic link out of its parent folder (what is written there would land elsewhere),
    or that exists and is not a folder."""
    folder = Path(folder)
    if folder.is_symlink():
        target, parent = folder.resolve(), folder.parent.resolve()
        if not target.is_relative_to(parent):
            raise UnsafeFileError(
                f"{flag}: {folder} is a symbolic link out of {folder.parent} (to {target}); "
                "remove the link"
            )
    if folder.exists() and not folder.is_dir():
        raise UnsafeFileError(f"{flag}: {folder} exists and is not a folder")
