"""slurm/*.sh as written, under a real Slurm: sbatch, scancel, resubmission, evaluation.

The cluster is the one-machine cluster of tests/cluster/start-slurm.sh (CI starts it: .ci/run),
or any cluster `sinfo` answers for (SLURM_CONF). Without one the tests are skipped, saying why.
Each job gets the README's small-machine overrides (2 tasks of 1 CPU, no GPU) and a tiny model;
every wait is bounded, and a test's jobs are cancelled when it ends, also on failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import copy_sources, write_imagenet

import nets

pytestmark = pytest.mark.slurm

# What a user of a CPU-only (or small) cluster adds to `sbatch`: the scripts ask for 8 GPUs,
# 10 CPUs per task and 200G by default (README, "Launchers").
SMALL_MACHINE = [
    "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--mem=0",
    "--time=10",
]  # fmt: skip
TINY = ["--num-blocks", "1", "1", "1", "1", "--width", "8"]
# BATCH 5: the data server's default address (ipc://@imagenet-train-b5) is no other test's.
SCRIPT_ENV = {"BATCH": "5", "ATTACK_EPSILON": "8"}
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED",
}  # fmt: skip
COPIED = ("main.py", "adv_model.py", "iat", "nets", "third_party", "slurm")


def _cluster_env() -> dict[str, str]:
    env = dict(os.environ)
    default_conf = Path(os.environ.get("IAT_SLURM_DIR", "/tmp/iat-slurm")) / "slurm.conf"
    if "SLURM_CONF" not in env and default_conf.exists():
        env["SLURM_CONF"] = str(default_conf)
    return {k: v for k, v in env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}


def _skip_reason(env: dict[str, str]) -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not installed (apt-get install slurm-wlm munge)"
    try:
        info = subprocess.run(
            ["sinfo", "-h", "-o", "%t %c"], env=env, capture_output=True, text=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s"
    nodes = [line.split() for line in info.stdout.splitlines() if line.strip()]
    usable = [n for n in nodes if n[0] in ("idle", "mix") and int(n[1].rstrip("+")) >= 2]
    if info.returncode != 0 or not usable:
        why = info.stderr.strip().splitlines()[-1:] or [f"nodes: {info.stdout.strip()!r}"]
        return (
            f"no Slurm node with 2 free CPUs answers ({why[0]}); start tests/cluster/start-slurm.sh"
        )
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment jobs are submitted with: the cluster's SLURM_CONF and a `python` that is
    this interpreter (the scripts call `python`), on PATH."""
    env = _cluster_env()
    reason = _skip_reason(env)
    if reason:
        pytest.skip(reason)
    bin_dir = tmp_path_factory.mktemp("bin")
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = ""  # the copy's own packages, from its root
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the code to submit from (its logs/ and train_log/ stay out of the repository)."""
    root = copy_sources(tmp_path_factory.mktemp("checkout"), COPIED)
    (root / "logs").mkdir()  # README: mkdir -p logs && sbatch ...
    return root


class Jobs:
    """Submits from the checkout and waits on jobs; cancels what it submitted at the end."""

    def __init__(self, env: dict[str, str], checkout: Path) -> None:
        self.env, self.checkout, self.submitted = env, checkout, []

    def submit(self, script: str, args: list[str], **variables: str) -> str:
        cmd = ["sbatch", "--parsable", *SMALL_MACHINE, f"slurm/{script}", *args]
        env = {**self.env, **SCRIPT_ENV, **variables}
        proc = subprocess.run(
            cmd, cwd=self.checkout, env=env, capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
        job = proc.stdout.strip().split(";")[0]
        self.submitted.append(job)
        return job

    def state(self, job: str) -> str:
        cmd = ["scontrol", "show", "job", "-o", job]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=15)
        match = re.search(r"\bJobState=(\S+)", proc.stdout)
        return match[1] if match else "UNKNOWN"

    def wait(self, job: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.state(job)) not in FINAL_STATES:
            if time.monotonic() > deadline:
                self.cancel(job)
                pytest.fail(f"job {job} still {state} after {timeout:g} s:\n{self.log(job)}")
            time.sleep(0.5)
        return state

    def cancel(self, job: str) -> None:
        subprocess.run(["scancel", job], env=self.env, capture_output=True, timeout=15)

    def log(self, job: str) -> str:
        return "\n".join(p.read_text()[-3000:] for p in self.checkout.glob(f"logs/*-{job}*"))


@pytest.fixture
def jobs(cluster: dict[str, str], checkout: Path) -> Iterator[Jobs]:
    submitted = Jobs(cluster, checkout)
    yield submitted
    for job in submitted.submitted:
        submitted.cancel(job)


def _wait_for(path: Path, jobs: Jobs, job: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        state = jobs.state(job)
        if state in FINAL_STATES or time.monotonic() > deadline:
            pytest.fail(f"no {path.name} (job {job}: {state}):\n{jobs.log(job)}")
        time.sleep(0.2)


def test_slurm_train_cancelled_then_resubmitted_resumes(jobs: Jobs, tmp_path: Path) -> None:
    """sbatch slurm/train.sh (its data server, 2 tasks), scancel after the first checkpoint;
    the same submission again resumes from it and completes the run."""
    data = write_imagenet(tmp_path / "imagenet")
    logdir = tmp_path / "run"
    flags = [*TINY, "--steps-per-epoch", "4", "--epochs", "3", "--train-eval", "none"]
    variables = {"DATA": str(data), "LOGDIR": str(logdir), "DATA_CPUS": "1", "ATTACK_ITER": "1"}

    first = jobs.submit("train.sh", flags, **variables)
    _wait_for(logdir / "checkpoint-epoch0001.pt", jobs, first, timeout=180)
    jobs.cancel(first)
    assert jobs.wait(first, timeout=60) == "CANCELLED", jobs.log(first)
    assert not (logdir / "checkpoint-epoch0003.pt").exists(), "the job ended before scancel"
    done = sorted(p.name for p in logdir.glob("checkpoint-epoch*.pt"))

    second = jobs.submit("train.sh", flags, **variables)
    assert jobs.wait(second, timeout=240) == "COMPLETED", jobs.log(second)
    log = jobs.log(second)
    assert f"resuming from {logdir / done[-1]}" in log, log
    assert "2 process(es) (slurm)" in log, log
    assert "serving on ipc://@imagenet-train-b5" in log, log
    assert {f"checkpoint-epoch000{e}.pt" for e in (1, 2, 3)} <= {p.name for p in logdir.iterdir()}
    config = json.loads((logdir / "config.json").read_text())
    assert (config["run"]["world_size"], config["run"]["launcher"]) == (2, "slurm")


def test_slurm_eval_writes_its_result(jobs: Jobs, tmp_path: Path) -> None:
    """CKPT=... sbatch slurm/eval.sh: 2 tasks attack the 7 validation images once each."""
    data = write_imagenet(tmp_path / "imagenet")
    ckpt, result = tmp_path / "w.pt", tmp_path / "eval.json"
    torch.manual_seed(0)
    nets.save_weights(
        nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=3), ckpt
    )
    flags = [*TINY, "--eval-output", str(result)]
    job = jobs.submit("eval.sh", flags, DATA=str(data), CKPT=str(ckpt), ATTACK_ITER="2")
    assert jobs.wait(job, timeout=180) == "COMPLETED", jobs.log(job)
    record = json.loads(result.read_text())
    assert (record["images"], record["world_size"]) == (7, 2)
    assert record["threat_model"] == "PGD-2 random target, L-inf eps=8, step 4"
