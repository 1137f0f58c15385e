"""What a first user meets: resource choices said and recorded, shared file modes, re-runs."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import train_tiny, write_imagenet

import nets
from iat.app.cli import build_parser
from iat.builders import attack_precision
from iat.runs.trackers.mlflow_runs import MLFLOW_CHECK_SECONDS
from iat.runtime.cpus import usable_cpus
from main import main

TINY = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8"]


def short_run(data: Path, logdir: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--logdir", str(logdir), *TINY, "--image-size", "32",
        "--batch", "4", "--loader", "local", "--attack-iter", "1", "--attack-epsilon", "4",
        "--steps-per-epoch", "1", "--epochs", "1", "--train-eval", "none", *extra,
    ]  # fmt: skip


@pytest.fixture()
def umask():
    """Set a umask for the test, restore it afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600)])
def test_every_output_file_respects_the_umask(tiny_imagenet, tmp_path, umask, mask, expected):
    umask(mask)
    run = tmp_path / "run"
    assert main(short_run(tiny_imagenet, run)) == 0
    ckpt = run / "checkpoint-epoch0001.pt"
    result, predictions = tmp_path / "eval.json", tmp_path / "predictions.txt"
    common = ["--load", str(ckpt), *TINY, "--image-size", "32", "--workers", "0"]
    assert main(["--eval", "--data", str(tiny_imagenet), *common, "--attack-iter", "0",
                 "--eval-output", str(result)]) == 0  # fmt: skip
    assert main(["--eval-directory", str(tiny_imagenet / "val" / "n00000"), *common,
                 "--prediction-file", str(predictions)]) == 0  # fmt: skip
    for path in (ckpt, run / "config.json", run / "metrics.jsonl", result, predictions):
        assert _mode(path) == expected, path
    assert result.read_text().endswith("}\n")


