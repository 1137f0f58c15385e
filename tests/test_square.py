"""The Square Attack (iat.attacks.square): against a model without gradients, its threat-model
bounds and query accounting, against adversarial-robustness-toolbox's SquareAttack, and end to end
through ``main.py --eval --attack square``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from digits_model import NUM_CLASSES, eval_logits
from test_eval_outputs import COMMON, checkpoint  # noqa: F401 (the fixture)

from adv_model import AttackSettings, PGDAttacker, create_attacker
from iat.attacks.square import P_INIT, SquareAttacker, square_fraction, window_side
from iat.config import Config
from main import main

TOLERANCE = {"inf": 1e-4, "2": 1e-3}  # float32 rounding of a [0, 255] image
EPSILON = {"inf": 32.0, "2": 600.0}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def robust_accuracy(model, adv, labels) -> float:
    return (eval_logits(model, adv).argmax(dim=1) == labels).float().mean().item()


class Rounded(torch.nn.Module):
    """``model`` behind a rounding to whole pixels: the input gradient is 0 everywhere."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.round())


class Counting(torch.nn.Module):
    """``model``, recording the batch size of each call."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.model(x)


def test_schedule_and_window_sides_follow_the_authors():
    """p halves at iterations 10, 50, ..., 8000, unscaled as AutoAttack runs it at 5,000 queries
    (stretched to the budget only when asked); windows hold a fraction p of the pixels (L2: at
    least 3, odd), within the image."""
    assert [square_fraction(0.8, i, 10_000) for i in (0, 10, 11, 50, 51, 8000, 8001)] == [
        0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 256, 0.8 / 512,
    ]  # fmt: skip
    assert [square_fraction(0.8, i, 5000) for i in (11, 51, 201, 4001)] == [
        0.4, 0.2, 0.1, 0.8 / 128,
    ]  # fmt: skip
    assert square_fraction(0.8, 1, 100) == 0.8
    assert square_fraction(0.8, 1, 100, rescale=True) == 0.2
    assert window_side(0.8, 16, 16, "inf") == 14 and window_side(0.8 / 512, 16, 16, "inf") == 1
    assert window_side(0.8, 16, 16, "2") == 15 and window_side(0.8 / 512, 16, 16, "2") == 3
    assert window_side(0.8, 4, 100, "inf") == 4  # the shorter side caps it


def test_square_breaks_a_model_whose_gradient_is_zero(digits):
    """Behind x.round() every input gradient is 0: PGD cannot leave the clean image, Square's
    random search does not need gradients."""
    model, x, y = Rounded(digits["model"]), digits["x"][:100], digits["y"][:100]
    clean_accuracy = robust_accuracy(model, x, y)
    pgd = PGDAttacker(10, 48.0, 8.0, prob_start_from_clean=1.0, target=None)
    pgd_adv, _ = pgd.attack(model, x, y, generator=seeded())
    assert torch.equal(pgd_adv, x)  # a zero gradient: no step
    square = SquareAttacker(48.0, queries=200)
    adv, targets = square.attack(model, x, y, generator=seeded())
    assert (targets == -1).all()
    broken = robust_accuracy(model, adv, y)
    print(f"rounded model: clean {clean_accuracy:.3f}, PGD-10 {robust_accuracy(model, pgd_adv, y)}"
          f", Square-200 {broken:.3f}")  # fmt: skip
    assert clean_accuracy > 0.9 and clean_accuracy - broken > 0.5


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_within_the_ball_within_the_budget_and_done_when_broken(digits, norm):
    model, x, y = Counting(digits["model"]), digits["x"][:48], digits["y"][:48]
    eps, budget = EPSILON[norm], 60
    attacker = SquareAttacker(eps, norm=norm, queries=budget)
    adv, _ = attacker.attack(model, x, y, generator=seeded(1))
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert adv.min() >= 0.0 and adv.max() <= 255.0
    delta = (adv - x).flatten(1).double()
    norms = delta.abs().amax(dim=1) if norm == "inf" else delta.norm(dim=1)
    assert (norms <= eps + TOLERANCE[norm]).all(), norms.max()
    queries = attacker.last_queries
    wrong_clean = eval_logits(model.model, x).argmax(dim=1) != y
    wrong = eval_logits(model.model, adv).argmax(dim=1) != y
    assert (queries[wrong_clean] == 0).all() and torch.equal(adv[wrong_clean], x[wrong_clean])
    attacked = ~wrong_clean
    # AutoAttack's count: the initial query, then up to `budget` iterations.
    assert (queries[attacked] >= 1).all() and (queries <= budget + 1).all()
    assert (queries == budget + 1).any()
    assert (wrong[attacked & (queries <= budget)]).all()  # stopped early only when broken
    assert 0 < wrong[attacked].sum() < attacked.sum()  # a budget where both happen
    # The model saw the clean batch, then the j-th query of each example still unbroken: the
    # examples queried at call j are those with at least j queries.
    assert model.calls[0] == len(x)
    expected = [int((queries >= j).sum()) for j in range(1, int(queries.max()) + 1)]
    assert model.calls[1:] == expected
    stats = attacker.describe_stats(attacker.batch_stats(), len(x))
    assert stats["attacked"] == int(attacked.sum()) and stats["broken"] == int(wrong.sum())
    assert stats["mean_queries"] == pytest.approx(queries[attacked].mean().item())
    # Reproducible per seed; another seed, other draws.
    again, _ = SquareAttacker(eps, norm=norm, queries=budget).attack(model, x, y, seeded(1))
    other, _ = SquareAttacker(eps, norm=norm, queries=budget).attack(model, x, y, seeded(2))
    assert torch.equal(again, adv) and not torch.equal(other, adv)


@pytest.mark.parametrize(
    ("norm", "examples", "queries"), [("inf", 150, 300), ("2", 100, 200)]
)  # fmt: skip
def test_square_matches_adversarial_robustness_toolbox(digits, norm, examples, queries):
    """ART's SquareAttack on the same model, images, radius, norm, p_init and budget (ART's
    max_iter iterations after its initial point, as ours; its schedule stretched to them): our
    robust accuracy is at most ART's plus 1 point. Measured figures are printed."""
    art = pytest.importorskip("art.attacks.evasion")
    from art.estimators.classification import PyTorchClassifier

    model, x, y = digits["model"], digits["x"][:examples], digits["y"][:examples]
    eps = EPSILON[norm]
    model.eval()
    classifier = PyTorchClassifier(
        model, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, 16, 16),
        nb_classes=NUM_CLASSES, clip_values=(0.0, 255.0),
    )  # fmt: skip
    attack = art.SquareAttack(
        classifier, norm=np.inf if norm == "inf" else 2, eps=eps, max_iter=queries,
        p_init=P_INIT, nb_restarts=1, batch_size=len(x), verbose=False,
    )  # fmt: skip
    np.random.seed(0)
    start = time.perf_counter()
    theirs = torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))
    art_seconds = time.perf_counter() - start
    start = time.perf_counter()
    square = SquareAttacker(eps, norm=norm, queries=queries, rescale_schedule=True)
    ours, _ = square.attack(model, x, y, seeded())
    our_seconds = time.perf_counter() - start
    model.train()
    ours_acc, theirs_acc = robust_accuracy(model, ours, y), robust_accuracy(model, theirs, y)
    print(
        f"L{norm} eps={eps:g}, {queries} queries, {examples} digits: robust accuracy ours "
        f"{ours_acc:.4f} ({our_seconds:.1f} s), ART {theirs_acc:.4f} ({art_seconds:.1f} s)"
    )
    assert ours_acc <= theirs_acc + 0.01, (ours_acc, theirs_acc)
    assert ours_acc < robust_accuracy(model, x, y) - 0.2  # a budget where the attacks work


