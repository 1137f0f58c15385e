"""Training stages (AdvXL's weak-to-strong schedule, Wang et al. 2024 Sec 3): --attack-iter-schedule
with --size-schedule, per epoch against an expansion of the pairs, the forward passes each
training step really makes, the records, and resumes across a stage boundary bit for bit."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from conftest import train_tiny

import iat.builders
import iat.train.trainer
from iat.app.cli import build_parser, config_from_args
from iat.config import Config, epoch_value, eval_attack, evaluation_point, stage_attack_spec
from iat.recipes.presets import RECIPES, fit_to_epochs, fitted_line
from iat.train.stages import stage_record
from main import main

# Stage 1: 16 px, PGD-1; stage 2 (epoch 2): 32 px, PGD-1; stage 3 (epoch 3): 32 px, PGD-3.
STAGES = ("--size-schedule", "1", "16", "2", "32", "--attack-iter-schedule", "1", "1", "3", "3")
STAGED = (*STAGES, "--attack-epsilon", "8", "--attack-target", "none")


def _config(*argv: str) -> Config:
    return config_from_args(build_parser().parse_args(["--fake", *argv]))


def _expanded(pairs: list[int], epochs: int) -> list[int]:
    """The value of each epoch 1..epochs, by filling each pair's epochs up to the next pair's."""
    firsts = [*pairs[0::2], epochs + 1]
    values = []
    for k, value in enumerate(pairs[1::2]):
        values += [value] * (min(firsts[k + 1], epochs + 1) - firsts[k])
    return values


def test_each_epochs_iterations_step_and_stage_follow_the_pairs():
    rng = random.Random(0)
    for _ in range(20):
        epochs = rng.randint(1, 30)
        firsts = [1, *sorted(rng.sample(range(2, 40), rng.randint(0, 3)))]
        pairs = [v for first in firsts for v in (first, rng.randint(1, 5))]
        eps, step = rng.choice([4.0, 8.0, 16.0]), rng.choice([0.5, 1.0, 3.0])
        cfg = Config(
            fake=True,
            epochs=epochs,
            attack_epsilon=eps,
            attack_step_size=step,
            attack_iter_schedule=tuple(pairs),
        )
        expected = _expanded(pairs, epochs)
        assert [epoch_value(cfg.attack_iter_schedule, e) for e in range(1, epochs + 1)] == expected
        for epoch, iters in enumerate(expected, start=1):
            settings = stage_attack_spec(cfg, epoch).settings
            assert settings.num_iter == iters
            assert settings.step_size == max(step, eps / iters)  # the original's rule
            begun = [first for first in firsts if first <= epoch]
            assert stage_record(cfg, epoch)["stage"] == len(begun)
            assert stage_record(cfg, epoch)["first_epoch"] == begun[-1]


def test_stages_of_both_schedules_and_their_records():
    cfg = _config(*STAGED, "--epochs", "4", "--image-size", "32")
    records = [stage_record(cfg, e) for e in (1, 2, 3, 4)]
    assert [(r["stage"], r["image_size"], r["iter"]) for r in records] == [
        (1, 16, 1), (2, 32, 1), (3, 32, 3), (3, 32, 3)
    ]  # fmt: skip
    assert [r["step_size"] for r in records] == [8.0, 8.0, 8 / 3, 8 / 3]
    # APGD takes the iterations too (its own step); the warm-up ramps the stage's step.
    apgd = _config("--adv-method", "apgd_4_2", "--attack-iter-schedule", "1", "1", "2", "5")
    assert [stage_attack_spec(apgd, e).settings.num_iter for e in (1, 2)] == [1, 5]
    # The step warm-up ramps the stage's step (epsilon / iterations here) on soft targets; the
    # hard-label PGD raises it to epsilon / iterations again (the original's rule).
    ramp = ("--attack-iter-schedule", "1", "1", "3", "4", "--step-warmup-epochs", "4")
    soft = _config(*ramp, "--mixup-alpha", "0.8", "--attack-target", "none")
    assert stage_record(soft, 2)["step_size"] == pytest.approx(16 / 1 * 1 / 4)
    assert stage_record(soft, 4)["step_size"] == pytest.approx(16 / 4 * 3 / 4)
    assert stage_record(soft, 4)["soft_target"] and stage_record(soft, 4)["iter"] == 4
    hard = _config(*ramp)
    assert [stage_record(hard, e)["step_size"] for e in (2, 4)] == [16.0, 4.0]


@pytest.mark.parametrize(
    "flags",
    [
        ["--attack-iter-schedule", "2", "1"],
        ["--attack-iter-schedule", "1", "1", "3"],
        ["--attack-iter-schedule", "1", "2", "1", "3"],
        ["--attack-iter-schedule", "1", "0"],
        ["--attack-iter-schedule", "1", "1", "--adv-method", "fgsmrs_4"],
        ["--attack-iter-schedule", "1", "1", "--attack-iter", "0"],
        ["--attack-iter-schedule", "1", "1", "--free-replays", "2"],
    ],
)
def test_bad_attack_iter_schedules_are_one_line(flags, capsys):
    assert main(["--fake", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --attack-iter-schedule: ") and err.count("\n") == 1, err


def test_the_advxl_recipe_fits_short_runs_and_says_so():
    """300 epochs, the last 30 full-resolution with PGD-3; a 10-epoch run keeps its last epoch
    for stage 2 (1 + round(270 x 10 / 300) = 10), fast-at's three sizes fit 3 epochs."""
    full = _config("--recipe", "advxl")
    assert full.size_schedule == (1, 112, 271, 224) and full.attack_iter_schedule == (1, 1, 271, 3)
    short = _config("--recipe", "advxl", "--epochs", "10")
    assert (short.size_schedule, short.attack_iter_schedule) == ((1, 112, 10, 224), (1, 1, 10, 3))
    line = fitted_line("advxl", 10, dataclasses.asdict(short))
    assert "--attack-iter-schedule 1 1 271 3 -> 1 1 10 3" in line
    assert fit_to_epochs("fast-at", 3)["size_schedule"] == (1, 128, 2, 224, 3, 288)
    assert fit_to_epochs("fast-at", 2)["size_schedule"] == (1, 128, 2, 288)  # 224's stage gone
    assert fit_to_epochs("advxl", 1)["attack_iter_schedule"] == (1, 3)
    given = _config("--recipe", "advxl", "--epochs", "10", "--attack-iter-schedule", "1", "2")
    assert given.attack_iter_schedule == (1, 2) and given.size_schedule == (1, 112, 10, 224)
    assert RECIPES["advxl"].settings["epochs"] == 300


