"""Real multi-process runs on the CPU (Gloo): torchrun and mpirun launch main.py's code paths."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, check_ranks_trained_alike, write_imagenet

import nets

TINY = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8"]
FAST = [*TINY, "--image-size", "32", "--batch", "2", "--workers", "0", "--loader", "local"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], script: str, args: list[str], timeout: int = 240, ok=True, **env):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **env}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [*launcher, script, *args]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert (run.returncode == 0) == ok, f"{cmd} exited {run.returncode}:\n{run.stderr[-3000:]}"
    return run


def torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n)]


def mpirun(n: int) -> list[str]:
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (Debian: apt-get install openmpi-bin)")
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(n), sys.executable]


def train_flags(data: Path, logdir: Path) -> list[str]:
    return [
        "--data", str(data), "--logdir", str(logdir), *FAST, "--attack-iter", "2",
        "--attack-epsilon", "8", "--steps-per-epoch", "3", "--epochs", "1", "--train-eval", "none",
    ]  # fmt: skip


@pytest.mark.parametrize("launcher", [torchrun, mpirun], ids=["torchrun", "mpirun"])
def test_two_ranks_train_to_identical_parameters(launcher, tiny_imagenet, tmp_path):
    launch(
        launcher(2),
        "tests/train_worker.py",
        [str(tmp_path), *train_flags(tiny_imagenet, tmp_path / "run")],
    )
    check_ranks_trained_alike(tmp_path)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["run"]["world_size"] == 2
    assert (tmp_path / "run" / "checkpoint-epoch0001.pt").exists()


def test_eval_counts_every_image_once_whatever_the_number_of_processes(tiny_imagenet, tmp_path):
    ckpt = tmp_path / "w.pt"
    torch.manual_seed(0)
    nets.save_weights(
        nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=3), ckpt
    )
    flags = [
        "--eval", "--load", str(ckpt), "--data", str(tiny_imagenet), *FAST,
        "--attack-iter", "2", "--attack-epsilon", "16",
    ]  # fmt: skip
    results = []
    for n, launcher in ((1, [sys.executable]), (2, torchrun(2)), (3, torchrun(3))):
        out = tmp_path / f"eval{n}.json"
        launch(launcher, "main.py", [*flags, "--eval-output", str(out)])
        result = json.loads(out.read_text())
        assert result["world_size"] == n
        results.append(result)
    for r in results:
        assert r["images"] == 7
        for key in ("top1_error", "top5_error", "attack_success_rate"):
            assert r[key] == results[0][key], (key, [x[key] for x in results])


ZOO = ["fgm", "fgm-minimal", "pgd", "apgd-ce", "apgd-t", "fab-t", "strong", "square", "autoattack"]


@pytest.mark.parametrize("launcher", [torchrun, mpirun], ids=["torchrun", "mpirun"])
def test_every_attack_counts_the_same_on_one_and_two_processes(tmp_path, launcher):
    """The attack zoo (tests/eval_worker.py: 9 images in batches of 2, so the ranks get 3 and 2
    batches) gives the same counts and the same attacker figures on 1 and 2 processes."""
    data = write_imagenet(tmp_path / "imagenet", classes=5, val_images=9)
    ckpt = tmp_path / "w.pt"
    torch.manual_seed(0)
    nets.save_weights(
        nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=5), ckpt
    )
    records = {}
    for n, command in ((1, [sys.executable]), (2, launcher(2))):
        out = tmp_path / f"world{n}"
        out.mkdir()
        launch(command, "tests/eval_worker.py", [str(out), str(ckpt), str(data), *ZOO])
        records[n] = {a: json.loads((out / f"{a}.json").read_text()) for a in ZOO}
    for attack in ZOO:
        one, two = records[1][attack], records[2][attack]
        assert (one["world_size"], two["world_size"]) == (1, 2)
        assert one["images"] == 9 and one["attack"]["name"] == attack
        del one["world_size"], two["world_size"]
        assert one == two, attack
    strong = records[1]["strong"]
    # The ensemble's own count of broken examples is the evaluator's top-1 error.
    assert strong["details"]["ensemble_success_rate"] == pytest.approx(strong["top1_error"])
    assert strong["robust_accuracy"] == pytest.approx(1 - strong["top1_error"])
    assert strong["threat_model"].startswith("strong (worst case of APGD-CE-2, APGD-T-2 top-2")
    median = records[1]["fgm-minimal"]["details"]["median_min_epsilon"]
    assert median == float("inf") or 0 <= median <= 16, median


def test_ranks_that_would_resume_from_different_points_stop(tiny_imagenet, tmp_path):
    logdir = tmp_path / "run"
    flags = train_flags(tiny_imagenet, logdir)
    launch([sys.executable], "main.py", [*flags, "--logdir", f"{logdir}-rank0"])
    assert (tmp_path / "run-rank0" / "checkpoint-epoch0001.pt").exists()
    run = launch(
        torchrun(2), "tests/train_worker.py", [str(tmp_path), *flags, "--epochs", "2"],
        ok=False, TEST_LOGDIR_PER_RANK="1",
    )  # fmt: skip
    assert "processes would resume from different points" in run.stderr
    assert "filesystem that every machine sees" in run.stderr


def test_a_defended_checkpoint_evaluates_the_same_on_one_process_and_under_mpirun(
    tiny_imagenet, tmp_path
):
    """A checkpoint trained with a JPEG + noise defense reloads as defended (BPDA for JPEG, EOT
    for the noise) and gives the same counts on 1 process and on 2 under mpirun: the noise is
    drawn per evaluation batch, not per process."""
    logdir = tmp_path / "run"
    flags = [*train_flags(tiny_imagenet, logdir), "--steps-per-epoch", "1"]
    launch([sys.executable], "main.py", [*flags, "--defense", "jpeg:50,noise:4"])
    ckpt = logdir / "checkpoint-epoch0001.pt"
    evaluate = [
        "--eval", "--load", str(ckpt), "--data", str(tiny_imagenet), "--image-size", "32",
        "--batch", "2", "--workers", "0", "--attack-iter", "2", "--eot-samples", "2",
    ]  # fmt: skip
    results = {}
    for n, launcher in ((1, [sys.executable]), (2, mpirun(2))):
        out, export = tmp_path / f"eval{n}.json", tmp_path / f"adv{n}"
        flags = [*evaluate, "--eval-output", str(out), "--export-adversarial", str(export)]
        run = launch(launcher, "main.py", flags)
        results[n] = json.loads(out.read_text())
        assert "attacked through BPDA (identity backward) for jpeg:50 and EOT over 2" in run.stdout
    one, two = results[1], results[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["defense"] == two["defense"] == "jpeg:50,noise:4"
    for key in ("images", "top1_error", "top5_error", "attack_success_rate"):
        assert one[key] == two[key], key
    # The attack followed the same EOT draws: the same adversarial images, byte for byte.
    files = sorted(p.relative_to(tmp_path / "adv1") for p in (tmp_path / "adv1").rglob("*.png"))
    assert len(files) == 7
    for name in files:
        assert (tmp_path / "adv1" / name).read_bytes() == (tmp_path / "adv2" / name).read_bytes()


def test_free_training_resumes_bit_exactly_on_two_processes(tiny_imagenet, tmp_path):
    """Each rank's free-training perturbation follows its own data: the checkpoint holds both,
    and a run stopped after epoch 1 and relaunched equals the uninterrupted one."""
    free = ["--free-replays", "2", "--adv-method", "pgd_8_2_1", "--steps-per-epoch", "3"]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    launch(torchrun(2), "main.py", [*train_flags(tiny_imagenet, whole), *free, "--epochs", "2"])
    for epochs in ("1", "2"):
        launch(torchrun(2), "main.py", [*train_flags(tiny_imagenet, halves), *free,
                                        "--epochs", epochs])  # fmt: skip
    states = [
        torch.load(run / "checkpoint-epoch0002.pt", weights_only=True) for run in (whole, halves)
    ]
    for key, value in states[0]["model"].items():
        assert torch.equal(value, states[1]["model"][key]), key
    deltas = states[0]["free_delta"]
    assert torch.equal(deltas, states[1]["free_delta"])
    assert deltas.shape[0] == 2 and not torch.equal(deltas[0], deltas[1])  # one per rank


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _state_lines(folder: Path) -> int:
    return sum(p.read_text().count("\n") for p in folder.glob("*.jsonl"))


def test_killed_evaluation_resumes_to_the_uninterrupted_counts(tmp_path):
    """SIGKILL a 2-process `strong` evaluation mid-run; relaunched with the same command (and,
    from a copy of its state, on 1 process) it reports exactly the uninterrupted numbers."""
    data = write_imagenet(tmp_path / "imagenet", classes=4, val_images=40)  # APGD-T: 4 classes
    ckpt = tmp_path / "w.pt"
    torch.manual_seed(0)
    model = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=4)
    with torch.no_grad():  # predictions that depend on the image
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    nets.save_weights(model, ckpt)
    flags = [
        "--eval", "--load", str(ckpt), "--data", str(data), *TINY, "--image-size", "48",
        "--batch", "2", "--workers", "0", "--attack", "strong", "--attack-iter", "20",
        "--apgd-targets", "2", "--attack-epsilon", "4",
    ]  # fmt: skip
    whole = tmp_path / "whole.json"
    launch(torchrun(2), "main.py", [*flags, "--eval-output", str(whole)])
    assert not Path(f"{whole}.state").exists()  # removed once the result is written

    killed = tmp_path / "killed.json"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [*torchrun(2), "main.py", *flags, "--eval-output", str(killed)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    state = Path(f"{killed}.state")
    deadline = time.monotonic() + 120
    while _state_lines(state) < 6 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    ranks = _descendants(proc.pid)  # torchrun starts its ranks in sessions of their own
    for pid in [proc.pid, *ranks]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    done = _state_lines(state)
    assert 6 <= done < 20 and not killed.exists(), done  # killed mid-run
    copy = tmp_path / "copy.state"
    shutil.copytree(state, copy)

    resumed = launch(torchrun(2), "main.py", [*flags, "--eval-output", str(killed)])
    assert f"resuming the evaluation from {state}: " in resumed.stdout
    one = tmp_path / "one.json"
    launch([sys.executable], "main.py", [*flags, "--eval-output", str(one), "--eval-state",
                                          str(copy)])  # fmt: skip
    expected = json.loads(whole.read_text())
    for path in (killed, one):
        result = json.loads(path.read_text())
        for key in ("images", "top1_error", "top5_error", "attack_success_rate", "details"):
            assert result[key] == expected[key], (path.name, key, result[key], expected[key])
    assert not state.exists() and not copy.exists()
