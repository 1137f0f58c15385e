"""Gloo collectives among processes of this machine, timed, and the ring model fitted to them.

    T(S, P) = steps * alpha + steps / P * S / B

with S the reduced (all-reduce, reduce-scatter) or gathered (all-gather) size in bytes; an
all-reduce takes 2 (P - 1) steps (a reduce-scatter, then an all-gather), the others P - 1.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from iat.runtime import distributed

SIZES = (1_000, 10_000, 100_000, 1_000_000, 4_000_000)  # fp32 elements: 4 KB .. 16 MB

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter")


def _collective(name: str, size: int, processes: int) -> Callable[[], object]:
    """One call of collective `name` on `size` fp32 elements (the gathered or reduced size)."""
    if name == "all-reduce":
        tensor = torch.ones(size)
        return lambda: torch.distributed.all_reduce(tensor)
    shard = torch.ones(size // processes)
    full = torch.ones(size // processes * processes)
    if name == "all-gather":
        return lambda: torch.distributed.all_gather_single(full, shard)
    return lambda: torch.distributed.reduce_scatter_single(shard, full)


def timed_runs(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of `repeats` calls of `fn`, all ranks starting each call together."""
    seconds = []
    for _ in range(repeats):
        distributed.barrier()
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def _time_collective(env: distributed.DistEnv, name: str, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init(env, torch.device("cpu"), timeout_s=120)
    times = {}
    for size in SIZES:
        call = _collective(name, size, env.world_size)
        call()  # warm-up: connections, buffers
        # the fastest: the least disturbed by other processes of the machine
        times[size] = min(timed_runs(call, repeats))
    slowest = torch.tensor([times[s] for s in SIZES], dtype=torch.float64)
    torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
    if env.rank == 0:
        Path(out).write_text(json.dumps(dict(zip(map(str, SIZES), slowest.tolist(), strict=True))))
    distributed.cleanup()


def measure(processes: int, repeats: int, name: str = "all-reduce") -> dict[int, float]:
    """Fastest seconds of collective `name` of each size (the slowest rank's), on ``processes``
    processes of this machine (Gloo over loopback)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.json")
        distributed.spawn(_time_collective, processes, (name, repeats, out))
        return {int(k): v for k, v in json.loads(Path(out).read_text()).items()}


def ring_terms(size_bytes: float, processes: int, name: str = "all-reduce") -> tuple[float, float]:
    """The ring model's coefficients of alpha and of 1 / B: an all-reduce is a reduce-scatter
    and an all-gather, each P - 1 steps of S / P bytes."""
    steps = 2 * (processes - 1) if name == "all-reduce" else processes - 1
    return steps, steps / processes * size_bytes


def fit(measured: dict[int, dict[int, float]], name: str = "all-reduce") -> tuple[float, float]:
    """Least-squares alpha (s) and B (bytes/s) over every (P, size), relative errors weighted."""
    rows, targets = [], []
    for processes, times in measured.items():
        for size, seconds in times.items():
            a, b = ring_terms(4 * size, processes, name)
            rows.append([a / seconds, b / seconds])
            targets.append(1.0)
    (alpha, inv_bandwidth), *_ = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)
    return float(alpha), float(1 / inv_bandwidth)


def ring_seconds(
    size_bytes: float, processes: int, alpha: float, bandwidth: float, name: str = "all-reduce"
) -> float:
    a, b = ring_terms(size_bytes, processes, name)
    return a * alpha + b / bandwidth