def test_a_recipes_stages_that_do_not_fit_name_the_recipe(capsys):
    assert main(["--fake", "--recipe", "advxl", "--epochs", "10", "--adv-method", "fgsmrs_4"]) == 1
    err = capsys.readouterr().err
    assert "not fgsmrs" in err and "(from --recipe advxl: give another attack or recipe" in err


def test_an_in_training_clean_evaluation_is_recorded_apart_from_the_training_attack():
    """The clean evaluation (PGD-0) of a run whose --attack-* flags warm up, stage or replay:
    its record's configuration drops those, which a clean attack would refuse."""
    for flags in (("--step-warmup-epochs", "5"), STAGES, ("--free-replays", "2")):
        cfg = _config("--attack-iter", "3", *flags)
        with pytest.raises(ValueError):
            dataclasses.replace(cfg, attack_iter=0)
        point = evaluation_point(cfg, 0)
        assert (point.attack_iter, eval_attack(point)) == (0, "clean")
        assert evaluation_point(cfg, 10).attack_iter == 10


def _counting_forwards(monkeypatch) -> list[list[tuple[bool, int]]]:
    """Each training step's forward passes through the classifier, as (training mode, side);
    the evaluations' passes, outside the steps, are not counted."""
    steps: list[list[tuple[bool, int]]] = []
    inside = [False]
    build, step = iat.builders.build_classifier, iat.train.trainer.train_step

    def record(module, inputs):
        if inside[0]:
            steps[-1].append((module.training, inputs[0].shape[-1]))

    def hooked(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(record)
        return model

    def counted(*args, **kwargs):
        steps.append([])
        inside[0] = True
        try:
            return step(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(iat.builders, "build_classifier", hooked)
    monkeypatch.setattr(iat.train.trainer, "train_step", counted)
    return steps


def test_each_step_attacks_with_its_stages_iterations_at_its_side(
    tiny_imagenet, tmp_path, monkeypatch, capsys
):
    """Forward passes counted in each step: the stage's k attack passes (BatchNorm in inference
    mode) and one training pass, at the stage's side; the logged figures and every in-training
    evaluation's record of the stage agree."""
    steps = _counting_forwards(monkeypatch)
    flags = (*STAGED, "--train-eval", "light", "--log-every", "1")
    train_tiny(tiny_imagenet, tmp_path / "run", 3, *flags)
    expected = {1: (1, 16), 2: (1, 32), 3: (3, 32)}  # epoch: iterations, side
    for i, passes in enumerate(steps):
        iters, side = expected[1 + i // 2]  # 2 steps per epoch
        assert passes == [(False, side)] * iters + [(True, side)], i
    assert len(steps) == 6
    assert "stages: epoch 1: 16 px, PGD-1 step 8; epoch 2: 32 px, PGD-1 step 8; epoch 3: " \
        "32 px, PGD-3 step 2.67" in capsys.readouterr().err  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    trained = [(r["epoch"], r["train/attack_iter"], r["train/image_size"]) for r in records
               if r["phase"] == "train"]  # fmt: skip
    assert trained == [(e, *expected[e]) for e in (1, 1, 2, 2, 3, 3)]
    evals = [r for r in records if r["phase"] == "eval-10step"]
    stages = [
        (r["epoch"], r["training_stage"]["stage"], r["training_stage"]["iter"]) for r in evals
    ]
    assert stages == [(1, 1, 1), (2, 2, 1), (3, 3, 3)]
    assert all(r["attack"]["iter"] == 10 for r in evals)  # the evaluation's own attack
    args = build_parser().parse_args(["--config", str(tmp_path / "run" / "config.json")])
    replayed = config_from_args(args)
    assert (replayed.size_schedule, replayed.attack_iter_schedule) == ((1, 16, 2, 32), (1, 1, 3, 3))


def _same_state(whole: dict, resumed: dict) -> None:
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for index, state in whole["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, resumed["optimizer"]["state"][index][name]), name


def test_runs_resumed_in_a_stage_and_at_its_boundaries_equal_the_uninterrupted_run(
    tiny_imagenet, tmp_path, capsys
):
    """Stopped after epoch 1 (stage 1) and relaunched to 3: it enters the 32 px stage, then the
    PGD-3 one; relaunched after each epoch: it resumes exactly at each boundary. Weights,
    optimizer state and stage records equal the uninterrupted run's. A relaunch whose schedules
    changed says so."""
    whole = train_tiny(tiny_imagenet, tmp_path / "whole", 3, *STAGED)
    for name, epochs in (("crossing", (1, 3)), ("boundaries", (1, 2, 3))):
        for epoch in epochs:
            resumed = train_tiny(tiny_imagenet, tmp_path / name, epoch, *STAGED)
        _same_state(whole, resumed)
    for epoch, (stage, side, iters) in enumerate([(1, 16, 1), (2, 32, 1), (3, 32, 3)], start=1):
        path = tmp_path / "boundaries" / f"checkpoint-epoch{epoch:04d}.pt"
        saved = torch.load(path, weights_only=True)["stage"]
        assert (saved["stage"], saved["image_size"], saved["iter"]) == (stage, side, iters)
    assert resumed["stage"] == whole["stage"]
    capsys.readouterr()
    changed = [*STAGED[:5], "--attack-iter-schedule", "1", "1", "3", "2", *STAGED[10:]]
    train_tiny(tiny_imagenet, tmp_path / "boundaries", 4, *changed)
    assert "trained epoch 3 in stage 3 (32 px, PGD-3 step 2.67); this run's schedules give it " \
        "stage 3 (32 px, PGD-2 step 4): the stages changed" in capsys.readouterr().err  # fmt: skip
