"""slurm/*.sh: syntax, then real runs against a fake `srun` and `scontrol` that record calls."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.sh", "eval.sh")
SHARED = "common.sh"  # sourced by both

# Records one call as JSON. The data servers stay up until SIGTERM, noting that they were
# stopped; the training step waits until they are up, like a real training job would.
FAKE_SRUN = """\
import json, os, signal, sys, time
from pathlib import Path

log = Path(os.environ["FAKE_SRUN_LOG"])
name = "data" if "third_party/serve-data.py" in sys.argv else "job"
keys = ("MASTER_ADDR", "MASTER_PORT")
record = {"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: os.environ.get(k) for k in keys}}
if name == "data":
    signal.signal(signal.SIGTERM, lambda *_: ((log / "data.stopped").touch(), sys.exit(143)))
(log / f"{name}.json").write_text(json.dumps(record))
if name == "data":
    time.sleep(60)
elif "third_party/serve-data.py" in (log / "expect").read_text():
    deadline = time.monotonic() + 20
    while not (log / "data.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
"""
FAKE_SCONTROL = """\
import sys

if sys.argv[1:] != ["show", "hostnames", "gpu[1-2]"]:
    sys.exit(f"unexpected scontrol call {sys.argv[1:]}")
print("gpu1")
print("gpu2")
"""


def _write_tool(directory: Path, name: str, source: str) -> None:
    path = directory / name
    path.write_text(f"#!{sys.executable}\n{source}")
    path.chmod(0o755)


@pytest.fixture
def fake_repo(tmp_path: Path) -> Path:
    """A checkout with the real scripts and a placeholder main.py."""
    repo = tmp_path / "repo"
    (repo / "slurm").mkdir(parents=True)
    (repo / "main.py").touch()
    for script in (*SCRIPTS, SHARED):
        shutil.copy(REPO / "slurm" / script, repo / "slurm" / script)
    return repo


def _run(script: Path, tmp_path: Path, scontrol: bool = True, **env: str):
    """Run `script` from an unrelated cwd; return (process, {"data"|"job": record})."""
    bin_dir, log, elsewhere = tmp_path / "bin", tmp_path / "log", tmp_path / "elsewhere"
    for directory in (bin_dir, log, elsewhere):
        directory.mkdir(exist_ok=True)
    _write_tool(bin_dir, "srun", FAKE_SRUN)
    if scontrol:
        _write_tool(bin_dir, "scontrol", FAKE_SCONTROL)
    (log / "expect").write_text("third_party/serve-data.py" if script.name == "train.sh" else "")
    base = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        "FAKE_SRUN_LOG": str(log),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[1-2]",
        "SLURM_NNODES": "2",
        "DATA": "/data/imagenet",
        "BATCH": "17",
    }
    cmd = ["bash", str(script), "--extra-flag"]
    proc = subprocess.run(
        cmd, cwd=elsewhere, env={**base, **env}, capture_output=True, text=True, timeout=60
    )
    records = {p.stem: json.loads(p.read_text()) for p in log.glob("*.json")}
    return proc, records


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """srun's own options, and the command it launches."""
    start = argv.index("python")
    return argv[:start], argv[start:]


@pytest.mark.parametrize("script", (*SCRIPTS, SHARED))
def test_syntax(script: str) -> None:
    subprocess.run(["bash", "-n", str(REPO / "slurm" / script)], check=True, timeout=30)


def test_train_starts_one_data_server_per_node_then_trains(fake_repo: Path, tmp_path: Path) -> None:
    proc, records = _run(fake_repo / "slurm" / "train.sh", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert set(records) == {"data", "job"}

    options, command = _split(records["data"]["argv"])
    assert {"--ntasks=2", "--ntasks-per-node=1", "--nodes=2"} <= set(options)
    serve = "python third_party/serve-data.py --data /data/imagenet --batch 17"
    assert command == serve.split()
    # each node's server serves its share of the stream
    hosts = 'exec "$@" --hosts "$SLURM_NNODES" --host-index "$SLURM_NODEID"'
    assert options[-4:] == ["bash", "-c", hosts, "serve-data"]
    assert (tmp_path / "log" / "data.stopped").exists(), "data servers were not stopped"

    job = records["job"]
    expected = (
        "python main.py --data /data/imagenet --batch 17"
        " --attack-iter 30 --attack-epsilon 16 --attack-step-size 1"
        " --arch ResNet -d 152 --extra-flag"
    )
    assert _split(job["argv"])[1] == expected.split()
    assert job["env"] == {"MASTER_ADDR": "gpu1", "MASTER_PORT": None}
    assert job["cwd"] == records["data"]["cwd"] == str(fake_repo)


def test_eval_runs_main_with_the_attack(fake_repo: Path, tmp_path: Path) -> None:
    proc, records = _run(fake_repo / "slurm" / "eval.sh", tmp_path, CKPT="ckpt/model.pt")
    assert proc.returncode == 0, proc.stderr
    assert set(records) == {"job"}
    job = records["job"]
    expected = (
        "python main.py --eval --load ckpt/model.pt --data /data/imagenet --batch 17"
        " --attack-iter 100 --attack-epsilon 16 --arch ResNet -d 152 --extra-flag"
    )
    assert _split(job["argv"])[1] == expected.split()
    assert job["env"] == {"MASTER_ADDR": "gpu1", "MASTER_PORT": None}
    assert job["cwd"] == str(fake_repo)


def test_environment_overrides_defaults(fake_repo: Path, tmp_path: Path) -> None:
    overrides = {"ATTACK_ITER": "10", "ARCH": "ResNeXtDenoiseAll", "DEPTH": "101"}
    overrides.update(MASTER_ADDR="10.1.2.3", MASTER_PORT="31337")
    proc, records = _run(fake_repo / "slurm" / "eval.sh", tmp_path, CKPT="m.pt", **overrides)
    assert proc.returncode == 0, proc.stderr
    command = _split(records["job"]["argv"])[1]
    assert command[command.index("--attack-iter") + 1] == "10"
    assert command[command.index("--arch") :][:4] == ["--arch", "ResNeXtDenoiseAll", "-d", "101"]
    assert records["job"]["env"] == {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "31337"}


def test_without_scontrol_the_node_list_is_left_to_distributed_py(
    fake_repo: Path, tmp_path: Path
) -> None:
    proc, records = _run(fake_repo / "slurm" / "eval.sh", tmp_path, scontrol=False, CKPT="m.pt")
    assert proc.returncode == 0, proc.stderr
    assert records["job"]["env"] == {"MASTER_ADDR": None, "MASTER_PORT": None}


def test_eval_without_checkpoint_fails_before_launching(fake_repo: Path, tmp_path: Path) -> None:
    proc, records = _run(fake_repo / "slurm" / "eval.sh", tmp_path)
    assert proc.returncode != 0 and "CKPT" in proc.stderr
    assert records == {}


def test_sbatch_copy_finds_the_repository_through_the_submit_dir(
    fake_repo: Path, tmp_path: Path
) -> None:
    """sbatch runs a copy of the script from its spool directory."""
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(fake_repo / "slurm" / "eval.sh", spool / "slurm_script")
    proc, records = _run(spool / "slurm_script", tmp_path, CKPT="m.pt")
    assert proc.returncode != 0 and "cannot find the repository" in proc.stderr
    assert records == {}
    proc, records = _run(
        spool / "slurm_script", tmp_path, CKPT="m.pt", SLURM_SUBMIT_DIR=str(fake_repo)
    )
    assert proc.returncode == 0, proc.stderr
    assert records["job"]["cwd"] == str(fake_repo)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_port_is_left_to_distributed_py(fake_repo: Path, tmp_path: Path, script: str) -> None:
    """The port is decided once, by distributed.py from the job id: the scripts export none,
    and say so."""
    proc, records = _run(fake_repo / "slurm" / script, tmp_path, CKPT="m.pt")
    assert proc.returncode == 0, proc.stderr
    assert records["job"]["env"]["MASTER_PORT"] is None
    assert "rank 0 at gpu1:<from the job id>" in proc.stdout
