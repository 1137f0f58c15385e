"""The adversarial-training family: attack specs, logit pairing, EMA, fine-tuning, virtual
batches, FGSM-RS and free training, each against an independent computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from digits_model import DigitsNet, digits_tensors, eval_logits
from test_train import error_line, train_args
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import nets
from adv_model import (
    Attacker,
    AttackSettings,
    FreeAttacker,
    NoOpAttacker,
    PGDAttacker,
    create_attacker,
    mixed_batch,
    no_targets,
    training_objective,
    training_terms,
)
from iat.attacks.spec import AttackSpec, parse_attack_spec
from iat.builders import AttackPrecision
from iat.config import Config
from iat.recipes.ema import WeightAverage, ema_decay
from iat.runtime import distributed
from iat.train.builders import build_optimizer, build_training_attacker
from iat.train.trainer import LossSettings, train_step
from main import main

FP32 = AttackPrecision(False, False, "fp32")
RUN = ["--steps-per-epoch", "2", "--train-eval", "none", "--threads", "1"]


# --- 1. attack specs -----------------------------------------------------------------------------
def test_attack_specs_parse_to_the_registered_attacks():
    assert parse_attack_spec("pgdll_16_2_10") == AttackSpec(
        "pgd", AttackSettings(10, 16.0, 2.0, target="least_likely")
    )
    assert parse_attack_spec("pgdrnd_8_1_3") == AttackSpec(
        "pgd", AttackSettings(3, 8.0, 1.0, target="random")
    )
    assert parse_attack_spec("pgd_4_1_5") == AttackSpec(
        "pgd", AttackSettings(5, 4.0, 1.0, target=None)
    )
    assert parse_attack_spec("fgsmrs_8").name == "fgsmrs"
    assert parse_attack_spec("apgd_4_2") == AttackSpec(
        "apgd-ce", AttackSettings(2, 4.0, 0.0, target=None)
    )
    assert parse_attack_spec("clean").name == "clean"
    for bad in (
        "pgd_16_2",
        "pgd_16_0_10",
        "pgdxx_1_1_1",
        "fgsmrs_1.5",
        "PGD_16_2_10",
        "",
        "apgd_4_0",
    ):
        with pytest.raises(ValueError, match="valid forms: clean, pgd_EPS_STEP_NITER"):
            parse_attack_spec(bad)


def _training_attacker(**fields) -> Attacker:
    cfg = Config(data="x", **fields)
    return build_training_attacker(cfg, num_classes=10, precision=FP32, generator=None)


def test_specs_and_the_original_flags_build_their_attackers():
    ll = _training_attacker(adv_method="pgdll_16_2_10")
    assert isinstance(ll, PGDAttacker) and (ll.num_iter, ll.epsilon, ll.step_size) == (10, 16, 2)
    assert ll.target == "least_likely" and ll.prob_start_from_clean == 0.2
    assert _training_attacker(adv_method="pgd_16_2_10").target is None
    # The original's flags keep their meaning: random-target PGD.
    flags = _training_attacker(attack_iter=5, attack_epsilon=8.0, attack_step_size=2.0)
    assert (flags.num_iter, flags.epsilon, flags.step_size, flags.target) == (5, 8, 2, "random")
    assert isinstance(_training_attacker(adv_method="clean"), NoOpAttacker)
    # Wong et al. 2020: one untargeted step of 1.25 eps, always from a random start.
    fgsm = _training_attacker(adv_method="fgsmrs_8")
    assert (fgsm.num_iter, fgsm.step_size, fgsm.target, fgsm.prob_start_from_clean) == (
        1, 10.0, None, 0.0,
    )  # fmt: skip
    assert isinstance(_training_attacker(free_replays=4), FreeAttacker)


def test_fgsm_rs_is_one_signed_step_from_a_random_start_inside_the_ball():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    images = torch.rand(5, 3, 2, 2) * 255
    labels = torch.tensor([0, 1, 2, 0, 1])
    eps = 8.0
    settings = AttackSettings(0, eps, 0, generator=torch.Generator().manual_seed(3))
    attacker = create_attacker("fgsmrs", settings)
    adv, targets = attacker.attack(model, images, labels)
    # Independently: the same start from the same seed, one ascent step of 10, projected.
    gen = torch.Generator().manual_seed(3)
    torch.rand((), generator=gen)  # the start-from-clean draw (always from noise here)
    start = images + (-eps + 2 * eps * torch.rand(images.shape, generator=gen))
    start = torch.minimum(torch.maximum(start, (images - eps).clamp(0, 255)), images + eps)
    start = start.clamp(0, 255).requires_grad_(True)
    F.cross_entropy(model(start), labels, reduction="sum").backward()
    expected = (start.detach() + 1.25 * eps * start.grad.sign()).clamp(images - eps, images + eps)
    torch.testing.assert_close(adv, expected.clamp(0, 255))
    assert torch.equal(targets, no_targets(labels))


def test_a_bad_spec_is_one_line_and_creates_nothing(tiny_imagenet, tmp_path, capsys):
    logdir = tmp_path / "run"
    assert main([*train_args(tiny_imagenet, logdir), "--adv-method", "pgd_16_2"]) == 1
    line = error_line(capsys)
    assert line.startswith("error: --adv-method: 'pgd_16_2' is not an attack spec; valid forms:")
    assert "pgdll_EPS_STEP_NITER" in line and "fgsmrs_EPS" in line and not logdir.exists()


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--adv-fraction", "0"], "--adv-fraction: must be in (0, 1], got 0.0"),
        (["--lp-weight", "0.5", "--adv-fraction", "1"], "--lp-weight: logit pairing needs"),
        (["--moving-average-decay", "1"], "--moving-average-decay: must be < 1"),
        (["--eval-ema"], "--eval-ema: training keeps no averaged weights"),
        (
            ["--finetune-exclude-scopes", "linear"],
            "--finetune-exclude-scopes/--finetune-trainable-scopes: need",
        ),
        (["--accumulate", "0"], "--accumulate: must be >= 1, got 0"),
        (["--free-replays", "2", "--adv-method", "clean"], "--free-replays: needs an attack"),
        (["--free-replays", "2", "--accumulate", "2"], "--free-replays: cannot be combined"),
    ],
)
def test_bad_variant_flags_are_one_line(tiny_imagenet, tmp_path, capsys, flags, said):
    logdir = tmp_path / "run"
    assert main([*train_args(tiny_imagenet, logdir), *flags]) == 1
    assert error_line(capsys).startswith(f"error: {said}") and not logdir.exists()


# --- 2. mixed batches and adversarial logit pairing --------------------------------------------
class ShiftAttacker(Attacker):
    """A deterministic stand-in attack: +7 on every pixel (so adversarial images are known)."""

    def attack(self, model, images, labels, generator=None):
        return images + 7.0, no_targets(labels)


class Recorder(nn.Module):
    """A linear classifier that remembers the batch it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 4)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.linear(x.flatten(1))


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> float:
    """Mean cross-entropy against (1 - eps) one-hot + eps / C, written out in float64."""
    total = 0.0
    for row, label in zip(logits.double().tolist(), labels.tolist(), strict=True):
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        total -= (1 - eps) * log_p[label] + eps * sum(log_p) / len(row)
    return total / len(labels)


