"""The evaluation attack zoo (iat.attacks): threat-model bounds, hand-computed steps, minimal
epsilons, restarts, APGD against PGD and against adversarial-robustness-toolbox's APGD, and the
strong ensemble against its members, on the trained digits model."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from digits_model import NUM_CLASSES, eval_logits
from scipy.optimize import linprog
from test_adv_model import LinearNet

from adv_model import ATTACKS, AttackSettings, PGDAttacker, attack_success, create_attacker
from iat.attacks.apgd import APGDAttacker, apgd_checkpoints, ce_gain, targeted_dlr
from iat.attacks.fgm import FGMAttacker, l1_box_ascent
from iat.attacks.ops import gain_and_grad, histogram_median, logit_margin
from iat.attacks.pgd import NormPGDAttacker
from iat.config import Config, eval_attack

TOLERANCE = {"inf": 1e-4, "2": 1e-3, "1": 1e-2}  # float32 rounding of a [0, 255] image
# Radii of similar strength on 3x16x16 digits, per norm.
EPSILON = {"inf": 32.0, "2": 600.0, "1": 6000.0}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def success_rate(model, adv, labels, targets) -> float:
    return attack_success(eval_logits(model, adv), labels, targets).float().mean().item()


def misclassified(model, adv, labels) -> torch.Tensor:
    return eval_logits(model, adv).argmax(dim=1) != labels


def lp_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Independent of iat.attacks.ops.norm_of: torch.linalg over the flattened perturbation."""
    order = float("inf") if norm == "inf" else float(norm)
    return torch.linalg.vector_norm(delta.flatten(1).double(), ord=order, dim=1)


CASES = [
    (name, norm)
    for name in ("fgm", "fgm-minimal", "pgd", "apgd-ce", "apgd-t", "strong")
    for norm in ATTACKS[name].norms
]


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_perturbation_within_the_norm_ball_and_pixel_range(digits, name, norm):
    model, x, y = digits["model"], digits["x"][:24], digits["y"][:24]
    eps = EPSILON[norm]
    settings = AttackSettings(
        3, eps, eps / 4, target=None, norm=norm, restarts=2, eps_step=eps / 4, top_k=2
    )
    adv, _ = create_attacker(name, settings).attack(model, x, y, generator=seeded())
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert adv.min() >= 0.0 and adv.max() <= 255.0
    norms = lp_norm(adv - x, norm)
    assert (norms <= eps + TOLERANCE[norm]).all(), norms.max()
    assert norms.max() > 0.5 * eps  # the attack used its budget


def test_fgm_linf_and_l2_match_the_closed_form_gradient():
    torch.manual_seed(1)
    model = LinearNet(3 * 4 * 4, 5).double()
    x = torch.rand(8, 3, 4, 4, dtype=torch.float64) * 255
    y = torch.randint(0, 5, (8,))
    with torch.no_grad():  # d/dx CE(W x / 255 + b, y) = W^T (softmax - onehot(y)) / 255
        w, b = model.fc.weight, model.fc.bias
        probs = torch.softmax(x.flatten(1) / 255 @ w.T + b, dim=1)
        grad = ((probs - F.one_hot(y, 5).double()) @ w / 255).reshape(x.shape)
    linf, _ = FGMAttacker(20.0, norm="inf").attack(model, x, y)
    torch.testing.assert_close(linf, (x + 20 * grad.sign()).clamp(0, 255))
    l2, _ = FGMAttacker(50.0, norm="2").attack(model, x, y)
    unit = grad / grad.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(l2, (x + 50 * unit).clamp(0, 255))


