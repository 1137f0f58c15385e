"""Distributed setup: the one place that reads launcher environment variables.

``detect()`` turns the variables of torchrun, OpenMPI, MPICH / Intel MPI or Slurm into an
immutable :class:`DistEnv`; ``init()`` builds the process group from it. The helpers below
(``get_rank``, ``all_reduce_sum``, ...) also work in a plain single process.

Precedence: torchrun first (it may itself run under srun or mpirun), then MPI, then Slurm
(srun launching the tasks directly), else a single process. PMIx launchers (OpenMPI 5's
mpirun, ``srun --mpi=pmix``) also export the OpenMPI or Slurm variables, which are used.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# Slurm jobs derive their rendezvous port from the job id, so that two jobs sharing a node
# do not collide: SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORT_SPAN (decided here only: slurm/*.sh
# export no MASTER_PORT).
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job and how the ranks meet."""

    rank: int  # global rank, 0 .. world_size - 1
    world_size: int  # number of processes in the job
    local_rank: int  # rank among the processes on this host; picks the GPU
    local_world_size: int  # number of processes on this host
    master_addr: str  # host of rank 0, where the TCP rendezvous store listens
    master_port: int  # port of that store
    launcher: str  # "torchrun" | "openmpi" | "mpich" | "slurm" | "spawn" | "single"
    # torchrun's agent already serves the store at master_addr:master_port (c10d rendezvous,
    # TORCHELASTIC_USE_AGENT_STORE): rank 0 joins it instead of trying to listen there too.
    agent_store: bool = False


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables (``os.environ`` by default) into a :class:`DistEnv`.

    Raises ValueError naming the variable when a value is missing or invalid.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env:
        return _from_torchrun(env)
    if "OMPI_COMM_WORLD_RANK" in env:
        return _from_mpi(env, "openmpi", "OMPI_COMM_WORLD_")
    if "PMI_RANK" in env and "MPI_LOCALRANKID" in env:
        return _from_mpi(env, "mpich", "")
    # SLURM_PROCID alone is also set in the sbatch script itself, where only one process runs;
    # SLURM_STEP_ID marks a task started by srun.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return _from_slurm(env)
    return DistEnv(0, 1, 0, 1, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, "single")


_MPI_VARIABLES = {
    "openmpi": ("RANK", "SIZE", "LOCAL_RANK", "LOCAL_SIZE"),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
}


def _from_torchrun(env: Mapping[str, str]) -> DistEnv:
    rank, world_size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local_rank, local_world_size = _int(env, "LOCAL_RANK"), _int(env, "LOCAL_WORLD_SIZE")
    _check_ranks(rank, world_size, local_rank, local_world_size, ("RANK", "LOCAL_RANK"))
    addr = env.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR
    port = _port(env, DEFAULT_MASTER_PORT)
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return DistEnv(
        rank, world_size, local_rank, local_world_size, addr, port, "torchrun", agent_store
    )


def _from_mpi(env: Mapping[str, str], launcher: str, prefix: str) -> DistEnv:
    names = tuple(prefix + suffix for suffix in _MPI_VARIABLES[launcher])
    rank, world_size, local_rank, local_world_size = (_int(env, name) for name in names)
    _check_ranks(rank, world_size, local_rank, local_world_size, (names[0], names[2]))
    port = _port(env, DEFAULT_MASTER_PORT)
    if env.get("MASTER_ADDR"):
        addr = env["MASTER_ADDR"]
    elif local_world_size == world_size:  # every rank is on this host
        addr = DEFAULT_MASTER_ADDR
    else:
        addr = _mpi_broadcast_hostname()
    return DistEnv(rank, world_size, local_rank, local_world_size, addr, port, launcher)