@pytest.mark.parametrize(
    ("fraction", "n_adv", "n_clean"), [(0.25, 3, 8), (0.5, 8, 8), (0.75, 8, 3)]
)
def test_logit_pairing_loss_equals_an_independent_computation(fraction, n_adv, n_clean):
    """ALP's batches: every loaded image is used, clean and / or adversarial, the first ones
    both; n_adv / (n_adv + n_clean) is the requested fraction up to rounding (3/11, 8/16, 8/11)."""
    torch.manual_seed(0)
    model = Recorder()
    images, labels = torch.rand(8, 3, 2, 2) * 255, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    weight, smoothing = 0.7, 0.1
    terms = training_terms(
        model, model, ShiftAttacker(), images, labels, smoothing, fraction, weight
    )
    (batch,) = model.seen
    assert batch.shape[0] == n_adv + n_clean and max(n_adv, n_clean) == 8  # none left unused
    assert abs(n_adv / (n_adv + n_clean) - fraction) <= 0.5 / (n_adv + n_clean) + 0.03
    assert torch.equal(batch[:n_adv], images[:n_adv] + 7)  # adversarial: the first n_adv
    assert torch.equal(batch[n_adv:], images[:n_clean])  # clean twins (paired)
    with torch.no_grad():
        adv = model.linear((images[:n_adv] + 7).flatten(1))
        clean = model.linear(images[:n_clean].flatten(1))
    pairs = min(n_adv, n_clean)
    squared = [
        (a - c) ** 2 for a, c in zip(adv[:pairs].flatten(), clean[:pairs].flatten(), strict=True)
    ]
    cross_entropy = smoothed_cross_entropy(
        torch.cat([adv, clean]), torch.cat([labels[:n_adv], labels[:n_clean]]), smoothing
    )
    pairing = float(sum(squared)) / len(squared)
    assert terms.loss.item() == pytest.approx(cross_entropy + weight * pairing, rel=1e-5)
    # The parts the trainer logs (train/cross_entropy, train/logit_pairing): the pairing unweighted
    assert terms.cross_entropy.item() == pytest.approx(cross_entropy, rel=1e-5)
    assert terms.pairing.item() == pytest.approx(pairing, rel=1e-5)
    assert terms.adv_logits.shape[0] == n_adv and terms.targets.shape[0] == n_adv