@pytest.mark.parametrize("epsilon", [30.0, 300.0, 5000.0])
def test_l1_step_solves_the_box_constrained_linear_program(epsilon):
    """max <g, d> s.t. ||d||_1 <= eps, 0 <= x + d <= 255, solved by scipy's linprog over
    d = u - v, u, v >= 0; l1_box_ascent must reach the same optimum and be feasible."""
    gen = seeded(2)
    x = torch.rand(1, 2, 3, 3, generator=gen, dtype=torch.float64) * 255
    x[0, 0, 0, 0] = 255.0  # no room upwards
    g = torch.randn(1, 2, 3, 3, generator=gen, dtype=torch.float64)
    delta = l1_box_ascent(g, x, epsilon)
    n, gf, xf = g.numel(), g.flatten().numpy(), x.flatten().numpy()
    bounds = [(0, 255 - xi) for xi in xf] + [(0, xi) for xi in xf]
    lp = linprog(np.concatenate([-gf, gf]), A_ub=np.ones((1, 2 * n)), b_ub=[epsilon], bounds=bounds)
    assert lp.status == 0
    assert (g * delta).sum().item() == pytest.approx(-lp.fun, rel=1e-9)
    assert delta.abs().sum() <= epsilon + 1e-9
    assert ((x + delta) >= 0).all() and ((x + delta) <= 255).all()


def test_minimal_epsilon_is_the_first_level_that_succeeds(digits):
    model, x, y = digits["model"], digits["x"][:64], digits["y"][:64]
    eps, step = 48.0, 8.0
    attacker = FGMAttacker(eps, minimal=True, eps_step=step)
    assert attacker.levels() == [0.0, 8.0, 16.0, 24.0, 32.0, 40.0, 48.0]
    adv, targets = attacker.attack(model, x, y)
    found = attacker.last_min_epsilon
    broken = torch.isfinite(found)
    assert (found[broken] <= eps).all()
    assert (found[broken] < eps).any() and broken.float().mean() > 0.3
    assert ((found > 0) & broken).any()  # not only examples misclassified from the start
    # Independently: plain FGM at each example's epsilon succeeds, one step below does not.
    for level in sorted(set(found[broken].tolist())):
        rows = found == level
        at, _ = FGMAttacker(level).attack(model, x[rows], y[rows])
        assert misclassified(model, at, y[rows]).all()
        if level > 0:
            below, _ = FGMAttacker(level - step).attack(model, x[rows], y[rows])
            assert not misclassified(model, below, y[rows]).any()
    assert misclassified(model, adv, y)[broken].all()
    plain, _ = FGMAttacker(eps).attack(model, x, y)
    assert not misclassified(model, plain, y)[~broken].any()
    median = histogram_median(
        attacker.batch_stats()["min_epsilon_counts"], attacker.levels() + [float("inf")]
    )
    middle = found.sort().values[31:33]  # 64 examples: the mean of the 32nd and 33rd
    assert median == (middle[0].item() + middle[1].item()) / 2


