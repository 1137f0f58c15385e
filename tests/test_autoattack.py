"""AutoAttack (iat.attacks.autoattack) as its authors define it, and APGD-DLR, the rand
version's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval_outputs import COMMON

import nets
from adv_model import AttackSettings, create_attacker
from iat.attacks.apgd import APGDAttacker, dlr
from iat.attacks.autoattack import RAND_EOT_SAMPLES, RAND_MEMBERS, STANDARD_MEMBERS
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
    assert line.startswith(
        "AutoAttack standard (APGD-CE-3, APGD-T-3 top-2, FAB-T-3 top-2, Square 20 queries), "
        "L-inf eps=2: 8 images"
    ), line
    record = json.loads(out.read_text())
    assert record["attack"]["version"] == "standard"
    assert record["attack"]["members"] == list(STANDARD_MEMBERS)
    assert list(record["details"]["members"]) == list(STANDARD_MEMBERS)
    assert sum(m["broken"] for m in record["details"]["members"].values()) + record["details"][
        "clean_wrong"
    ] == round(record["top1_error"] * 8)
    assert main([*args, "--defense", "noise:4", "--eot-samples", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("AutoAttack rand (APGD-CE-3, APGD-DLR-3; EOT over 20 draws), L-inf")
    assert "EOT over 2 draws" not in line  # the defense words name the rand version's 20
    assert json.loads(out.read_text())["attack"]["version"] == "rand"