def test_mixed_minibatch_pgd_uses_every_image_once_without_pairing():
    model = Recorder()
    images, labels = torch.rand(10, 3, 2, 2) * 255, torch.arange(10) % 4
    loss, _, _ = training_objective(model, model, ShiftAttacker(), images, labels, 0.0, 0.3, 0.0)
    (batch,) = model.seen
    assert torch.equal(batch[:3], images[:3] + 7) and torch.equal(batch[3:], images[3:])
    with torch.no_grad():
        expected = smoothed_cross_entropy(model.linear(batch.flatten(1)), labels, 0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert mixed_batch(10, 1.0, paired=False) == (slice(0, 10), slice(10, 10))  # the original


# --- 3. moving average of the weights ----------------------------------------------------------
def test_ema_after_n_steps_equals_the_closed_form_on_a_constant_gradient_path():
    decay, lr, steps = 0.9, 0.1, 25
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
    grad = torch.tensor([[0.3, -0.1, 2.0]])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    ema = WeightAverage(model, decay)
    for n in range(1, steps + 1):
        optimizer.zero_grad()
        (model.weight * grad).sum().backward()  # a constant gradient
        optimizer.step()
        ema.update(model, n)
    # theta_k = theta_0 - k lr g; ema_n = prod(d_k) theta_0 + sum_k (1 - d_k) prod_{j>k} d_j
    # theta_k, d_k = min(decay, (1 + k) / (10 + k)) (TF's ExponentialMovingAverage with steps).
    d = [min(decay, (1 + k) / (10 + k)) for k in range(1, steps + 1)]
    theta0, g = [1.0, -2.0, 0.5], [0.3, -0.1, 2.0]
    for i in range(3):
        value = math.prod(d) * theta0[i]
        for k in range(1, steps + 1):
            value += (1 - d[k - 1]) * math.prod(d[k:]) * (theta0[i] - k * lr * g[i])
        assert ema.shadow["weight"][0, i].item() == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert ema_decay(0.9999, 1) == pytest.approx(2 / 11)


def test_ema_averages_batchnorm_statistics_and_copies_counters():
    model = nn.BatchNorm1d(2)
    ema = WeightAverage(model, 0.5)
    model(torch.tensor([[1.0, 3.0], [3.0, 5.0]]))  # running_mean 0.1 * [2, 4]
    ema.update(model, 100)
    torch.testing.assert_close(ema.shadow["running_mean"], torch.tensor([0.1, 0.2]))
    assert ema.shadow["num_batches_tracked"].item() == 1


def test_eval_ema_evaluates_the_averaged_weights(tiny_imagenet, tmp_path, capsys):
    logdir = tmp_path / "run"
    args = [*train_args(tiny_imagenet, logdir), *RUN, "--moving-average-decay", "0.5"]
    assert main([*args, "--epochs", "1", "--eval-ema", "--train-eval", "light"]) == 0
    state = torch.load(logdir / "checkpoint-epoch0001.pt", weights_only=True)
    assert state["ema"].keys() == state["model"].keys()
    assert not torch.equal(state["ema"]["linear.weight"], state["model"]["linear.weight"])
    out = tmp_path / "eval.json"
    common = ["--eval", "--load", str(logdir / "checkpoint-epoch0001.pt"), "--data",
              str(tiny_imagenet), "--image-size", "32", "--batch", "4", "--workers", "0",
              "--attack-iter", "0", "--eval-output", str(out)]  # fmt: skip
    capsys.readouterr()
    assert main([*common, "--eval-ema"]) == 0
    averaged = json.loads(out.read_text())
    assert "clean, EMA weights (--eval-ema): 7 images" in capsys.readouterr().out
    assert averaged["threat_model"] == "clean, EMA weights (--eval-ema)"
    # Independently: the averages saved as a plain state dict, evaluated as any weights.
    plain = tmp_path / "plain.pt"
    torch.save(state["ema"], plain)
    tiny = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8"]
    assert main([*common[:2], str(plain), *common[3:], *tiny]) == 0
    assert json.loads(out.read_text())["top1_error"] == averaged["top1_error"]
    # A checkpoint without averages: one line.
    assert main([*common[:2], str(plain), *common[3:], *tiny, "--eval-ema"]) == 1
    assert "no averaged weights" in error_line(capsys)


# --- 4. fine-tuning -------------------------------------------------------------------------
def test_finetuning_excludes_freezes_and_trains_the_named_scopes(
    tiny_imagenet, tmp_path, capsys, monkeypatch
):
    source = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=7)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)  # unlike any fresh initialisation
    nets.save_npz(source, tmp_path / "source.npz")
    logdir = tmp_path / "run"
    flags = ["--finetune-checkpoint", str(tmp_path / "source.npz"), "--finetune-exclude-scopes",
             "linear", "--finetune-trainable-scopes", "group3,linear"]  # fmt: skip
    read_weights, reads = nets.read_weights, []
    monkeypatch.setattr(nets, "read_weights", lambda path: reads.append(path) or read_weights(path))
    assert main([*train_args(tiny_imagenet, logdir), *RUN, "--epochs", "1", *flags]) == 0
    assert reads.count(str(tmp_path / "source.npz")) == 1  # read once (the builders' rule)
    first = capsys.readouterr().err.splitlines()[0]  # it once said "starting from scratch"
    assert first.startswith(f"{logdir}: fine-tuning from the weights of {tmp_path / 'source.npz'};")
    trained = torch.load(logdir / "checkpoint-epoch0001.pt", weights_only=True)["model"]
    before = dict(source.named_parameters())
    torch.manual_seed(0)  # the run's --seed: what a fresh run initialises
    fresh = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=3)
    for name, _ in fresh.named_parameters():
        if name.startswith("group3."):
            assert not torch.equal(trained[name], before[name]), f"{name} was not trained"
        elif not name.startswith("linear."):
            assert torch.equal(trained[name], before[name]), f"{name} moved while frozen"
    # The excluded classifier started fresh (3 classes, not the source's 7) and was trained.
    assert trained["linear.weight"].shape == (3, 256)
    assert not torch.equal(trained["linear.weight"], fresh.linear.weight)