def test_histogram_median_matches_sorting():
    values = [0.0, 1.0, 2.5, float("inf")]
    for counts in ([3, 0, 1, 0], [1, 1, 1, 1], [0, 2, 0, 3], [0, 0, 0, 2]):
        data = sorted(v for v, c in zip(values, counts, strict=True) for _ in range(c))
        expected = (data[(len(data) - 1) // 2] + data[len(data) // 2]) / 2
        assert histogram_median(torch.tensor(counts, dtype=torch.float64), values) == expected


def test_one_restart_is_the_original_pgd_draw_for_draw(digits):
    model, x, y = digits["model"], digits["x"][:32], digits["y"][:32]
    for target in ("random", None):
        ours = NormPGDAttacker(4, 32.0, 8.0, target=target, restarts=1)
        theirs = PGDAttacker(4, 32.0, 8.0, target=target)
        a, ta = ours.attack(model, x, y, generator=seeded(5))
        b, tb = theirs.attack(model, x, y, generator=seeded(5))
        assert torch.equal(a, b) and torch.equal(ta, tb)


@pytest.mark.parametrize(
    ("norm", "loss", "eps", "target"),
    [("inf", "ce", 16.0, None), ("inf", "cw", 48.0, "random"), ("2", "ce", 800.0, "random")],
)
def test_restarts_never_lower_attack_success(digits, norm, loss, eps, target):
    model, x, y = digits["model"], digits["x"], digits["y"]
    rates, sets = [], []
    for restarts in (1, 3):
        attacker = NormPGDAttacker(
            3, eps, eps / 3, norm=norm, loss=loss, restarts=restarts, target=target
        )
        adv, targets = attacker.attack(model, x, y, generator=seeded(7))
        success = attack_success(eval_logits(model, adv), y, targets)
        rates.append(success.float().mean().item())
        sets.append(success)
    assert (sets[1] | ~sets[0]).all(), "an example broken by 1 restart survived 3"
    assert rates[1] > rates[0], rates  # at this budget, restarts add some
    assert 0.1 < rates[0] < 0.9, rates


def test_logit_margin_and_targeted_dlr_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.5, -1.0, 2.0], [0.0, 4.0, 1.0, 2.0, 3.0]])
    labels, targets = torch.tensor([0, 1]), torch.tensor([4, 3])
    torch.testing.assert_close(logit_margin(logits, labels), torch.tensor([3.0 - 2.0, 4.0 - 3.0]))
    # sorted: [3, 2, 1, 0.5, -1] and [4, 3, 2, 1, 0]
    expected = torch.tensor([-(3.0 - 2.0) / (3.0 - (1.0 + 0.5) / 2), -(4.0 - 2.0) / (4.0 - 1.5)])
    torch.testing.assert_close(targeted_dlr(logits, labels, targets), expected)


def test_apgd_checkpoints_are_the_papers():
    # Croce & Hein 2020, Sec 3.2: p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99.
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(1) == [0, 1]


@pytest.mark.parametrize(("norm", "radii"), [("inf", (16.0, 32.0)), ("2", (300.0, 500.0))])
def test_apgd_ce_at_least_as_strong_as_pgd_at_the_same_budget(digits, norm, radii):
    """Measured (5 iterations, 297 digits): L-inf 0.296 vs 0.242 at 16; L2 0.357 vs 0.276 at
    300 and 0.751 vs 0.613 at 500."""
    model, x, y = digits["model"], digits["x"], digits["y"]
    for eps in radii:
        pgd = NormPGDAttacker(5, eps, eps / 4, norm=norm, target=None)
        pgd_adv, _ = pgd.attack(model, x, y, generator=seeded(1))
        apgd_adv, _ = APGDAttacker(5, eps, norm=norm).attack(model, x, y, generator=seeded(1))
        pgd_rate = misclassified(model, pgd_adv, y).float().mean().item()
        apgd_rate = misclassified(model, apgd_adv, y).float().mean().item()
        assert apgd_rate >= pgd_rate, (eps, apgd_rate, pgd_rate)
        assert apgd_rate < 0.99  # a budget where the difference can show


def test_apgd_ce_matches_adversarial_robustness_toolbox(digits):
    """ART's AutoProjectedGradientDescent (Croce & Hein's APGD-CE) on the same model, images and
    budget: 5 iterations, eps 16, first step 2 eps, one random start (measured: 0.296 for both,
    PGD-5 0.242)."""
    art = pytest.importorskip("art.attacks.evasion")
    from art.estimators.classification import PyTorchClassifier

    model, x, y = digits["model"], digits["x"], digits["y"]
    model.eval()
    classifier = PyTorchClassifier(
        model, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, 16, 16),
        nb_classes=NUM_CLASSES, clip_values=(0.0, 255.0),
    )  # fmt: skip
    rates = {}
    for eps in (12.0, 16.0):
        attack = art.AutoProjectedGradientDescent(
            classifier, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=5, targeted=False,
            nb_random_init=1, batch_size=len(x), loss_type="cross_entropy", verbose=False,
        )  # fmt: skip
        np.random.seed(0)
        theirs = torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))
        ours, _ = APGDAttacker(5, eps).attack(model, x, y, generator=seeded(2))
        rates[eps] = (
            misclassified(model, ours, y).float().mean().item(),
            misclassified(model, theirs, y).float().mean().item(),
        )
    model.train()
    for ours, theirs in rates.values():
        assert ours >= theirs - 0.03, rates
    assert 0.2 < rates[16.0][1] < 0.99, rates  # a budget where the attacks differ


