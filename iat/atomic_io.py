"""Atomic file writes, the one writer of every file a run keeps (checkpoints, config, results).

A temporary file beside the target is written, fsync'ed, given the mode any other new file
would get (0666 less the umask: colleagues on a shared cluster can read results), renamed over
the target, and the folder is fsync'ed so that the rename survives a power loss. Readers (and a
relaunched run) see the old file or the new one, never half of one; a write interrupted by an
exception leaves nothing behind. (A SIGKILL can leave a `.NAME.*.tmp` file, which nothing reads;
`iat.run_state.remove_partial_checkpoints` clears those of a run.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

NEW_FILE_MODE = 0o666  # as open() creates files, before the umask


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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))