def test_excluded_scopes_are_freshly_initialised(tmp_path):
    from iat.runs.state import Progress, Start
    from iat.train.trainer import build_network

    source = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=3)
    torch.save(source.state_dict(), tmp_path / "source.pt")
    cfg = Config(
        data="x",
        num_blocks=(1, 1, 1, 1),
        width=8,
        finetune_checkpoint=str(tmp_path / "source.pt"),
        finetune_exclude_scopes=("linear", "group3/block0/conv3"),
    )
    torch.manual_seed(0)
    fresh = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=3)
    torch.manual_seed(0)
    start = Start("fresh", None, None, Progress(0, 0))
    finetune = nets.read_weights(tmp_path / "source.pt")
    model = build_network(cfg, start, 3, torch.device("cpu"), finetune)
    for name, tensor in model.state_dict().items():
        excluded = name.startswith(("linear.", "group3.block0.conv3."))
        expected = (fresh if excluded else source).state_dict()[name]
        assert torch.equal(tensor, expected), name
    assert not torch.equal(fresh.group3.block0.conv3.weight, source.group3.block0.conv3.weight)


# --- 5. virtual batches ---------------------------------------------------------------------
def no_bn_net() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    return net


def accumulation_data() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(12, 3, 6, 6, generator=torch.Generator().manual_seed(0)) * 255
    return images, torch.arange(12) % 5