def _mpi_broadcast_hostname() -> str:
    """Rank 0's host name, sent to every rank through MPI (needs mpi4py)."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ValueError(
            "This MPI job spans several hosts, so the ranks need rank 0's address: "
            "export MASTER_ADDR=<host of rank 0> (e.g. `mpirun -x MASTER_ADDR=... `) "
            "or install mpi4py (`pip install mpi4py`) to share it automatically."
        ) from error
    comm = MPI.COMM_WORLD
    return comm.bcast(socket.getfqdn() if comm.Get_rank() == 0 else None, root=0)


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    size_name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    rank, world_size = _int(env, "SLURM_PROCID"), _int(env, size_name)
    local_rank, local_world_size = _int(env, "SLURM_LOCALID"), _slurm_tasks_on_this_node(env)
    _check_ranks(rank, world_size, local_rank, local_world_size, ("SLURM_PROCID", "SLURM_LOCALID"))
    addr = env.get("MASTER_ADDR") or _slurm_first_host(env, local_world_size == world_size)
    default_port = DEFAULT_MASTER_PORT
    if "SLURM_JOB_ID" in env:
        default_port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % SLURM_PORT_SPAN
    port = _port(env, default_port)
    return DistEnv(rank, world_size, local_rank, local_world_size, addr, port, "slurm")


def _slurm_tasks_on_this_node(env: Mapping[str, str]) -> int:
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if name in env:
            counts = parse_tasks_per_node(env[name], name)
            if len(set(counts)) == 1:
                return counts[0]
            node = _int(env, "SLURM_NODEID")
            if node >= len(counts):
                raise ValueError(f"SLURM_NODEID={node} is beyond {name}={env[name]!r}")
            return counts[node]
    if "SLURM_NTASKS_PER_NODE" in env:
        return _int(env, "SLURM_NTASKS_PER_NODE")
    raise ValueError("Slurm task without SLURM_STEP_TASKS_PER_NODE or SLURM_NTASKS_PER_NODE")


def _slurm_first_host(env: Mapping[str, str], one_host: bool) -> str:
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(name):
            return expand_nodelist(env[name], name)[0]
    if one_host:
        return DEFAULT_MASTER_ADDR
    raise ValueError("Slurm job on several nodes without SLURM_STEP_NODELIST or MASTER_ADDR")


def parse_tasks_per_node(value: str, name: str = "SLURM_STEP_TASKS_PER_NODE") -> list[int]:
    """Expand Slurm's task counts per node, e.g. ``"8(x2),4"`` -> ``[8, 8, 4]``."""
    counts: list[int] = []
    for item in value.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match is None:
            raise ValueError(f"{name}={value!r} is not a Slurm task count list")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def expand_nodelist(nodelist: str, name: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand Slurm's compressed host list, e.g. ``"node[01-02,7],gpu5"``.

    -> ``["node01", "node02", "node7", "gpu5"]``; zero padding is kept, and several bracket
    groups in one name (``"r[1-2]n[1-2]"``) expand to every combination.
    """
    hosts: list[str] = []
    for pattern in _split_top_level(nodelist, name):
        hosts += _expand_host_pattern(pattern, nodelist, name)
    return hosts


def _split_top_level(nodelist: str, name: str) -> list[str]:
    patterns, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"{name}={nodelist!r} has unbalanced brackets")
        if char == "," and depth == 0:
            patterns.append(nodelist[start:i])
            start = i + 1
    patterns.append(nodelist[start:])
    if depth != 0 or not all(patterns):
        raise ValueError(f"{name}={nodelist!r} is not a Slurm node list")
    return patterns


def _expand_host_pattern(pattern: str, nodelist: str, name: str) -> list[str]:
    match = re.match(r"([^\[]*)\[([^\]]+)\](.*)", pattern)
    if match is None:
        return [pattern]
    prefix, ranges, rest = match.groups()
    tails = _expand_host_pattern(rest, nodelist, name) if rest else [""]
    indices = _expand_ranges(ranges, nodelist, name)
    return [prefix + index + tail for index in indices for tail in tails]


def _expand_ranges(ranges: str, nodelist: str, name: str) -> list[str]:
    indices: list[str] = []
    for item in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ValueError(f"{name}={nodelist!r} has an invalid range {item!r}")
        first, last = match[1], match[2] or match[1]
        indices += [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    return indices


def _int(env: Mapping[str, str], name: str) -> int:
    if name not in env:
        raise ValueError(f"{name} is not set")
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer") from None


def _port(env: Mapping[str, str], default: int) -> int:
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else default
    if not 0 < port < 2**16:
        raise ValueError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return port


def _check_ranks(
    rank: int, world_size: int, local_rank: int, local_world_size: int, names: tuple[str, str]
) -> None:
    if world_size < 1 or local_world_size < 1 or local_world_size > world_size:
        raise ValueError(
            f"invalid sizes from the launcher: world size {world_size}, "
            f"local size {local_world_size} (variables {names[0]}, {names[1]} and their sizes)"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"{names[0]}={rank} is outside 0..{world_size - 1}")
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"{names[1]}={local_rank} is outside 0..{local_world_size - 1}")


def set_threads(threads: int) -> None:
    """Run torch's operators on `threads` threads (the count ``iat.runtime.cpus`` decides)."""
    torch.set_num_threads(threads)


def select_device(env: DistEnv) -> torch.device:
    """This process's device: ``cuda:<local_rank % device count>`` when CUDA exists, else CPU.

    On CUDA, matrix products use TF32 like cuDNN's convolutions already do (PyTorch's default):
    in plain fp32 the non-local blocks' products took a third of a ResNetDenoise-152 PGD-10
    step (bench/RESULTS.md, section 7, "Profile")."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0
PEER_REPORT_WAIT_S = 3.0  # after a failed collective, how long survivors wait for each other


class PeerLostError(RuntimeError):
    """A collective failed because another rank died or stopped answering; names the rank."""


# Each rank's watcher thread beats this often (a fraction of --collective-timeout, at most 5 s),
# so that a peer silent for the whole timeout is known lost even where no collective runs
# (an evaluation's own share of batches).
HEARTBEATS_PER_TIMEOUT = 5
MAX_HEARTBEAT_S = 5.0


@dataclass
class _JobState:
    """This process's rendezvous store (rank 0 hosts it), kept for failure reports."""

    store: dist.TCPStore | None = None
    timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
    progress: str = "step 0"  # how far this rank came: "step N" (training) or "batch N" (eval)
    lost: PeerLostError | None = None  # set by the watcher thread, raised by mark_progress
    stop: threading.Event | None = None  # ends the watcher thread


_job = _JobState()  # the process group is per process; so is what we know about it


def init(
    env: DistEnv, device: torch.device, timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
) -> None:
    """Join the process group: NCCL on CUDA, Gloo on CPU; nothing to do for one process.

    ``timeout_s`` bounds every collective, so a dead or hung rank ends the others with an
    error instead of a hang; ``PeerLostError`` then names the rank that stopped answering.
    """
    if env.world_size == 1:
        return
    device_id = None
    if device.type == "cuda":
        torch.cuda.set_device(device)
        device_id = device
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        env.master_addr,
        env.master_port,
        env.world_size,
        env.rank == 0 and not env.agent_store,
        timeout=timeout,
    )
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        device_id=device_id,
    )
    _job.store, _job.timeout_s, _job.lost = store, timeout_s, None
    mark_progress(0)
    _watch_peers(env, timeout_s)
    _report_lost_peers_on_sigterm()


