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
from iat.config import Config, training_attack_spec
from iat.eval.summary import threat_model
from iat.recipes.presets import (
    DEFAULT_RECIPE,
    EPOCH_SCHEDULES,
    RECIPES,
    fit_to_epochs,
    fitted_line,
)


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
    unset = {"explicit_model_fields": (), "image_size_given": False}
    assert _config() == dataclasses.replace(Config(fake=True), **unset)


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
    """The preset at 32x32, its stages as two, the second from epoch 2 (sides 16 then 32, the
    recipe's first and last iterations), its warm-ups given as flags at the recipe's own values:
    not fitted to --epochs, so that a relaunch with more epochs continues the same schedule
    (under a cosine schedule, the LR depends on --epochs after the warm-up)."""
    settings = RECIPES[name].settings
    stages = [
        word
        for key in EPOCH_SCHEDULES
        if key in settings
        for values in [(16, 32) if key == "size_schedule" else settings[key][1::2]]
        for word in (f"--{key.replace('_', '-')}", "1", str(values[0]), "2", str(values[-1]))
    ]
    warmups = [
        word
        for key in fit_to_epochs(name, 2)
        if key not in EPOCH_SCHEDULES
        for value in [settings[key]]
        for word in (f"--{key.replace('_', '-')}", *map(str, _listed(value)))
    ]
    return ["--recipe", name, *stages, *warmups]


def _listed(value: object) -> tuple:
    return value if isinstance(value, tuple) else (value,)


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


def test_a_short_run_scales_the_recipes_warm_ups_and_says_so():
    """--epochs 2 of revisiting-at's 300: its 20-epoch warm-up becomes 2/15 of an epoch, and one
    line says so; a warm-up given as a flag stays (issue 33)."""
    cfg = _config("--recipe", "revisiting-at", "--epochs", "2")
    assert cfg.warmup_epochs == pytest.approx(20 * 2 / 300)
    line = fitted_line(cfg.recipe, cfg.epochs, dataclasses.asdict(cfg))
    assert line.startswith("recipe revisiting-at: --epochs 2 of its 300") and "20 -> 0.133" in line
    assert _config("--recipe", "revisiting-at").warmup_epochs == 20.0
    given = _config("--recipe", "revisiting-at", "--epochs", "2", "--warmup-epochs", "1")
    assert given.warmup_epochs == 1.0
    assert fitted_line(given.recipe, given.epochs, dataclasses.asdict(given)) is None
    fast = _config("--recipe", "fast-at", "--epochs", "3", "--size-schedule", "1", "224")
    assert fast.lr_knots[-2:] == (3.0, 0.001)


@pytest.mark.parametrize("name", ["revisiting-at", "fast-at", "fast-at-2"])
def test_in_training_evaluation_follows_the_recipes_threat_model(name):
    """Its evaluations attack at the trained epsilon, untargeted, and their line names it."""
    cfg = _config("--recipe", name)
    trained = training_attack_spec(cfg).settings
    assert (cfg.attack_epsilon, cfg.attack_target) == (trained.epsilon, "none")
    words = threat_model(dataclasses.replace(cfg, attack_iter=10))
    assert f"{trained.epsilon:g}" in words and "target" not in words.replace("untargeted", "")


def test_a_recipes_size_schedule_that_does_not_fit_names_the_recipe():
    with pytest.raises(ValueError, match="from --recipe fast-at: give --size-schedule 1 32"):
        _config("--recipe", "fast-at", "--image-size", "32")