def train_in_parts(model: nn.Module, ddp: nn.Module, images, labels, split) -> nn.Module:
    """Two updates (momentum enters the second) of `model`, through `ddp`, on the batch cut
    into micro-batches of the sizes `split`."""
    optimizer = build_optimizer(model, Config(data="x", weight_decay=1e-2))
    for group in optimizer.param_groups:
        group["lr"] = 0.05
    # A deterministic PGD (from the clean image, untargeted): per image, so split or whole
    # batches make the same adversarial images.
    attacker = PGDAttacker(3, 8.0, 2.0, prob_start_from_clean=1.0, target=None)
    parts = [(images[i], labels[i]) for i in torch.split(torch.arange(len(labels)), split)]
    for _ in range(2):
        result = train_step(ddp, model, attacker, optimizer, parts, LossSettings(0.1))
    assert result.labels.shape == labels.shape  # every micro-batch is counted
    return model


def assert_same_parameters(left: nn.Module, right: nn.Module) -> None:
    pairs = zip(left.named_parameters(), right.named_parameters(), strict=True)
    for (name, a), (_, b) in pairs:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_accumulated_micro_batches_give_the_update_of_one_large_batch():
    images, labels = accumulation_data()
    whole = no_bn_net()
    train_in_parts(whole, whole, images, labels, (12,))
    micro = no_bn_net()
    train_in_parts(micro, micro, images, labels, (4, 4, 4))
    assert_same_parameters(micro, whole)
    assert not torch.equal(whole[0].weight, no_bn_net()[0].weight)


def _accumulating_rank(env: distributed.DistEnv, out_dir: str) -> None:
    """One of 2 ranks: its 6 images as 2 micro-batches of 3, through DDP, counting the
    gradient all-reduces (a communication hook)."""
    torch.set_num_threads(1)
    with distributed.process_group(env, torch.device("cpu"), timeout_s=60):
        model = no_bn_net()
        ddp = DistributedDataParallel(model)
        calls = []

        def counting_allreduce(state, bucket):
            calls.append(1)
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_allreduce)
        images, labels = accumulation_data()
        mine = slice(6 * env.rank, 6 * env.rank + 6)
        train_in_parts(model, ddp, images[mine], labels[mine], (3, 3))
        torch.save({"model": model.state_dict(), "allreduces": len(calls)},
                   Path(out_dir) / f"rank{env.rank}.pt")  # fmt: skip
        del ddp  # before the group goes: it holds the group's Gloo threads


def test_accumulation_on_two_processes_all_reduces_once_per_update(tmp_path):
    distributed.spawn(_accumulating_rank, 2, (str(tmp_path),))
    images, labels = accumulation_data()
    whole = no_bn_net()
    train_in_parts(whole, whole, images, labels, (12,))
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert saved["allreduces"] == 2  # 2 updates, one bucket, no sync on the first micro
        model = no_bn_net()
        model.load_state_dict(saved["model"])
        assert_same_parameters(model, whole)