def test_threads_workers_and_attack_precision_are_said_and_recorded(
    tiny_imagenet, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    run = tmp_path / "run"
    assert main(short_run(tiny_imagenet, run)) == 0
    share = usable_cpus()  # one process: all usable CPUs
    first = capsys.readouterr().err.splitlines()[0]
    assert f"{share} thread(s) each ({share} usable CPUs)" in first
    assert "attack: fp32, eager" in first
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["threads"] == share and record["run"]["threads"] == share
    assert record["config"]["workers"] == min(8, share)
    assert record["run"]["attack_precision"] == "fp32, eager"
    assert main(short_run(tiny_imagenet, tmp_path / "one", "--threads", "1")) == 0
    assert json.loads((tmp_path / "one" / "config.json").read_text())["run"]["threads"] == 1
    # An explicit OMP_NUM_THREADS wins over the automatic share (it was ignored).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    capsys.readouterr()
    assert main(short_run(tiny_imagenet, tmp_path / "omp")) == 0
    assert "1 thread(s) each" in capsys.readouterr().err.splitlines()[0]


def test_fast_attack_uses_bf16_only_on_cpus_with_bf16_units(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert attack_precision(False, cpu).description == "fp32, eager"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    emulated = attack_precision(True, cpu)
    assert not emulated.autocast and not emulated.compiled
    assert "no bf16 units" in emulated.description
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    no_amx = attack_precision(True, cpu)  # compiling measured slower there: eager bf16
    assert no_amx.autocast and not no_amx.compiled and no_amx.description.startswith("bf16")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    amx = attack_precision(True, cpu)
    assert amx.autocast and amx.compiled and amx.description.startswith("bf16")
    gpu = attack_precision(True, cuda)
    assert gpu.autocast and gpu.compiled and gpu.description.startswith("fp16")
    assert gpu.dtype == torch.float16


def test_fast_attack_dtype_bf16_on_cuda_and_never_fp16_on_a_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    bf16 = attack_precision(True, cuda, "bfloat16")
    assert (bf16.autocast, bf16.compiled, bf16.dtype) == (True, True, torch.bfloat16)
    assert bf16.description.startswith("bf16")
    assert attack_precision(True, cuda, "float16").dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="no bf16 units"):
        attack_precision(True, cuda, "bfloat16")
    with pytest.raises(ValueError, match="--fast-attack-dtype float16: .* bf16"):
        attack_precision(True, cpu, "float16")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    assert attack_precision(True, cpu, "bfloat16").dtype == torch.bfloat16


def test_fast_attack_dtype_needs_use_fp16xla(tiny_imagenet, tmp_path, capsys):
    flags = short_run(tiny_imagenet, tmp_path / "run") + ["--fast-attack-dtype", "bfloat16"]
    assert main(flags) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--fast-attack-dtype bfloat16: needs --use-fp16xla"), err
    assert not (tmp_path / "run").exists()


def test_a_finished_run_says_so_and_trains_nothing(tiny_imagenet, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(short_run(tiny_imagenet, run)) == 0
    ckpt = run / "checkpoint-epoch0001.pt"
    before = (ckpt.stat().st_mtime_ns, (run / "metrics.jsonl").read_text())
    capsys.readouterr()
    assert main(short_run(tiny_imagenet, run)) == 0
    err = capsys.readouterr().err
    assert "already complete (1 of 1 epochs)" in err and "epoch 1/1" not in err
    assert (ckpt.stat().st_mtime_ns, (run / "metrics.jsonl").read_text()) == before


def test_an_empty_data_folder_is_named(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(short_run(empty, tmp_path / "run")) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "has neither train/ nor val/" in line and str(empty) in line
    assert not (tmp_path / "run").exists()


def test_mlflow_run_holds_parameters_metrics_and_the_checkpoint(tiny_imagenet, tmp_path):
    from mlflow.tracking import MlflowClient

    from iat.runs.trackers.mlflow_runs import MLFLOW_EXPERIMENT, mlflow_uri

    store = tmp_path / "mlruns"
    run = tmp_path / "run"
    args = short_run(
        tiny_imagenet, run, "--epochs", "2", "--log-every", "1", "--mlflow", str(store)
    )
    assert main(args) == 0
    ckpt = run / "checkpoint-epoch0002.pt"
    assert main(["--eval", "--load", str(ckpt), "--data", str(tiny_imagenet), *TINY,
                 "--image-size", "32", "--workers", "0", "--attack-iter", "1",
                 "--mlflow", str(store)]) == 0  # fmt: skip

    client = MlflowClient(mlflow_uri(str(store)))  # MLflow's own client reads it back
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    train, evaluation = runs["run"], runs["eval checkpoint-epoch0002.pt"]
    assert train.info.status == "FINISHED" and evaluation.info.status == "FINISHED"
    assert train.data.params["arch"] == "ResNet" and train.data.params["attack_iter"] == "1"
    assert train.data.tags["checkpoint"] == str(ckpt)
    losses = client.get_metric_history(train.info.run_id, "train/loss")
    logged = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    expected = [(r["step"], r["train/loss"]) for r in logged if r["phase"] == "train"]
    history = sorted((m.step, m.value) for m in losses)
    assert [step for step, _ in history] == [step for step, _ in expected] == [1, 2]
    assert [v for _, v in history] == pytest.approx([v for _, v in expected])
    assert evaluation.data.metrics["eval/images"] == 7
    assert 0 <= evaluation.data.metrics["eval/attack_success_rate"] <= 1


def _tiny_checkpoint(path: Path) -> Path:
    nets.save_npz(nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=3), path)
    return path


def _fails_with_one_line_and_no_files(tiny_imagenet, tmp_path, capsys, mlflow: str) -> str:
    """Training and --eval with `--mlflow MLFLOW` both fail with one line; nothing is left."""
    run, result = tmp_path / "run", tmp_path / "eval.json"
    checkpoint = _tiny_checkpoint(tmp_path / "model.npz")
    before = sorted(tmp_path.rglob("*"))
    assert main(short_run(tiny_imagenet, run, "--mlflow", mlflow)) == 1
    train_err = capsys.readouterr().err
    assert main(["--eval", "--load", str(checkpoint), "--data", str(tiny_imagenet), *TINY,
                 "--image-size", "32", "--workers", "0", "--eval-output", str(result),
                 "--mlflow", mlflow]) == 1  # fmt: skip
    eval_err = capsys.readouterr().err
    for err in (train_err, eval_err):
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
    assert train_err == eval_err
    assert sorted(tmp_path.rglob("*")) == before  # no run directory, event file, metrics, state
    return train_err


@pytest.mark.parametrize("server", ["refusing", "silent"])
def test_an_unreachable_mlflow_server_is_one_line_in_seconds(
    tiny_imagenet, tmp_path, capsys, server
):
    """A loopback port that refuses connections, or accepts them and never answers: said within
    MLFLOW_CHECK_SECONDS (MLflow's client would retry for minutes), before any file exists."""
    with socket.socket() as port:
        port.bind(("127.0.0.1", 0))
        if server == "silent":
            port.listen()
        uri = f"http://127.0.0.1:{port.getsockname()[1]}/"
        start = time.monotonic()
        line = _fails_with_one_line_and_no_files(tiny_imagenet, tmp_path, capsys, uri)
        elapsed = time.monotonic() - start
    assert f"--mlflow: no MLflow tracking server answers at {uri} within 5 s" in line
    assert elapsed < 2 * MLFLOW_CHECK_SECONDS + 20, elapsed  # two runs, each bounded


def test_mlflow_not_installed_is_one_line_and_leaves_nothing(
    tiny_imagenet, tmp_path, capsys, monkeypatch
):
    for module in ("mlflow", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    store = tmp_path / "mlruns"
    line = _fails_with_one_line_and_no_files(tiny_imagenet, tmp_path, capsys, str(store))
    assert "--mlflow: MLflow is not installed (pip install -e '.[mlflow]')" in line


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="TensorFlow (the convert extra) absent"
)
def test_tensorboard_logging_never_imports_tensorflow(tmp_path):
    """With TensorFlow installed (the convert extra) TensorBoard's writer would import it in
    every training process; the run logger keeps it to TensorBoard's stub, and the events
    still read back."""
    code = (
        "import sys\n"
        "from iat.runs.trackers.tensorboard_events import TensorBoardBackend\n"
        f"b = TensorBoardBackend({str(tmp_path)!r})\n"
        "b.scalars(3, {'train/loss': 0.25}, {})\n"
        "b.close()\n"
        "print('tensorflow' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False" and "oneDNN" not in run.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 0.25)]


def test_a_flag_prefix_is_not_taken_for_another_flag(capsys):
    """--lr was silently stored as --lr-decay-epochs (argparse's abbreviations): now one line
    naming the closest real flags."""
    from main import main

    assert main(["--fake", "--lr", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments: --lr 2" in err[0], err
    assert "--base-lr" in err[0]


def test_every_attack_choice_help_offers_is_an_evaluation_attack(capsys):
    """--attack free / fgsmrs were offered and ended in a KeyError: training-only attacks are
    not choices of --attack (--adv-method takes them)."""
    from iat.attacks import ATTACKS
    from iat.config import choices
    from main import main

    offered = choices()["attack"]
    assert {"free", "fgsmrs"} <= set(ATTACKS) and not {"free", "fgsmrs"} & set(offered)
    assert {"pgd", "strong", "autoattack", "square", "fab-t"} <= set(offered)
    assert main(["--eval", "--data", "d", "--load", "m.pt", "--attack", "free"]) == 1
    assert "invalid choice: 'free'" in capsys.readouterr().err


def test_a_class_count_that_differs_from_the_model_is_refused(tiny_imagenet, tmp_path, capsys):
    """A 5-class checkpoint on a 3-class folder evaluated without a word (labels then name other
    classes); now one line naming both counts, unless --class-subset says the 3 are its first."""
    from conftest import write_imagenet

    run = tmp_path / "run"
    five = write_imagenet(tmp_path / "five", classes=5)
    assert main(short_run(five, run)) == 0
    capsys.readouterr()
    ckpt = str(run / "checkpoint-epoch0001.pt")
    flags = ["--eval", "--load", ckpt, "--data", str(tiny_imagenet), "--image-size", "32",
             "--workers", "0", "--attack-iter", "0"]  # fmt: skip
    assert main(flags) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: --data: {tiny_imagenet / 'val'} has 3 classes (n00000, n00001, n00002) but the "
        "model has 5 outputs; if they are its first classes, in this order, give --class-subset"
    ]
    assert main([*flags, "--class-subset"]) == 0
    assert "clean: 7 images" in capsys.readouterr().out
    # More classes than outputs cannot be a subset: refused either way.
    assert main(short_run(tiny_imagenet, tmp_path / "three")) == 0
    three = ["--eval", "--load", str(tmp_path / "three" / "checkpoint-epoch0001.pt"), "--data",
             str(five), "--image-size", "32", "--workers", "0", "--attack-iter", "0"]  # fmt: skip
    capsys.readouterr()
    assert main([*three, "--class-subset"]) == 1
    assert "has 5 classes (n00000, n00001, n00002, ...) but the model has 3 outputs" in (
        capsys.readouterr().err
    )


def test_depth_help_lists_each_architectures_own_depths(capsys):
    """-d listed the union of every depth; each architecture takes only some."""
    import nets

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "  ResNetBasic: 18, 34\n" in out
    for arch in nets.available_architectures():
        if len(nets.depths_of(arch)) > 1:
            assert f"  {arch}: {', '.join(map(str, nets.depths_of(arch)))}" in out
    assert "  others: the one their name implies" in out


def test_progress_bars_redirected_to_a_file_update_rarely(tiny_imagenet, tmp_path, monkeypatch):
    """tqdm redrew into redirected logs (a 49 KB demo log): redirected, a bar updates at most
    every 30 s; on a terminal it redraws as usual."""
    log = tmp_path / "train.log"
    args = short_run(tiny_imagenet, tmp_path / "run", "--steps-per-epoch", "6", "--threads", "1")
    with log.open("w") as stderr, monkeypatch.context() as redirected:
        redirected.setattr(sys, "stderr", stderr)  # as `main.py 2> train.log`, in this process
        assert main(args) == 0
    # The bar's first and last states (each step redrew it: 7 and more).
    assert log.read_text().count("epoch 1/1:") == 2, log.read_text()
    from iat.runtime.progress import REDIRECTED_INTERVAL_S, progress_bar

    with open(tmp_path / "log.txt", "w") as log:
        bar = progress_bar(range(3), file=log, desc="eval")
        assert bar.mininterval == REDIRECTED_INTERVAL_S == 30.0
        assert list(bar) == [0, 1, 2]
    # Three items in well under 30 s: the first and the final state only.
    assert (tmp_path / "log.txt").read_text().count("eval:") == 2
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        assert progress_bar(range(3), file=terminal).mininterval == 0.1
    os.close(leader)


def test_openmp_waits_passively_only_on_a_busy_machine():
    """Spinning OpenMP threads made a PGD iteration 12x slower beside 4 busy processes (and far
    worse at a load of 11), waiting passively 2x slower on a quiet machine (bench/
    shared_machine.py): passive only when the machine is oversubscribed."""
    from iat import openmp_wait_policy

    assert openmp_wait_policy(load=11.0, cpus=2) == "PASSIVE"
    assert openmp_wait_policy(load=4.0, cpus=2) == "PASSIVE"
    assert openmp_wait_policy(load=2.5, cpus=2) is None  # full, e.g. by our own previous run
    assert openmp_wait_policy(load=0.3, cpus=2) is None
    assert openmp_wait_policy(load=20.0, cpus=16) is None


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_the_wait_policy_reaches_openmp_before_torch_loads_it(given):
    """Importing iat decides before torch loads OpenMP: OpenMP itself reports a spin count of 0
    exactly when iat chose PASSIVE for the load it saw; a user's own choice is kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"  # OpenMP prints the settings it runs with
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = (
        "import os, iat, torch; torch.ones(4).sum().item(); "
        "print(os.environ.get('OMP_WAIT_POLICY', 'default'))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    reported = {
        line.split("=")[0].strip(): line.split("=")[1].strip().strip("'")
        for line in run.stderr.splitlines()
        if line.strip().startswith(("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"))
    }
    if "GOMP_SPINCOUNT" not in reported:
        pytest.skip("torch runs another OpenMP than GNU's here")
    chosen = run.stdout.split()[-1]
    if given is not None:
        assert chosen == given and reported["OMP_WAIT_POLICY"] == "ACTIVE"
    assert (reported["GOMP_SPINCOUNT"] == "0") == (chosen == "PASSIVE"), run.stderr


@pytest.mark.parametrize(
    ("module", "command"),
    [("iat.sparse_frontend", ["train"]), ("iat.sparse_frontend", ["learn"]),
     ("iat.data.server", [])],
)  # fmt: skip
def test_every_option_of_the_sub_commands_has_help_and_shows_its_default(
    module, command, capsys, monkeypatch
):
    """The `main` that `python -m iat.sparse_frontend` and third_party/serve-data.py call, asked
    for --help in this process, at the 80 columns a pipe gets."""
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(module).main([*command, "--help"])
    assert exited.value.code == 0
    options = capsys.readouterr().out.split("options:")[1]
    assert "(default: 0)" in options  # --seed's
    # Every option line has a help text after it (no bare "--batch BATCH" line).
    entries = [e for e in options.split("\n  -") if e.strip()]
    assert all(len(e.split(None, 2)) > 2 or "\n" in e.strip() for e in entries), options


def test_every_flag_has_help_text_and_one_default() -> None:
    """--help explains every flag, says its default at most once, and keeps evaluation-only
    flags out of the output group (issue 33)."""
    parser = build_parser()
    for action in parser._actions:
        text = action.help or ""
        assert text.strip() and not text.startswith(" ("), action.option_strings
        assert text.count("default:") <= 1, (action.option_strings, text)
    output = next(g for g in parser._action_groups if g.title == "output")
    assert not any(a.help.startswith("--eval") for a in output._group_actions)


def test_settings_and_records_name_depth_only_where_it_applies() -> None:
    """convnext_tiny has one depth: no depth=50 in the settings line, no "-18" in its name."""
    from iat.config import Config, architecture_name
    from iat.train.trainer import settings_line

    convnext = Config(arch="convnext_tiny", depth=18, fake=True)
    resnet = Config(arch="ResNet", depth=50, fake=True)
    assert "depth=" not in settings_line(convnext) and "=None" not in settings_line(convnext)
    assert "depth=50" in settings_line(resnet)
    assert "depth=" not in settings_line(
        Config(arch="ResNetBasic", num_blocks=(1, 1, 1, 1), fake=True)
    )
    assert (architecture_name(convnext), architecture_name(resnet)) == (
        "convnext_tiny",
        "ResNet-50",
    )


def test_eval_defaults_to_the_image_size_the_checkpoint_trained_at(tmp_path: Path, capsys) -> None:
    """--eval --load of a run's checkpoint without --image-size evaluates at the run's size,
    printed; --image-size given overrides it, printed as such; the record holds the size."""
    data = write_imagenet(tmp_path / "imagenet")
    train_tiny(data, tmp_path / "run", 1)  # at 32x32
    ckpt = str(tmp_path / "run" / "checkpoint-epoch0001.pt")
    sizes = []
    for extra in ([], ["--image-size", "48"]):
        out = tmp_path / f"eval{len(sizes)}.json"
        flags = ["--batch", "4", "--workers", "0", "--threads", "1", "--attack-iter", "0"]
        argv = ["--eval", "--load", ckpt, "--data", str(data), *flags, "--eval-output", str(out)]
        assert main([*argv, *extra]) == 0
        sizes.append(json.loads(out.read_text())["image_size"])
    err = capsys.readouterr().err
    assert sizes == [32, 48]
    assert f"--image-size 32: the size its run trained at ({ckpt}'s config.json)" in err
    assert "--image-size 48: given, overriding the 32 its run trained at" in err
