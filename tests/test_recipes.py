"""--recipe presets (iat.recipes.presets): data that builds a valid configuration, flags over the
preset, replays, and a short run of every preset resumed bit for bit (1 process in-process; 2
processes killed with SIGKILL and relaunched)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_resumes_bit_for_bit
from test_multiprocess import _descendants, free_port, launch, torchrun

from iat.app.cli import build_parser, config_from_args
from iat.config import Config
from iat.recipes.presets import DEFAULT_RECIPE, RECIPES


def _config(*argv: str) -> Config:
    return config_from_args(build_parser().parse_args(["--fake", *argv]))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_a_valid_configuration_with_its_source(name):
    recipe = RECIPES[name]
    assert recipe.source and set(recipe.settings) <= {f.name for f in dataclasses.fields(Config)}
    cfg = _config("--recipe", name)
    assert cfg.recipe == name
    assert all(getattr(cfg, key) == value for key, value in recipe.settings.items())


def test_the_default_recipe_is_the_original():
    assert RECIPES[DEFAULT_RECIPE].settings == {}
    assert _config() == dataclasses.replace(Config(fake=True), explicit_model_fields=())


def test_flags_given_override_the_recipe():
    cfg = _config("--recipe", "ares", "--epochs", "3", "--mixup-alpha", "0")
    assert (cfg.epochs, cfg.mixup_alpha, cfg.optimizer, cfg.cutmix_alpha) == (3, 0.0, "adamw", 1.0)


def test_a_replayed_run_keeps_its_values_and_another_recipe_replaces_them(tmp_path):
    record = {"config": dataclasses.asdict(_config("--recipe", "ares", "--epochs", "7"))}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(record))
    replayed = _config("--config", str(path))
    assert (replayed.recipe, replayed.epochs, replayed.optimizer) == ("ares", 7, "adamw")
    other = _config("--config", str(path), "--recipe", "fast-at")
    assert other.recipe == "fast-at" and other.lr_schedule == "cyclic"
    assert other.optimizer == "sgd" and other.mixup_alpha == 0.0  # ares's values are gone


def tiny_overrides(name: str) -> list[str]:
    """The preset at 32x32 (its progressive sizes scaled down)."""
    sizes = ["--size-schedule", "1", "16", "2", "32"]
    return ["--recipe", name, *(sizes if RECIPES[name].settings.get("size_schedule") else [])]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_trains_and_resumes_bit_for_bit(name, tiny_imagenet, tmp_path, capsys):
    assert_resumes_bit_for_bit(tiny_imagenet, tmp_path, *tiny_overrides(name))
    first = capsys.readouterr().err.splitlines()[0]
    assert f"recipe {name} ({RECIPES[name].source})" in first
    saved = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert saved["config"]["recipe"] == name


def _two_process_flags(name: str, data: Path, logdir: Path) -> list[str]:
    return [
        "--data", str(data), "--logdir", str(logdir), "--arch", "ResNet", "--num-blocks", "1",
        "1", "1", "1", "--width", "8", "--image-size", "32", "--batch", "2", "--workers", "0",
        "--loader", "local", "--steps-per-epoch", "2", "--train-eval", "none", "--epochs", "3",
        *tiny_overrides(name),
    ]  # fmt: skip


def _kill_after_first_checkpoint(flags: list[str], logdir: Path) -> None:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [*torchrun(2), "main.py", *flags], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not (logdir / "checkpoint-epoch0001.pt").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "no first checkpoint"
        time.sleep(0.02)
    ranks = _descendants(proc.pid)
    for pid in [proc.pid, *ranks]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (logdir / "checkpoint-epoch0003.pt").exists()


@pytest.mark.parametrize("name", ["ares", "fast-at"])
def test_a_recipe_killed_on_two_processes_resumes_bit_for_bit(name, tiny_imagenet, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    launch(torchrun(2), "main.py", _two_process_flags(name, tiny_imagenet, whole))
    _kill_after_first_checkpoint(_two_process_flags(name, tiny_imagenet, killed), killed)
    launch(torchrun(2), "main.py", _two_process_flags(name, tiny_imagenet, killed))
    states = [torch.load(d / "checkpoint-epoch0003.pt", weights_only=True) for d in (whole, killed)]
    for key, value in states[0]["model"].items():
        assert torch.equal(value, states[1]["model"][key]), key