# --- 6. cheap adversarial training on the digits -----------------------------------------------
DIGITS_EPS = 32.0


def train_digits(attacker: Attacker, steps: int, replays: int = 1) -> float:
    """A DigitsNet trained `steps` updates through ``train_step``; its PGD-10 error
    (untargeted, eps 32) on the 297 held-out digits."""
    torch.manual_seed(0)
    images, labels = digits_tensors()
    model = DigitsNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        if step % replays == 0:  # free training replays each minibatch `replays` times
            idx = torch.randint(0, 1500, (64,), generator=gen)
        train_step(model, model, attacker, optimizer, [(images[idx], labels[idx])],
                   LossSettings(0.0))  # fmt: skip
        if isinstance(attacker, FreeAttacker):
            attacker.advance()
    pgd = PGDAttacker(10, DIGITS_EPS, DIGITS_EPS / 4, target=None)
    model.eval()
    adv, _ = pgd.attack(
        model, images[1500:], labels[1500:], generator=torch.Generator().manual_seed(1)
    )
    return (eval_logits(model, adv).argmax(1) != labels[1500:]).float().mean().item()


def test_fgsm_rs_and_free_training_resist_pgd_better_than_clean_training():
    settings = AttackSettings(0, DIGITS_EPS, 0, generator=torch.Generator().manual_seed(2))
    clean = train_digits(NoOpAttacker(), 150)
    fgsm = train_digits(create_attacker("fgsmrs", settings), 150)
    free = train_digits(FreeAttacker(DIGITS_EPS), 150, replays=4)
    print(f"PGD-10 error: clean {clean:.3f}, FGSM-RS {fgsm:.3f}, free (m=4) {free:.3f}")
    assert clean > 0.6
    assert fgsm < clean - 0.2 and free < clean - 0.2


def test_apgd_trains_as_a_training_attack(tiny_imagenet, tmp_path):
    """--adv-method apgd_EPS_NITER: APGD-CE (Singh, Croce & Hein 2023 train with APGD-2) builds
    from the registry, trains and is recorded."""
    from iat.attacks.apgd import APGDAttacker

    attacker = _training_attacker(adv_method="apgd_8_2")
    assert isinstance(attacker, APGDAttacker)
    assert (attacker.num_iter, attacker.epsilon, attacker.targeted) == (2, 8.0, False)
    logdir = tmp_path / "run"
    assert main([*train_args(tiny_imagenet, logdir), *RUN, "--epochs", "1",
                 "--adv-method", "apgd_8_2"]) == 0  # fmt: skip
    stored = json.loads((logdir / "config.json").read_text())["config"]
    assert stored["adv_method"] == "apgd_8_2"


def test_logit_pairing_runs_log_their_two_terms(tiny_imagenet, tmp_path):
    """With --lp-weight, metrics.jsonl and TensorBoard carry train/cross_entropy and the
    unweighted train/logit_pairing beside train/loss (ALP Sec 3's two terms); a run without
    pairing logs neither."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    weight = 0.5
    paired, plain = tmp_path / "alp", tmp_path / "plain"
    alp = ["--lp-weight", str(weight), "--adv-fraction", "0.5"]
    assert main([*train_args(tiny_imagenet, paired), *RUN, "--epochs", "1", *alp]) == 0
    assert main([*train_args(tiny_imagenet, plain), *RUN, "--epochs", "1"]) == 0
    records = [json.loads(line) for line in (paired / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("phase") == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert r["train/logit_pairing"] > 0
        total = r["train/cross_entropy"] + weight * r["train/logit_pairing"]
        assert r["train/loss"] == pytest.approx(total, rel=1e-6)
    events = EventAccumulator(str(paired))
    events.Reload()
    logged = [e.value for e in events.Scalars("train/logit_pairing")]
    assert logged == pytest.approx([r["train/logit_pairing"] for r in train], rel=1e-6)
    keys = {
        k for line in (plain / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)
    }
    assert "train/loss" in keys
    assert not keys & {"train/logit_pairing", "train/cross_entropy"}
