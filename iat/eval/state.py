"""Resumable evaluation: every finished batch's counts, kept on disk until the result is written.

Each rank appends one JSON line per finished global batch (its counts, skipped images and the
attacker's statistics) to its own file, ``<state dir>/<fingerprint>.rank<R>.jsonl``, flushed and
fsynced; a line cut short by a kill is ignored. A relaunch with the same settings reads every
rank's file, whatever the number of processes then: the batches found there are not attacked
again, and their counts are added once (by rank 0), so a resumed evaluation reports what an
uninterrupted one would (``evaluate``'s per-batch seeds make each batch's attack the same).

The fingerprint covers every setting that changes a number (``result_settings``: the
configuration less the fields below; ``--eval --watch`` keys its results by them too), the
checkpoint's size and modification time and the number of images: another attack, ε or
checkpoint never reuses the counts. Nothing in a state file is unpickled; a rank file is read
only when it is a regular file (not a symbolic link, a FIFO or a device), up to a bound, and
each record must be possible for its batch (whole counts between 0 and the batch's images, the
skipped ones making up the rest), else the state is refused in one line. Rank files are
appended to without following symbolic links, and a state folder that is a symbolic link out of
its parent is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from iat.config import Config
from iat.runtime.atomic_io import (
    check_inner_folder,
    is_no_space,
    open_no_follow,
    read_regular,
    space_error,
)

# Fields that change no number (where the output goes, how many threads decode), left out of
# the fingerprint so that a relaunch with other values still resumes.
NEUTRAL_FIELDS = frozenset(
    {
        "workers", "threads", "eval_output", "eval_state", "mlflow", "collective_timeout",
        "log_every", "watch", "watch_interval", "watch_timeout", "print_top5", "class_names",
        "explicit_model_fields", "image_size_given", "logdir", "keep_checkpoints",
        "export_adversarial",
        # A finished batch had no unreadable image (or the run stopped): the same counts with
        # --skip-unreadable. Each sweep point has its own epsilon and iterations.
        "skip_unreadable", "masking_checks", "sweep_epsilon", "sweep_iters",
        # --benchmark's description of the model, written into its result file only
        "model_name", "model_link", "model_authors", "model_venue", "additional_data",
    }
)  # fmt: skip
MAX_STATE_BYTES = 256 << 20  # a state line is ~200 bytes a batch: far beyond any split
COUNTS = 4  # metrics.count_batch: images, top-1 wrong, top-5 wrong, attack successes


class EvalStateError(ValueError):
    """A state file that is not what this module writes (names the file and the line)."""


@dataclass(frozen=True)
class BatchRecord:
    batch: int  # global batch index (sources.rank_batches)
    counts: list[float]
    skipped: float
    stats: dict[str, list[float]]

    def line(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")) + "\n"


def result_settings(cfg: Config) -> dict[str, object]:
    """The settings that change an evaluation's numbers: the configuration's fields less
    ``NEUTRAL_FIELDS``, and whether the scored images are quantized."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NEUTRAL_FIELDS}
    fields["quantize"] = cfg.quantize or cfg.export_adversarial is not None  # what is scored
    return fields


def fingerprint(cfg: Config, num_images: int) -> str:
    """A short hash of everything that decides this evaluation's numbers."""
    fields = result_settings(cfg)
    checkpoint = Path(cfg.load) if cfg.load else None
    if checkpoint is not None and checkpoint.is_file():
        stat = checkpoint.stat()
        fields["checkpoint_stat"] = [str(checkpoint.resolve()), stat.st_size, stat.st_mtime_ns]
    fields["num_images"] = num_images
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def state_dir(cfg: Config) -> Path | None:
    """--eval-state, else ``<--eval-output>.state``; None without either, or with "none"."""
    if cfg.eval_state == "none":
        return None
    if cfg.eval_state is not None:
        return Path(cfg.eval_state)
    return Path(f"{cfg.eval_output}.state") if cfg.eval_output else None