def test_apgd_t_counts_misclassification_and_caps_its_targets(digits):
    model, x, y = digits["model"], digits["x"][:64], digits["y"][:64]
    few = APGDAttacker(3, 16.0, targeted=True, top_k=2)
    adv, targets = few.attack(model, x, y, generator=seeded(3))
    assert (targets == -1).all()  # success is a wrong prediction, whichever the target
    many = APGDAttacker(3, 16.0, targeted=True, top_k=50)  # capped at the 9 wrong classes
    adv_many, _ = many.attack(model, x, y, generator=seeded(3))
    rate_few = misclassified(model, adv, y).float().mean().item()
    rate_many = misclassified(model, adv_many, y).float().mean().item()
    assert 0.1 < rate_few <= rate_many, (rate_few, rate_many)
    with pytest.raises(ValueError, match="at least 4 classes"):
        few.attack(LinearNet(3 * 16 * 16, 3), x[:2], torch.tensor([0, 1]))


def test_strong_is_at_least_each_member(digits):
    model, x, y = digits["model"], digits["x"][:128], digits["y"][:128]
    settings = AttackSettings(3, 24.0, 8.0, num_classes=NUM_CLASSES, top_k=3)
    strong = create_attacker("strong", settings)
    adv, targets = strong.attack(model, x, y, generator=seeded(4))
    assert (targets == -1).all()
    broken = misclassified(model, adv, y)
    stats = strong.describe_stats(strong.batch_stats(), len(y))
    assert stats["ensemble_success_rate"] == pytest.approx(broken.float().mean().item())
    members = dict(strong.members)
    for name in ("apgd-ce", "apgd-t", "pgd-target"):
        alone, _ = members[name].attack(model, x, y, generator=seeded(4))
        assert broken.sum() >= misclassified(model, alone, y).sum(), name
        if name == "apgd-ce":  # it runs first, on the same examples and draws: per example
            assert (broken | ~misclassified(model, alone, y)).all()
    counts = stats["members"]
    assert counts["apgd-ce"]["attacked"] == int((eval_logits(model, x).argmax(1) == y).sum())
    assert (
        counts["apgd-t"]["attacked"] == counts["apgd-ce"]["attacked"] - counts["apgd-ce"]["broken"]
    )


EVAL = {"mode": "eval", "load": "w.pt", "data": "imagenet"}
BAD_ATTACK_OPTIONS = [
    ({"attack": "pgdd"}, "--attack: 'pgdd' is not one of"),
    ({"attack": "apgd-ce", "norm": "1"}, "--norm 1: --attack apgd-ce supports inf, 2"),
    ({"attack": "strong", "norm": "2"}, "--norm 2: --attack strong supports inf"),
    ({"attack": "pgd", "norm": "1"}, "--norm 1: --attack pgd supports inf, 2"),
    ({"norm": "3"}, "--norm: '3' is not one of"),
    ({"attack": "apgd-t", "attack_iter": 0}, "--attack-iter: --attack apgd-t needs >= 1"),
    ({"attack": "apgd-ce", "attack_loss": "cw"}, "--attack-loss cw: only --attack pgd, fgm"),
    ({"attack": "fgm", "restarts": 2}, "--restarts 2: only --attack pgd, apgd-ce"),
    ({"restarts": 0}, "--restarts: must be >= 1"),
    ({"eps_step": 0.0}, "--eps-step: must be > 0"),
    ({"apgd_targets": 0}, "--apgd-targets: must be >= 1"),
    ({"mode": "train", "attack": "strong"}, "--attack: only --eval takes it"),
    ({"mode": "train", "attack_loss": "cw"}, "--attack-loss: only --eval takes it"),
]


