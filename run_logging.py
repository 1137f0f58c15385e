"""Scalars of a run, to TensorBoard and to a JSON-lines file (`metrics.jsonl`) in the run directory.

Only the main process writes; the others get a logger that does nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class RunLogger:
    def __init__(self, logdir: str | Path | None):
        self.enabled = logdir is not None
        self._writer = None
        self._jsonl = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            Path(logdir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(logdir))
            self._jsonl = open(Path(logdir) / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115

    def log(self, step: int, scalars: dict[str, float], **context: object) -> None:
        """Record `scalars` at global `step`; `context` (epoch, phase) goes to the JSON only."""
        if not self.enabled:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        record = {"time": time.time(), "step": step, **context, **scalars}
        self._jsonl.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._jsonl.close()
            self.enabled = False

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
