"""AutoAttack (iat.attacks.autoattack) as its authors define it, and APGD-DLR, the rand
version's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval_outputs import COMMON
from torch import nn

import nets
from adv_model import AttackSettings, create_attacker
from iat.attacks import autoattack
from iat.attacks.apgd import APGDAttacker, dlr
from iat.attacks.autoattack import RAND_EOT_SAMPLES, RAND_MEMBERS, STANDARD_MEMBERS
from iat.attacks.core import Attacker, no_targets
from iat.attacks.ensemble import EnsembleAttacker
from iat.attacks.fab import FABAttacker
from iat.attacks.square import SquareAttacker
from main import main


def test_dlr_is_the_papers_formula():
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.randint(0, 10, (50,), generator=torch.Generator().manual_seed(1))
    expected = []
    for z, y in zip(logits.numpy().astype(np.float64), labels.numpy(), strict=True):
        ranked = np.sort(z)[::-1]
        others = np.delete(z, y)
        # Croce & Hein 2020, Eq. (6): DLR = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)
        expected.append(-(z[y] - others.max()) / (ranked[0] - ranked[2]))
    np.testing.assert_allclose(dlr(logits, labels).numpy(), expected, rtol=1e-5)


def test_standard_version_is_the_authors_four_members_in_order():
    settings = AttackSettings(100, 4.0, 1.0, norm="2", queries=5000, top_k=9, restarts=3)
    attacker = create_attacker("autoattack", settings)
    assert isinstance(attacker, EnsembleAttacker)
    names = [name for name, _ in attacker.members]
    assert tuple(names) == STANDARD_MEMBERS == ("apgd-ce", "apgd-t", "fab-t", "square")
    apgd_ce, apgd_t, fab_t, square = (a for _, a in attacker.members)
    assert isinstance(apgd_ce, APGDAttacker) and not apgd_ce.targeted and apgd_ce.loss == "ce"
    assert isinstance(apgd_t, APGDAttacker) and apgd_t.targeted and apgd_t.top_k == 9
    assert isinstance(fab_t, FABAttacker) and fab_t.top_k == 9
    assert isinstance(square, SquareAttacker) and square.queries == 5000
    for member in (apgd_ce, apgd_t):
        assert member.num_iter == 100 and member.restarts == 1 and member.norm == "2"


def test_rand_version_against_a_random_defense():
    settings = AttackSettings(100, 4.0, 1.0, eot_samples=10)  # a random defense's EOT draws
    attacker = create_attacker("autoattack", settings)
    assert tuple(name for name, _ in attacker.members) == RAND_MEMBERS
    (_, ce), (_, dlr_member) = attacker.members
    assert (ce.loss, dlr_member.loss) == ("ce", "dlr")
    assert ce.eot_samples == dlr_member.eot_samples == RAND_EOT_SAMPLES == 20


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=4)
    with torch.no_grad():  # predictions that depend on the image
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    path = tmp_path / "model.pt"
    nets.save_weights(model, path)
    return path


def test_eval_autoattack_states_its_version_members_and_shares(tmp_path: Path, checkpoint, capsys):
    from conftest import write_imagenet

    data = write_imagenet(tmp_path / "imagenet", classes=4, val_images=8)
    out = tmp_path / "r.json"
    args = ["--eval", "--load", str(checkpoint), "--data", str(data), *COMMON,
            "--attack", "autoattack", "--attack-iter", "3", "--attack-epsilon", "2",
            "--apgd-targets", "2", "--queries", "20", "--masking-checks", "0",
            "--eval-output", str(out)]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(  # the authors' settings changed: their code's version "custom"
        "AutoAttack custom (APGD-CE-3, APGD-T-3 top-2, FAB-T-3 top-2, Square 20 queries; the "
        "standard version's settings changed), L-inf eps=2: 8 images"
    ), line
    record = json.loads(out.read_text())
    assert record["attack"]["version"] == "custom"
    assert record["attack"]["based_on"] == "standard"
    assert record["attack"]["members"] == list(STANDARD_MEMBERS)
    assert list(record["details"]["members"]) == list(STANDARD_MEMBERS)
    assert sum(m["broken"] for m in record["details"]["members"].values()) + record["details"][
        "clean_wrong"
    ] == round(record["top1_error"] * 8)
    # The per-image file, read back: each image's member and final margin, as the record counts.
    rows = [json.loads(line) for line in Path(f"{out}.images.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(8))
    for row in rows:
        assert (row["margin"] < 0) == (row["prediction"] != row["label"])
        assert (row["broken_by"] is not None) == (row["margin"] < 0)
    counts = {name: sum(row["broken_by"] == name for row in rows) for name in STANDARD_MEMBERS}
    assert counts == {n: m["broken"] for n, m in record["details"]["members"].items()}
    assert sum(row["broken_by"] == "clean" for row in rows) == record["details"]["clean_wrong"]
    assert main([*args, "--defense", "noise:4", "--eot-samples", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("AutoAttack custom (APGD-CE-3, APGD-DLR-3; EOT over 20 draws; the rand")
    assert "EOT over 2 draws" not in line  # the defense words name the rand version's 20
    assert json.loads(out.read_text())["attack"]["based_on"] == "rand"


def test_autoattack_runs_the_authors_settings_whatever_the_training_flags_say():
    from iat.app.cli import build_parser, config_from_args
    from iat.builders import attack_settings

    def settings(*flags: str) -> AttackSettings:
        args = ["--eval", "--load", "m.pt", "--data", ".", "--attack", "autoattack", *flags]
        cfg = config_from_args(build_parser().parse_args(args))
        return attack_settings(cfg, attack_iter=cfg.attack_iter, num_classes=10)

    standard = settings()  # --attack-iter's default is the training attack's 30
    assert (standard.num_iter, standard.top_k, standard.queries) == (100, 9, 5000)
    assert autoattack.version_of(standard) == "standard"
    assert autoattack.record(standard)["version"] == "standard"
    changed = settings("--attack-iter", "30")
    assert (changed.num_iter, changed.top_k) == (30, 9)
    assert autoattack.version_of(changed) == "custom"
    assert autoattack.version_of(settings("--queries", "1000")) == "custom"
    pgd = config_from_args(build_parser().parse_args(["--eval", "--load", "m.pt", "--data", "."]))
    assert pgd.attack_iter == 30  # other attacks keep the flags' defaults


class OnTheBoundary(nn.Module):
    """Two classes on the mean pixel: z_1 - z_0 = mean - 100. Its folded form (as
    ``attack_mode`` folds a ConvBN's BatchNorm) adds 1e-3 to z_1, as rounding does near the
    boundary: a point 1e-4 below it is misclassified for the folded copy, correct for the score.
    With ``noise``, every pass adds a fresh draw: a random model."""

    def __init__(self, noise: float = 0.0) -> None:
        super().__init__()
        self.folded, self.noise = None, noise

    def fold_batchnorm(self, low_precision: torch.dtype | None = None) -> None:
        self.folded = True

    def unfold_batchnorm(self) -> None:
        self.folded = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gap = x.flatten(1).mean(dim=1) - 100.0 + (1e-3 if self.folded else 0.0)
        gap = gap + self.noise * torch.randn_like(gap)
        return torch.stack([torch.zeros_like(gap), gap], dim=1)


class Shift(Attacker):
    """Every image to a constant one of pixel value 100 + ``offset``."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def attack(self, model, images, labels, generator=None):
        return torch.full_like(images, 100.0 + self.offset), no_targets(labels)


def boundary_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four correctly classified images (class 0) and one misclassified."""
    values = torch.tensor([50.0, 60.0, 70.0, 80.0, 150.0])
    return values[:, None, None, None].expand(-1, 3, 4, 4).clone(), torch.zeros(5, dtype=torch.long)


def test_an_attack_whose_successes_sit_on_the_boundary_is_scored_as_evaluation_scores():
    """The first member's points lie 1e-4 on the correct side of the boundary, misclassified
    only for the folded copy: no example counts as broken by it, each stays in play for the
    next member, and the counts are what scoring the returned images counts."""
    model, (images, labels) = OnTheBoundary(), boundary_batch()
    ensemble = EnsembleAttacker([("boundary", Shift(-1e-4)), ("beyond", Shift(10.0))])
    adv, _ = ensemble.attack(model, images, labels)
    with torch.no_grad():
        wrong = model(adv).argmax(dim=1) != labels  # as evaluate scores them
    assert wrong.all()
    stats = ensemble.describe_stats(ensemble.batch_stats(), len(labels))
    assert stats["clean_wrong"] == 1
    assert stats["members"]["boundary"] == {"attacked": 4, "broken": 0, "success_rate": 0.0}
    assert stats["members"]["beyond"] == {"attacked": 4, "broken": 4, "success_rate": 1.0}
    assert ensemble.image_results()["broken_by"] == ["beyond"] * 4 + ["clean"]
    counted = stats["clean_wrong"] + sum(m["broken"] for m in stats["members"].values())
    assert counted == int(wrong.sum())
    # Unbroken examples keep the first member's image; the boundary one, here.
    alone = EnsembleAttacker([("boundary", Shift(-1e-4))])
    adv, _ = alone.attack(model, images, labels)
    assert alone.describe_stats(alone.batch_stats(), 5)["members"]["boundary"]["broken"] == 0
    assert torch.equal(adv[:4], torch.full_like(adv[:4], 100.0 - 1e-4))


def test_the_standard_version_says_when_the_model_is_random():
    """The authors' check_randomized: two passes on the same images that differ are counted and
    said in one line pointing to the rand version; a deterministic model is not flagged."""
    from iat.eval.evaluate import randomness_line

    images, labels = boundary_batch()
    for noise, flagged in ((0.0, 0), (1.0, 1)):
        ensemble = EnsembleAttacker([("beyond", Shift(10.0))], check_random=True)
        ensemble.attack(OnTheBoundary(noise), images, labels)
        details = ensemble.describe_stats(ensemble.batch_stats(), len(labels))
        assert details["randomized_batches"] == flagged
        line = randomness_line(details)
        assert (line is None) == (not flagged)
    assert "rand version" in line and "\n" not in line
    standard = create_attacker("autoattack", AttackSettings(100, 4.0, 1.0))
    assert standard.check_random
