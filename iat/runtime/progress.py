"""Progress bars: one rule for every long loop (training epochs, evaluation, prediction)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from tqdm import tqdm

# A log file keeps every redraw of a bar (a 49 KB demo log); redirected, a bar updates at most
# this often (its rate and ETA stay).
REDIRECTED_INTERVAL_S = 30.0


def progress_bar(iterable: Iterable, *, file: TextIO | None = None, **options: object) -> tqdm:
    """A tqdm bar on stderr: redrawn in place on a terminal; at most one update every
    ``REDIRECTED_INTERVAL_S`` seconds when stderr is redirected to a file or a pipe."""
    file = sys.stderr if file is None else file
    if not file.isatty():
        options.setdefault("mininterval", REDIRECTED_INTERVAL_S)
    return tqdm(iterable, file=file, **options)