def test_eval_square_end_to_end(tiny_imagenet: Path, checkpoint: Path, tmp_path: Path):  # noqa: F811
    result = tmp_path / "eval.json"
    args = ["--eval", "--load", str(checkpoint), "--data", str(tiny_imagenet), *COMMON,
            "--attack", "square", "--queries", "20", "--attack-epsilon", "8",
            "--eval-output", str(result)]  # fmt: skip
    assert main(args) == 0
    record = json.loads(result.read_text())
    assert record["threat_model"] == "Square 20 queries untargeted, L-inf eps=8"
    assert record["attack"] == {
        "name": "square", "epsilon": 8.0, "norm": "inf", "target": "none", "queries": 20,
        "p_init": P_INIT,
    }  # fmt: skip
    details = record["details"]
    # AutoAttack's count: the initial query and one per iteration, at most --queries + 1.
    assert 0 <= details["mean_queries"] <= 21 and details["attacked"] <= record["images"] == 7
    # Behind a defense, Square queries its forward pass: no BPDA in its words.
    args = [*args[:-2], "--norm", "2", "--attack-epsilon", "300", "--defense", "jpeg:75",
            "--eval-output", str(result)]  # fmt: skip
    assert main(args) == 0
    record = json.loads(result.read_text())
    assert record["threat_model"] == "Square 20 queries untargeted, L2 eps=300, defense jpeg:75"


def test_queries_is_an_eval_option_of_square_and_autoattack_only():
    base = {"mode": "eval", "load": "m.npz", "data": "d"}
    cfg = Config(**base, attack="square", queries=100, attack_iter=0, norm="2")
    settings = AttackSettings(cfg.attack_iter, 600.0, 1.0, norm="2", queries=cfg.queries)
    attacker = create_attacker("square", settings)
    assert isinstance(attacker, SquareAttacker) and attacker.queries == 100
    for values, message in [
        ({"attack": "pgd", "queries": 100}, "--queries 100: only --attack square, autoattack take"),
        ({"attack": "square", "queries": 0}, "--queries: must be >= 1, got 0"),
        ({"attack": "square", "norm": "1"}, "--norm 1: --attack square supports inf, 2"),
        ({"mode": "train", "queries": 100}, "--queries: only --eval takes it"),
    ]:
        with pytest.raises(ValueError, match=message):
            Config(**{**base, **values})