@pytest.mark.parametrize(("values", "message"), BAD_ATTACK_OPTIONS)
def test_bad_attack_options_are_one_line(values, message):
    with pytest.raises(ValueError) as error:
        Config(**{**EVAL, **values})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_attack_defaults_keep_the_original_evaluation():
    assert eval_attack(Config(**EVAL)) == "pgd"
    assert eval_attack(Config(**EVAL, attack_iter=0)) == "clean"
    assert eval_attack(Config(**EVAL, attack="fgm", norm="1", attack_iter=0)) == "fgm"


@pytest.mark.parametrize(("norm", "loss"), [("2", "ce"), ("inf", "cw")])
def test_pgd_with_other_norms_and_losses_averages_eot_draws(norm: str, loss: str) -> None:
    """Against a random defense every PGD variant averages `eot_samples` draws per iteration."""
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3 * 4 * 4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return self.linear(x.flatten(1) / 255)

    settings = AttackSettings(
        2, 16.0 if norm == "inf" else 100.0, 4.0, target=None, norm=norm, loss=loss,
        eot_samples=3,
    )  # fmt: skip
    attacker = create_attacker("pgd", settings)
    images, labels = torch.rand(2, 3, 4, 4) * 255, torch.tensor([0, 1])
    attacker.attack(Counting(), images, labels, generator=torch.Generator().manual_seed(0))
    # 2 iterations x 3 draws, plus the final forward pass that scores the restart.
    assert len(calls) == 2 * 3 + 1


@pytest.mark.parametrize(
    ("name", "gradients"), [("fgm", 1), ("apgd-ce", 3), ("apgd-t", 3 * 2), ("strong", 3 + 6 + 2)]
)
def test_every_zoo_attack_averages_eot_draws_per_gradient(name: str, gradients: int) -> None:
    """Against a random defense (README: white-box evaluation attacks it through EOT) each
    input gradient of FGM, APGD and the strong ensemble averages `eot_samples` draws: with 3
    draws instead of 1, every gradient costs 2 more forward passes."""
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(3 * 4 * 4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return self.linear(x.flatten(1) / 255)

    model = Counting()
    images = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(2)) * 255
    labels = model(images).argmax(dim=1)  # correctly classified: every run attacks them

    def forward_passes(eot: int) -> int:
        calls.clear()
        # A radius too small to break anything: no run stops early.
        settings = AttackSettings(
            2, 0.01, 0.005, target=None, num_classes=5, top_k=2, eot_samples=eot
        )
        create_attacker(name, settings).attack(
            model, images, labels, generator=torch.Generator().manual_seed(0)
        )
        return len(calls)

    assert forward_passes(3) - forward_passes(1) == 2 * gradients


def test_eot_gradient_is_the_mean_of_the_draws_gradients() -> None:
    weights = torch.randn(5, 3 * 4 * 4, generator=torch.Generator().manual_seed(1))
    noise = torch.Generator()

    def noisy(x: torch.Tensor) -> torch.Tensor:  # a random defense before a linear model
        return (x + 20 * torch.randn(x.shape, generator=noise)).flatten(1).tanh() @ weights.T

    x, labels = torch.rand(2, 3, 4, 4) * 255, torch.tensor([1, 3])
    gain = partial(ce_gain, labels=labels)
    noise.manual_seed(7)
    value, grad, logits = gain_and_grad(noisy, x, gain, eot_samples=4)
    noise.manual_seed(7)
    draws = [gain_and_grad(noisy, x, gain) for _ in range(4)]
    torch.testing.assert_close(grad, torch.stack([d[1] for d in draws]).mean(0))
    torch.testing.assert_close(value, torch.stack([d[0] for d in draws]).mean(0))
    torch.testing.assert_close(logits, torch.stack([d[2] for d in draws]).mean(0))