class EvalState:
    """One evaluation's records: the batches done before (``done``) and this rank's appends.

    `num_images` and `batch` are the evaluation's: batch j holds images
    [j*batch, min((j+1)*batch, num_images)), which bounds the counts a record may hold."""

    def __init__(self, folder: Path, key: str, rank: int, *, num_images: int, batch: int) -> None:
        self.folder, self.key, self.rank = folder, key, rank
        self.num_images, self.batch = num_images, batch
        check_inner_folder("--eval-state", folder)
        self.done: dict[int, BatchRecord] = {}
        for path in sorted(folder.glob(f"{key}.rank*.jsonl")) if folder.is_dir() else ():
            for record in self._read(path):
                self.done.setdefault(record.batch, record)
        self._file = None

    def _read(self, path: Path) -> list[BatchRecord]:
        try:
            lines = read_regular(path, MAX_STATE_BYTES).split(b"\n")
        except ValueError as error:
            raise EvalStateError(f"{error} (an evaluation state file)") from None
        records = []
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                records.append(self._parse(json.loads(raw)))
            except RecursionError:
                raise EvalStateError(
                    f"{path} line {number}: nested too deeply for an evaluation state record; "
                    "delete the file to start this evaluation afresh"
                ) from None
            except (ValueError, TypeError, KeyError) as e:
                if number == len(lines):  # the last line, cut short by a kill
                    continue
                raise EvalStateError(
                    f"{path} line {number}: not an evaluation state record ({e}); "
                    "delete the file to start this evaluation afresh"
                ) from None
        return records

    def _parse(self, data: object) -> BatchRecord:
        if not isinstance(data, dict) or set(data) != {"batch", "counts", "skipped", "stats"}:
            raise ValueError("unexpected fields")
        batch, counts, skipped, stats = (data[k] for k in ("batch", "counts", "skipped", "stats"))
        batches = math.ceil(self.num_images / self.batch)
        if not isinstance(batch, int) or isinstance(batch, bool) or not 0 <= batch < batches:
            raise ValueError(f"batch {batch!r}, not one of this evaluation's {batches}")
        _numbers(counts, COUNTS, "counts")
        _numbers([skipped], 1, "skipped")
        _possible(counts, skipped, min(self.batch, self.num_images - batch * self.batch))
        if not isinstance(stats, dict):
            raise ValueError("statistics")
        for name, values in stats.items():
            _numbers(values, len(values) if isinstance(values, list) else -1, str(name))
        return BatchRecord(batch, counts, float(skipped), stats)

    def append(self, record: BatchRecord) -> None:
        """Add one finished batch, durably (a kill after this returns keeps it)."""
        path = self.folder / f"{self.key}.rank{self.rank}.jsonl"
        try:
            if self._file is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._file = open_no_follow(path, "a+b")
                _drop_cut_line(self._file)
            self._file.write(record.line().encode())
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as error:
            if is_no_space(error):
                raise space_error(path, error) from None
            raise

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        """Delete this evaluation's files (its result is written); the folder if left empty."""
        self.close()
        for path in self.folder.glob(f"{self.key}.rank*.jsonl"):
            path.unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


def _drop_cut_line(file: BinaryIO) -> None:
    """Truncate `file` (open for reading and appending) after its last complete line: a record
    cut short by a kill would otherwise run into the next one appended."""
    size = os.fstat(file.fileno()).st_size
    if size == 0:
        return
    file.seek(max(0, size - MAX_STATE_BYTES))
    data = file.read(MAX_STATE_BYTES)
    if not data.endswith(b"\n"):
        file.truncate(size - len(data) + data.rfind(b"\n") + 1)


def _numbers(values: object, length: int, name: str) -> None:
    ok = isinstance(values, list) and len(values) == length and all(map(_is_number, values))
    if not ok:
        raise ValueError(f"{name}: expected {length} finite numbers")


def _is_number(value: object) -> bool:
    """A finite JSON number (true and false are not; an integer beyond a float's exact range
    would overflow the sums)."""
    if isinstance(value, bool):
        return False
    return (isinstance(value, float) and math.isfinite(value)) or (
        isinstance(value, int) and abs(value) <= 2**53
    )


def _possible(counts: list[float], skipped: float, images: int) -> None:
    """Refuse counts no batch of `images` images can give (``metrics.count_batch``): whole
    numbers, at most the batch's images, top-5 errors among the top-1 ones, and the images
    scored plus those skipped as unreadable making up the batch."""
    scored, top1, top5, successes = counts
    whole = all(float(v).is_integer() for v in (*counts, skipped))
    fits = 0 <= top5 <= top1 <= scored and 0 <= successes <= scored and skipped >= 0
    if not (whole and fits and scored + skipped == images):
        raise ValueError(
            f"counts {counts} with {skipped} skipped are impossible for a batch of {images} images"
        )


def stats_tensors(
    record: BatchRecord, template: dict[str, torch.Tensor], folder: Path
) -> dict[str, torch.Tensor]:
    """A record's statistics as tensors shaped like the attacker's ``stats_template``."""
    shapes_match = set(record.stats) == set(template) and all(
        len(record.stats[name]) == t.numel() for name, t in template.items()
    )
    if not shapes_match:
        raise EvalStateError(
            f"{folder}: batch {record.batch}'s statistics do not fit this attack; "
            "delete the folder to start this evaluation afresh"
        )
    return {
        name: torch.tensor(record.stats[name], dtype=t.dtype, device=t.device).reshape(t.shape)
        for name, t in template.items()
    }
