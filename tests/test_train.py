"""The training engine: schedule, optimizer, checkpoints, resume, evaluation, and bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import nets
from iat.config import Config
from iat.data.augment import eval_transform
from iat.recipes.eval_schedule import EVAL_SCHEDULES
from iat.train.builders import build_optimizer, learning_rate
from main import main

TINY = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8"]
FAST = [*TINY, "--image-size", "32", "--batch", "4", "--workers", "0", "--loader", "local"]


def train_args(data: Path, logdir: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--logdir", str(logdir), *FAST,
        "--attack-iter", "2", "--attack-epsilon", "8", "--steps-per-epoch", "2",
        "--train-eval", "light", "--log-every", "1", *extra,
    ]  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- schedule and optimizer ------------------------------------------------------------------
def test_learning_rate_follows_imagenet_in_1_hour():
    cfg = Config(data="x")
    total = 2048  # peak 0.1 * 2048 / 256 = 0.8, warm-up from 0.1 over 5 epochs
    expected = {0: 0.1, 2.5: 0.45, 5: 0.8, 34.99: 0.8, 35: 0.08, 70: 0.008, 95: 0.0008, 109: 0.0008}
    for progress, lr in expected.items():
        assert learning_rate(progress, cfg, total) == pytest.approx(lr)


def test_small_total_batch_gets_a_nonzero_scaled_lr_without_warmup():
    cfg = Config(data="x")
    assert learning_rate(0, cfg, 32) == pytest.approx(0.0125)  # not 0 (integer division)
    assert learning_rate(40, cfg, 32) == pytest.approx(0.00125)


def test_weight_decay_only_on_conv_and_fc_weights():
    model = nets.build_model("ResNetDenoise", num_blocks=[1, 1, 1, 1], width=8, num_classes=5)
    optimizer = build_optimizer(model, Config(data="x"))
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    expected = {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    }
    assert decayed == expected
    assert optimizer.param_groups[0]["weight_decay"] == 1e-4
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9


def _evals(epoch: int, epochs: int) -> list[str]:
    return [s.name for s in EVAL_SCHEDULES["original"] if s.runs_after(epoch, epochs)]


def test_original_eval_schedule():
    names = {e: _evals(e, 110) for e in (1, 20, 30, 104, 106, 108, 109, 110)}
    assert names[1] == ["eval-clean", "eval-10step"]
    assert names[20] == ["eval-clean", "eval-10step", "eval-50step", "eval-100step"]
    assert names[30] == ["eval-clean", "eval-10step", "eval-100step"]
    assert names[104] == ["eval-clean", "eval-10step"]
    assert names[106] == names[108] == names[30]  # PGD-100 in the last 5 epochs
    assert names[109] == names[110] == names[20]  # PGD-50 in the last 2
    # Independent count over the recipe: PGD-50 after epochs 20, 40, 60, 80, 100, 109, 110.
    assert sum("eval-50step" in _evals(e, 110) for e in range(1, 111)) == 7
    assert sum("eval-100step" in _evals(e, 110) for e in range(1, 111)) == 11 + 4


def test_eval_schedule_scales_to_short_runs():
    # Each epoch of a short run stands for several of the recipe's: 2 and 3 epochs evaluate
    # alike, after each epoch (rounding the period gave 3 epochs every epoch and 2 epochs once).
    for epochs in (2, 3, 5):
        for epoch in range(1, epochs + 1):
            assert _evals(epoch, epochs) == [
                "eval-clean", "eval-10step", "eval-50step", "eval-100step"
            ]  # fmt: skip
    # A longer run never evaluates fewer times, and never more than the recipe's 7 / 15.
    for name, recipe in (("eval-50step", 7), ("eval-100step", 15)):
        counts = [sum(name in _evals(e, n) for e in range(1, n + 1)) for n in range(1, 111)]
        assert all(a <= b for a, b in zip(counts, counts[1:], strict=False))
        assert counts[-1] == recipe == max(counts)
    # 22 epochs: PGD-50 every 4 epochs (20 * 22 / 110) and in the last 1; PGD-100 every 2.
    assert [e for e in range(1, 23) if "eval-50step" in _evals(e, 22)] == [4, 8, 12, 16, 20, 22]
    assert [e for e in range(1, 23) if "eval-100step" in _evals(e, 22)] == list(range(2, 23, 2))


# --- a real run --------------------------------------------------------------------------------
def test_train_writes_checkpoints_config_metrics_and_resumes(tiny_imagenet, tmp_path, capsys):
    logdir = tmp_path / "run"
    args = train_args(tiny_imagenet, logdir, "--keep-checkpoints", "2")
    assert main([*args, "--epochs", "3"]) == 0
    assert sorted(p.name for p in logdir.glob("checkpoint-epoch*")) == [
        "checkpoint-epoch0002.pt",
        "checkpoint-epoch0003.pt",
    ]
    saved = json.loads((logdir / "config.json").read_text())
    assert saved["config"]["batch"] == 4 and saved["config"]["num_blocks"] == [1, 1, 1, 1]
    assert saved["run"]["world_size"] == 1 and saved["run"]["steps"] == 2
    records = read_jsonl(logdir / "metrics.jsonl")
    train_steps = [r["step"] for r in records if r["phase"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert all(0 <= r["train/attack_success_rate"] <= 1 for r in records if r["phase"] == "train")
    evals = [r for r in records if r["phase"] == "eval-10step"]
    assert [r["epoch"] for r in evals] == [1, 2, 3] and all(r["images"] == 7 for r in evals)
    events = EventAccumulator(str(logdir))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert [e.step for e in events.Scalars("eval-10step/top1_error")] == [2, 4, 6]

    state = torch.load(logdir / "checkpoint-epoch0003.pt", weights_only=True)
    assert state["epoch"] == 3 and state["step"] == 6

    capsys.readouterr()
    assert main([*args, "--epochs", "4"]) == 0
    assert "resuming from" in capsys.readouterr().err
    records = read_jsonl(logdir / "metrics.jsonl")
    assert [r["step"] for r in records if r["phase"] == "train"][-2:] == [7, 8]
    assert torch.load(logdir / "checkpoint-epoch0004.pt", weights_only=True)["step"] == 8


def test_load_of_a_training_checkpoint_continues_its_schedule(tiny_imagenet, tmp_path, capsys):
    first = tmp_path / "first"
    args = train_args(tiny_imagenet, first, "--train-eval", "none")
    assert main([*args, "--epochs", "1"]) == 0
    second = tmp_path / "second"
    load = ["--load", str(first / "checkpoint-epoch0001.pt")]
    assert (
        main([*train_args(tiny_imagenet, second, "--train-eval", "none"), *load, "--epochs", "2"])
        == 0
    )
    assert "after epoch 1" in capsys.readouterr().err
    records = read_jsonl(second / "metrics.jsonl")
    assert [r["step"] for r in records if r["phase"] == "train"] == [3, 4]
    assert [(r["phase"], r["epoch"]) for r in records if r["phase"] != "train"] == [
        ("checkpoint", 2)
    ]
    assert [p.name for p in second.glob("checkpoint-epoch*")] == ["checkpoint-epoch0002.pt"]


def test_eval_counts_match_a_direct_model_call(tiny_imagenet, tmp_path):
    logdir = tmp_path / "run"
    assert main([*train_args(tiny_imagenet, logdir, "--train-eval", "none"), "--epochs", "1"]) == 0
    ckpt = logdir / "checkpoint-epoch0001.pt"
    out = tmp_path / "eval.json"
    common = ["--eval", "--load", str(ckpt), "--data", str(tiny_imagenet), *FAST]
    assert main([*common, "--attack-iter", "0", "--eval-output", str(out)]) == 0
    result = json.loads(out.read_text())

    model = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=3).eval()
    nets.load_weights(model, ckpt)
    paths = sorted((tiny_imagenet / "val").glob("*/*.png"))
    images = np.stack([eval_transform(cv2.imread(str(p)), 32) for p in paths])
    labels = torch.tensor([int(p.parent.name[1:]) for p in paths])
    with torch.no_grad():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    assert result["images"] == 7
    assert result["top1_error"] == pytest.approx((logits.argmax(1) != labels).float().mean())
    assert result["top5_error"] == 0.0  # 3 classes: the label is always in the top 5
    # Clean evaluation reports no attack: no success rate, no attack settings.
    assert "attack_success_rate" not in result
    assert result["attack"] == {"name": "clean"} and result["threat_model"] == "clean"

    assert (
        main([*common, "--attack-iter", "3", "--attack-epsilon", "64", "--eval-output", str(out)])
        == 0
    )
    attacked = json.loads(out.read_text())
    assert attacked["attack"] == {
        "name": "pgd",
        "iter": 3,
        "epsilon": 64.0,
        "step_size": 64 / 3,  # the step PGD took: raised to epsilon / iterations (Sec 6.1)
        "step_size_requested": 1.0,
        "target": "random",
        "norm": "inf",
        "loss": "ce",
        "restarts": 1,
    }
    assert attacked["threat_model"] == "PGD-3 random target, L-inf eps=64, step 21.3333"
    assert attacked["robust_accuracy"] == pytest.approx(1 - attacked["top1_error"])
    assert attacked["top1_error"] >= result["top1_error"]


# --- bad input: one line naming the culprit, non-zero exit -------------------------------------
def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ")
    return lines[-1]


def test_missing_data_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(train_args(missing, tmp_path / "run")) == 1
    assert str(missing) in error_line(capsys)


def test_empty_class_folder(tiny_imagenet, tmp_path, capsys):
    (tiny_imagenet / "train" / "n99999").mkdir()
    assert main(train_args(tiny_imagenet, tmp_path / "run")) == 1
    assert "n99999" in error_line(capsys)


def eval_clean(data: Path, arch: str, tmp_path: Path) -> list[str]:
    """--eval arguments (a tiny --arch ResNet) for a fresh 3-class `arch` checkpoint (.npz)."""
    ckpt = tmp_path / f"{arch}.npz"
    nets.save_npz(nets.build_model(arch, num_blocks=[1, 1, 1, 1], width=8, num_classes=3), ckpt)
    return ["--eval", "--load", str(ckpt), "--data", str(data), *FAST, "--attack-iter", "0"]


def test_corrupt_validation_image_is_an_error(tiny_imagenet, tmp_path, capsys):
    bad = tiny_imagenet / "val" / "n00000" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(eval_clean(tiny_imagenet, "ResNet", tmp_path)) == 1
    assert "broken.png" in error_line(capsys)


def test_corrupt_training_image_is_skipped_and_named(tiny_imagenet, tmp_path, capsys):
    bad = tiny_imagenet / "train" / "n00001" / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    args = train_args(
        tiny_imagenet, tmp_path / "run", "--train-eval", "none", "--steps-per-epoch", "4"
    )
    assert main([*args, "--epochs", "1", "--batch", "4"]) == 0
    assert "broken.JPEG" in capsys.readouterr().err


def test_unknown_flag_values_are_one_line(capsys):
    assert main(["--fake", "--arch", "ResNot"]) == 1
    line = error_line(capsys)
    assert "ResNot" in line and "ResNeXtDenoiseAll" in line
    assert main(["--fake", "--loader", "carrier-pigeon"]) == 1
    assert "carrier-pigeon" in error_line(capsys)


def test_eval_takes_the_class_count_from_the_checkpoint(tiny_imagenet, tmp_path, capsys):
    common = ["--eval", "--data", str(tiny_imagenet), *FAST, "--attack-iter", "0"]
    for classes in (10, 2):
        ckpt = tmp_path / f"c{classes}.npz"
        model = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=classes)
        nets.save_npz(model, ckpt)
        # The data's 3 classes: the 10-class model's first ones only when said so.
        code = main([*common, "--load", str(ckpt), "--class-subset"])
        assert code == (0 if classes == 10 else 1)
    assert "val has 3 classes (n00000, n00001, n00002) but the model has 2 outputs" in (
        error_line(capsys)
    )


def test_load_of_a_wrong_architecture(tiny_imagenet, tmp_path, capsys):
    args = eval_clean(tiny_imagenet, "ResNetDenoise", tmp_path)  # evaluated as --arch ResNet
    assert main(args) == 1
    line = error_line(capsys)
    assert "ResNetDenoise.npz" in line and "group0_denoise" in line


def test_bad_flag_value_from_the_command_line(tmp_path):
    run = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "--fake", "--attack-iter", "-3"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == ["error: --attack-iter: must be >= 0, got -3"]


# --- the per-machine data server (the original's default source) ------------------------------
def test_training_pulls_batches_from_a_real_data_server(tiny_imagenet, tmp_path):
    address = f"ipc://@iat-test-{uuid.uuid4().hex}"
    server = subprocess.Popen(
        [sys.executable, str(REPO / "third_party" / "serve-data.py"), "--data", str(tiny_imagenet),
         "--batch", "4", "--image-size", "32", "--workers", "1", "--bind", address],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        args = train_args(tiny_imagenet, tmp_path / "run", "--train-eval", "none")
        args += ["--loader", "server", "--data-server", address, "--data-timeout", "60"]
        assert main([*args, "--epochs", "2"]) == 0
        records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
        assert [r["step"] for r in records if r["phase"] == "train"] == [1, 2, 3, 4]
        assert server.poll() is None, "the server must keep serving"
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_a_data_server_that_never_answers_is_one_clear_error(tiny_imagenet, tmp_path, capsys):
    address = f"ipc://@iat-nobody-{uuid.uuid4().hex}"
    args = train_args(tiny_imagenet, tmp_path / "run", "--train-eval", "none")
    args += ["--loader", "server", "--data-server", address, "--data-timeout", "1.5"]
    assert main(args) == 1
    line = error_line(capsys)
    assert address in line and "serve-data.py" in line and "--loader local" in line


def test_use_fp16xla_compiles_the_training_attack_only(tiny_imagenet, tmp_path, monkeypatch):
    calls = []
    real_compile = torch.compile

    def spy(fn, **kwargs):  # the same graph capture, without inductor's minute of codegen
        calls.append(kwargs)
        return real_compile(fn, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    # A CPU with AMX, where compiling the bf16 attack pays (iat.builders.attack_precision).
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    args = train_args(tiny_imagenet, tmp_path / "run", "--use-fp16xla", "--epochs", "1")
    assert main(args) == 0
    assert calls == [{"dynamic": False, "mode": "default"}]  # training; evaluation stays fp32
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in records if r["phase"].startswith("eval")]
    assert {r["phase"] for r in evals} == {"eval-clean", "eval-10step"}
    # Without bf16 units nothing is compiled: the attack stays fp32 and eager.
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    args = train_args(tiny_imagenet, tmp_path / "plain", "--use-fp16xla", "--epochs", "1")
    assert main(args) == 0 and len(calls) == 1


def test_watch_evaluates_each_new_checkpoint_exactly_once(tiny_imagenet, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    watcher = subprocess.Popen(
        [sys.executable, str(REPO / "main.py"), "--eval", "--watch", str(run),
         "--data", str(tiny_imagenet), "--image-size", "32", "--batch", "4", "--workers", "0",
         "--attack-iter", "0", "--num-examples", "5", "--watch-interval", "0.2",
         "--watch-timeout", "120", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # Trains while the watcher runs: two checkpoints appear one after the other.
        assert main([*train_args(tiny_imagenet, run, "--train-eval", "none"), "--epochs", "2"]) == 0
        out, err = watcher.communicate(timeout=120)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, err[-3000:]
    for epoch in (1, 2):  # each summary line names its checkpoint
        assert f"checkpoint-epoch{epoch:04d}.pt: clean: 5 images" in out, out
    assert "evaluated 2 checkpoint(s)" in err
    (first_key,) = {p.name.split(".")[1] for p in (run / "eval").glob("*.json")}
    assert first_key.startswith("clean-")
    for epoch in (1, 2):
        path = run / "eval" / f"checkpoint-epoch{epoch:04d}.{first_key}.json"
        record = json.loads(path.read_text())
        assert record["images"] == 5 and record["checkpoint"].endswith(f"epoch{epoch:04d}.pt")
        assert record["split"] == "val"
    assert not list((run / "eval").glob(".*"))  # no temporary file left
    watch = ["--eval", "--watch", str(run), "--data", str(tiny_imagenet), "--image-size", "32",
             "--batch", "4", "--workers", "0", "--num-examples", "5", "--threads", "1"]  # fmt: skip
    # A second watcher of the same threat model finds nothing new and stops at once (the run's
    # last epoch is done). In this process: the live watcher above was the separate one.
    capsys.readouterr()
    assert main([*watch, "--attack-iter", "0"]) == 0
    assert "evaluated 0 checkpoint(s)" in capsys.readouterr().err
    # Another attack is another threat model: every checkpoint again, beside the first results.
    assert main([*watch, "--attack", "fgm", "--attack-epsilon", "8"]) == 0
    out, err = capsys.readouterr()
    assert "evaluated 2 checkpoint(s)" in err, err
    assert "checkpoint-epoch0002.pt: FGM random target, L-inf eps=8" in out
    keys = sorted({p.name.split(".")[1] for p in (run / "eval").glob("*.json")})
    assert len(keys) == 2 and keys[1].startswith("fgm-") and first_key in keys
    assert len(list((run / "eval").glob("*.json"))) == 4


def test_eval_on_the_first_examples_of_the_train_split(tiny_imagenet, tmp_path):
    run = tmp_path / "run"
    assert main([*train_args(tiny_imagenet, run, "--train-eval", "none"), "--epochs", "1"]) == 0
    out = tmp_path / "eval.json"
    args = ["--eval", "--load", str(run / "checkpoint-epoch0001.pt"), "--data",
            str(tiny_imagenet), "--image-size", "32", "--workers", "0", "--attack-iter", "0",
            "--split", "train", "--num-examples", "5", "--eval-output", str(out)]  # fmt: skip
    assert main(args) == 0
    record = json.loads(out.read_text())
    assert record["images"] == 5 and record["split"] == "train"


def test_last_and_best_checkpoints_are_named_as_timm_users_expect(tiny_imagenet, tmp_path):
    """checkpoint-last.pt follows the newest checkpoint; checkpoint-best.pt is the epoch of the
    best PGD-10 robust accuracy and survives the pruning of its epoch's own file."""
    run = tmp_path / "run"
    args = train_args(tiny_imagenet, run, "--epochs", "3", "--keep-checkpoints", "1")
    assert main(args) == 0
    last = run / "checkpoint-last.pt"
    assert last.is_symlink() and os.readlink(last) == "checkpoint-epoch0003.pt"
    assert [p.name for p in run.glob("checkpoint-epoch*.pt")] == ["checkpoint-epoch0003.pt"]
    # Independently: the best epoch from the logged evaluations (the first of equals).
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval-10step/top1_error" in r]
    errors = [r["eval-10step/top1_error"] for r in evals]
    best_epoch = evals[errors.index(min(errors))]["epoch"]
    record = json.loads((run / "checkpoint-best.json").read_text())
    assert record == {
        "checkpoint": f"checkpoint-epoch{best_epoch:04d}.pt",
        "evaluation": "eval-10step",
        "robust_accuracy": pytest.approx(1 - min(errors)),
    }
    best = torch.load(run / "checkpoint-best.pt", weights_only=True)
    assert best["epoch"] == best_epoch
    out = tmp_path / "best.json"
    flags = ["--eval", "--load", str(run / "checkpoint-best.pt"), "--data", str(tiny_imagenet),
             *FAST, "--attack-iter", "0", "--eval-output", str(out)]  # fmt: skip
    assert main(flags) == 0
    assert json.loads(out.read_text())["images"] == 7