def mark_progress(step: int, unit: str = "step") -> None:
    """Record that this rank reached training step (or evaluation batch) `step`, read when a
    peer is lost; raises PeerLostError when the watcher found a peer silent for the timeout."""
    _job.progress = f"{unit} {step}"
    if _job.lost is not None:
        raise _job.lost
    if _job.store is not None:
        _job.store.set(f"iat/progress/{get_rank()}", _job.progress)


def _watch_peers(env: DistEnv, timeout_s: float) -> None:
    """A daemon thread, with its own store connection, that beats for this rank and watches the
    others' beats: a peer whose beat has not changed for `timeout_s` (dead, or stopped) is
    recorded in ``_job.lost`` for ``mark_progress`` to raise."""
    client = dist.TCPStore(
        env.master_addr,
        env.master_port,
        env.world_size,
        False,
        timeout=timedelta(seconds=timeout_s),
    )
    stop = _job.stop = threading.Event()
    interval = min(MAX_HEARTBEAT_S, timeout_s / HEARTBEATS_PER_TIMEOUT)
    others = [r for r in range(env.world_size) if r != env.rank]

    def watch() -> None:
        beats, seen = 0, {r: (None, time.monotonic()) for r in others}
        while not stop.wait(interval):
            beats += 1
            try:
                client.set(f"iat/alive/{env.rank}", str(beats))
                for r in others:
                    _check_beat(client, r, seen, timeout_s)
            except RuntimeError:  # the store (rank 0's process) did not answer in time
                if not stop.is_set():
                    _job.lost = PeerLostError(
                        f"rank 0 (which hosts the rendezvous) stopped answering for "
                        f"{timeout_s:g} s (--collective-timeout); this is rank {env.rank}, at "
                        f"{_job.progress}"
                    )
                return
            if _job.lost is not None:
                return

    threading.Thread(target=watch, name="iat-peer-watch", daemon=True).start()


