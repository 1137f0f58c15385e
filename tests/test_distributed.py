"""iat/runtime/distributed.py: launcher detection on crafted environments, then real
multi-process runs."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iat.runtime import distributed

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "5",
    "OMPI_COMM_WORLD_SIZE": "8",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
}
MPICH = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "4"}
SLURM = {
    "SLURM_PROCID": "9",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_JOB_ID": "123456",
}


def test_single_process_defaults() -> None:
    assert distributed.detect({}) == distributed.DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single")


def test_torchrun() -> None:
    env = distributed.detect({**TORCHRUN, "MASTER_ADDR": "host0", "MASTER_PORT": "1234"})
    assert env == distributed.DistEnv(3, 8, 1, 4, "host0", 1234, "torchrun")


def test_torchrun_agent_store_is_joined_not_hosted() -> None:
    env = distributed.detect({**TORCHRUN, "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert env.agent_store and not distributed.detect(TORCHRUN).agent_store


def test_openmpi_on_one_host_meets_on_localhost() -> None:
    env = distributed.detect(OPENMPI)
    assert env == distributed.DistEnv(5, 8, 1, 8, "127.0.0.1", 29500, "openmpi")


def test_mpich_with_master_addr() -> None:
    env = distributed.detect({**MPICH, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "40000"})
    assert env == distributed.DistEnv(2, 4, 2, 4, "10.0.0.1", 40000, "mpich")


def test_mpi_on_several_hosts_without_master_addr_or_mpi4py(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `import mpi4py` fail
    several_hosts = {**OPENMPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    with pytest.raises(ValueError, match="MASTER_ADDR.*mpi4py"):
        distributed.detect(several_hosts)


def test_slurm_master_is_first_node_and_port_follows_job_id() -> None:
    env = distributed.detect(SLURM)
    assert env == distributed.DistEnv(9, 16, 1, 8, "gpu07", 20000 + 123456 % 20000, "slurm")


def test_slurm_uneven_nodes_and_explicit_rendezvous() -> None:
    uneven = {
        **SLURM,
        "SLURM_STEP_TASKS_PER_NODE": "8,2",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "10",
    }
    env = distributed.detect({**uneven, "MASTER_ADDR": "login1", "MASTER_PORT": "30000"})
    assert (env.local_world_size, env.master_addr, env.master_port) == (2, "login1", 30000)


def test_slurm_falls_back_to_ntasks_per_node_and_job_nodelist() -> None:
    slurm = {k: v for k, v in SLURM.items() if not k.startswith("SLURM_STEP_")}
    slurm.update(SLURM_STEP_ID="0", SLURM_NTASKS_PER_NODE="8", SLURM_JOB_NODELIST="a1,b2")
    env = distributed.detect(slurm)
    assert (env.local_world_size, env.master_addr) == (8, "a1")


def test_sbatch_script_itself_is_a_single_process() -> None:
    batch_step = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"}
    assert distributed.detect(batch_step).launcher == "single"


@pytest.mark.parametrize("others", [OPENMPI, MPICH, SLURM, {**OPENMPI, **SLURM}])
def test_torchrun_wins_over_mpi_and_slurm(others: dict) -> None:
    """torchrun started by srun or mpirun: its own variables describe the worker."""
    assert distributed.detect({**others, **TORCHRUN}).launcher == "torchrun"


def test_mpi_wins_over_slurm() -> None:
    assert distributed.detect({**SLURM, **OPENMPI}).launcher == "openmpi"
    assert distributed.detect({**SLURM, **MPICH}).launcher == "mpich"


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("gpu5", ["gpu5"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("a[8-10]", ["a8", "a9", "a10"]),
        ("a[098-101]", ["a098", "a099", "a100", "a101"]),
        ("r[1-2]n[1,3]-ib", ["r1n1-ib", "r1n3-ib", "r2n1-ib", "r2n3-ib"]),
        ("x[1-2],y[3],z", ["x1", "x2", "y3", "z"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert distributed.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["a[1-", "a]1[", "a[3-1]", "a[x]", "a,,b", "a[1-2]]"])
def test_expand_nodelist_rejects_garbage(nodelist: str) -> None:
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        distributed.expand_nodelist(nodelist)


def test_parse_tasks_per_node() -> None:
    assert distributed.parse_tasks_per_node("8(x2),4,2(x1)") == [8, 8, 4, 2]
    with pytest.raises(ValueError, match="SLURM_STEP_TASKS_PER_NODE"):
        distributed.parse_tasks_per_node("8(2)")


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({**TORCHRUN, "RANK": "one"}, "RANK"),
        ({**TORCHRUN, "RANK": "8"}, "RANK"),
        ({**TORCHRUN, "RANK": "-1"}, "RANK"),
        ({k: v for k, v in TORCHRUN.items() if k != "WORLD_SIZE"}, "WORLD_SIZE"),
        ({**TORCHRUN, "LOCAL_RANK": "4"}, "LOCAL_RANK"),
        ({**TORCHRUN, "MASTER_PORT": "http"}, "MASTER_PORT"),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT"),
        ({**OPENMPI, "OMPI_COMM_WORLD_SIZE": "5.0"}, "OMPI_COMM_WORLD_SIZE"),
        ({**OPENMPI, "OMPI_COMM_WORLD_RANK": "8"}, "OMPI_COMM_WORLD_RANK"),
        ({**MPICH, "MPI_LOCALRANKID": "x"}, "MPI_LOCALRANKID"),
        ({**SLURM, "SLURM_PROCID": "16"}, "SLURM_PROCID"),
        ({**SLURM, "SLURM_JOB_ID": "abc"}, "SLURM_JOB_ID"),
        ({**SLURM, "SLURM_STEP_NODELIST": "gpu[1-"}, "SLURM_STEP_NODELIST"),
        ({**SLURM, "SLURM_STEP_TASKS_PER_NODE": "8,4", "SLURM_NODEID": "2"}, "SLURM_NODEID"),
    ],
)
def test_bad_values_name_the_variable(environ: dict, variable: str) -> None:
    with pytest.raises(ValueError, match=variable):
        distributed.detect(environ)


def test_helpers_work_without_a_process_group() -> None:
    env = distributed.detect({})
    distributed.init(env, distributed.select_device(env))
    t = torch.tensor([2.0])
    assert not distributed.is_initialized()
    assert (distributed.get_rank(), distributed.get_world_size()) == (0, 1)
    assert distributed.is_main_process()
    distributed.barrier()
    assert distributed.all_reduce_sum(t) is t and t.item() == 2.0
    assert distributed.broadcast_tensor(t, src=0) is t and t.item() == 2.0
    distributed.cleanup()


# --- real processes -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, **extra}


def _read_results(out_dir: Path) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def _check_pair(results: list[dict], launcher: str) -> None:
    for rank, result in enumerate(results):
        assert (result["rank"], result["world_size"], result["launcher"]) == (rank, 2, launcher)
        assert (result["local_rank"], result["local_world_size"]) == (rank, 2)
        assert (result["get_rank"], result["get_world_size"]) == (rank, 2)
        assert result["sum"] == 3.0  # (0 + 1) + (1 + 1)
        assert result["broadcast"] == 42.0


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_torchrun_two_ranks_all_reduce(tmp_path: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*torchrun, "--nproc-per-node", "2", str(WORKER), str(tmp_path), "sum"]
    _run(cmd, _child_env(), timeout=120)
    _check_pair(_read_results(tmp_path), "torchrun")


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun (openmpi-bin) is not installed")
def test_mpirun_two_ranks_all_reduce(tmp_path: Path) -> None:
    mpirun = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"]
    env = _child_env(MASTER_PORT=str(_free_port()))
    cmd = [*mpirun, "-x", "MASTER_PORT", "-x", "PYTHONPATH", sys.executable, str(WORKER)]
    _run([*cmd, str(tmp_path), "sum"], env, timeout=120)
    _check_pair(_read_results(tmp_path), "openmpi")


def _start_rank(rank: int, port: int, out_dir: Path, mode: str) -> subprocess.Popen:
    ranks = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
    env = _child_env(**ranks, LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cmd = [sys.executable, str(WORKER), str(out_dir), mode, "5"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("mode", ["dead", "stall"])
def test_collective_with_a_missing_rank_fails_instead_of_hanging(tmp_path: Path, mode: str) -> None:
    """Rank 1 exits (or sleeps) while rank 0 waits in an all-reduce with a 5 s timeout."""
    port = _free_port()
    ranks = [_start_rank(rank, port, tmp_path, mode) for rank in range(2)]
    try:
        output, _ = ranks[0].communicate(timeout=90)  # a hang fails the test here
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait(timeout=30)
    assert (tmp_path / "rank0.entered").exists(), output.decode()
    assert ranks[0].returncode != 0, output.decode()
    assert "PeerLostError: rank 1 (last at step " in output.decode(), output.decode()
    _check_pair(_read_results(tmp_path), "torchrun")
