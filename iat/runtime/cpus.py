"""How many CPUs this process may use, and how many threads it runs on: the one owner.

Torch-free (the data server imports it); ``iat.runtime.distributed.set_threads`` applies the
count decided here to torch.
"""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, which launchers, cgroups (Slurm)
    and ``taskset`` set, not the machine's count (``os.cpu_count``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_share(processes: int) -> int:
    """One process's share of the usable CPUs among `processes` on this host (at least 1)."""
    return max(1, usable_cpus() // processes)


def threads_from_environment() -> int | None:
    """OMP_NUM_THREADS when set to a positive whole number: an explicit setting wins over the
    automatic share (as torch itself would honour it)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def resolve_threads(requested: int | None, processes: int) -> int:
    """Torch threads for one of `processes` on this host: `requested` (--threads), else
    OMP_NUM_THREADS, else its share of the usable CPUs, so that processes never oversubscribe
    the cores."""
    return requested or threads_from_environment() or cpu_share(processes)