def _check_beat(client: dist.TCPStore, rank: int, seen: dict, timeout_s: float) -> None:
    """Note `rank`'s beat; a beat unchanged for `timeout_s` (and the rank not left) is lost."""
    key = f"iat/alive/{rank}"
    beat = client.get(key) if client.check([key]) else None
    last, since = seen[rank]
    now = time.monotonic()
    if beat != last:
        seen[rank] = (beat, now)
        return
    if now - since < timeout_s or client.check([f"iat/left/{rank}"]):
        return
    _job.lost = PeerLostError(
        f"rank {rank} ({_last_at(_progress_of(client, rank))}) stopped answering (dead or hung): "
        f"no sign of it for {timeout_s:g} s (--collective-timeout); this is rank {get_rank()}, "
        f"at {_job.progress}"
    )


def _last_at(progress: str) -> str:
    return "no progress reported" if progress == "none" else f"last at {progress}"


def _report_lost_peers_on_sigterm() -> None:
    """A launcher that saw a rank die stops the others with SIGTERM (torchrun at once, before
    any collective times out): each then names the lost ranks in one line before it exits.

    Python runs signal handlers in the main thread only between bytecodes, never while it
    waits in a collective; the signal's wakeup byte is read by a thread instead."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
    except ValueError:  # not the main thread (a tool that joins from a worker thread)
        os.close(read_fd)
        os.close(write_fd)
        return

    def wait_for_sigterm() -> None:
        while (byte := os.read(read_fd, 1)) and byte[0] != signal.SIGTERM:
            pass
        lost = lost_peer_error(RuntimeError("SIGTERM"), cause="stopped by the launcher then")
        if lost is not None:
            print(f"error: {lost}", file=sys.stderr, flush=True)
        os._exit(1 if lost is not None else 128 + signal.SIGTERM)

    threading.Thread(target=wait_for_sigterm, name="iat-sigterm", daemon=True).start()


def lost_peer_error(error: BaseException, cause: str = "") -> PeerLostError | None:
    """After a failed collective (or a launcher's SIGTERM, `cause`): the ranks that did not
    report the failure too within a few seconds (dead or hung), as one error naming them; None
    when every rank reported (then the failure is not a lost peer) or when not distributed."""
    store, rank = _job.store, get_rank()
    if store is None or not isinstance(error, RuntimeError):
        return None
    try:
        store.set_timeout(timedelta(seconds=PEER_REPORT_WAIT_S))
        store.set(f"iat/failed/{rank}", "1")
        lost = _unreported_peers(store, rank, get_world_size())
        if cause:  # a rank that left through cleanup() ended on its own error, printed by it
            lost = [r for r in lost if not store.check([f"iat/left/{r}"])]
        progress = {r: _progress_of(store, r) for r in lost}
    except RuntimeError:  # the store lives in rank 0's process
        return PeerLostError(
            f"rank 0 (which hosts the rendezvous at {_job.timeout_s:g} s timeout) is gone; "
            f"this is rank {rank}, at {_job.progress}"
        )
    if not lost:
        return None
    names = ", ".join(f"rank {r} ({_last_at(progress[r])})" for r in lost)
    if cause:
        return PeerLostError(f"{names} is gone: rank {rank} (at {_job.progress}) was {cause}")
    return PeerLostError(
        f"{names} stopped answering (dead or hung): a collective of rank {rank} (at "
        f"{_job.progress}) failed after at most {_job.timeout_s:g} s (--collective-timeout)"
    )


def _unreported_peers(store: dist.TCPStore, rank: int, world_size: int) -> list[int]:
    others = [r for r in range(world_size) if r != rank]
    missing = _missing_keys(store, [f"iat/failed/{r}" for r in others])
    return [r for r in others if f"iat/failed/{r}" in missing]


def _missing_keys(store: dist.TCPStore, keys: list[str]) -> list[str]:
    """The `keys` still absent from `store` after waiting up to ``PEER_REPORT_WAIT_S``."""
    deadline = time.monotonic() + PEER_REPORT_WAIT_S
    while True:
        missing = [key for key in keys if not store.check([key])]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.05)


def _progress_of(store: dist.TCPStore, rank: int) -> str:
    key = f"iat/progress/{rank}"
    return store.get(key).decode() if store.check([key]) else "none"


@contextmanager
def process_group(
    env: DistEnv, device: torch.device, timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
) -> Iterator[None]:
    """``init()`` on entry and ``cleanup()`` on exit."""
    init(env, device, timeout_s)
    try:
        yield
    finally:
        cleanup()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


@contextmanager
def naming_lost_peers() -> Iterator[None]:
    """Turns a collective's failure caused by a lost rank into a ``PeerLostError`` naming it."""
    try:
        yield
    except PeerLostError:
        raise
    except RuntimeError as error:
        lost = lost_peer_error(error)
        if lost is None:
            raise
        raise lost from error


def barrier() -> None:
    if is_initialized():
        with naming_lost_peers():
            dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place and return it (unchanged when not distributed)."""
    if is_initialized():
        with naming_lost_peers():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_lists(items: list) -> list:
    """Every rank's `items` (picklable), concatenated in rank order (`items` when not
    distributed)."""
    if not is_initialized():
        return items
    gathered: list = [None] * get_world_size()
    with naming_lost_peers():
        dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` in place with rank ``src``'s copy and return it."""
    if is_initialized():
        with naming_lost_peers():
            dist.broadcast(t, src=src)
    return t


def free_port() -> int:
    """A TCP port that is free on this machine now (for a rendezvous between local processes)."""
    with socket.socket() as s:
        s.bind((DEFAULT_MASTER_ADDR, 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., None], nprocs: int, args: tuple = ()) -> None:
    """Run ``fn(env, *args)`` in ``nprocs`` new processes of this machine, one rank each.

    A launcher for tools that start their own workers (``main.py --demo``); ``fn`` must be a
    module-level function. Raises if any process fails.
    """
    port = free_port()
    envs = [
        DistEnv(rank, nprocs, rank, nprocs, DEFAULT_MASTER_ADDR, port, "spawn")
        for rank in range(nprocs)
    ]
    mp.spawn(_run_spawned, args=(envs, fn, args), nprocs=nprocs)


def _run_spawned(index: int, envs: list[DistEnv], fn: Callable[..., None], args: tuple) -> None:
    fn(envs[index], *args)


def cleanup() -> None:
    """Leave the process group, if this process joined one. Rank 0 hosts the rendezvous store,
    so it waits (briefly) until every rank has left before the store goes with it: a rank still
    talking to a store that is gone aborts in torch's C++ code."""
    rank, world_size, store = get_rank(), get_world_size(), _job.store
    if _job.stop is not None:
        _job.stop.set()
        _job.stop = None
    if is_initialized():
        # Objects that hold the group (a DDP wrapper in a reference cycle) are freed now, while
        # the interpreter is whole: freed at its finalisation, their Gloo threads abort the
        # process ("terminate called without an active exception"). Without a group there is
        # nothing to free, and a full collection of a large process takes seconds (2 s in a
        # pytest process on a loaded 2-core machine).
        gc.collect()
        dist.destroy_process_group()
    if store is not None:
        try:
            store.set(f"iat/left/{rank}", "1")
            if rank == 0:
                _missing_keys(store, [f"iat/left/{r}" for r in range(world_size)])
        except RuntimeError:  # a rank or the store is gone already: nothing to wait for
            pass
    _job.store = None
