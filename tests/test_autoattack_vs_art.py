"""bench/autoattack_vs_art.py's bookkeeping: per-image results read back as the evaluation writes
them, every "broken" claim checked again, and the 2x2 agreement with its disagreements."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from iat.eval.evaluate import image_rows, write_image_results

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location(
        "autoattack_vs_art", ROOT / "bench" / "autoattack_vs_art.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = load_bench()


class PixelLogits(torch.nn.Module):
    """Logit k is the image's pixel k (of four; the fourth is ignored): margins by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3]


def images(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).view(-1, 1, 2, 2)


def side(adv: torch.Tensor, claimed: list[bool], member: list) -> object:
    return bench.Side(adv, np.array(claimed), member, seconds=0.0)


def test_claims_are_checked_and_the_table_counts_verified_results():
    eps = 16.0
    labels = torch.tensor([0, 0, 1, 2])
    clean = images([100, 90, 0, 0], [100, 90, 0, 0], [0, 100, 90, 0], [0, 0, 100, 250])
    # 0: nobody breaks it; 1: ours within eps (margin -10), ART not; 2: ours claims a point
    # 30 away (outside eps), ART one 8 away; 3: ART claims a point above 255, ours one in range.
    ours_adv = images([100, 90, 0, 0], [90, 100, 0, 0], [0, 70, 95, 0], [0, 0, 100, 250])
    art_adv = images([100, 90, 0, 0], [100, 90, 0, 0], [0, 92, 98, 0], [0, 99, 100, 260])
    ours = side(ours_adv, [False, True, True, False], [None, "apgd-ce", "fab-t", None])
    art = side(art_adv, [False, False, True, True], [None, None, "APGD-T", "Square"])
    model = PixelLogits()
    ours_check = bench.check(model, clean, labels, ours_adv, eps)
    art_check = bench.check(model, clean, labels, art_adv, eps)

    np.testing.assert_allclose(ours_check.linf, [0, 10, 30, 0])
    np.testing.assert_allclose(ours_check.margin, [10, -10, -25, 100])
    np.testing.assert_allclose(art_check.margin, [10, 10, -6, 1])
    assert art_check.in_range.tolist() == [True, True, True, False]
    assert ours_check.broken.tolist() == [False, True, False, False]
    assert art_check.broken.tolist() == [False, False, True, False]
    assert bench.unverified(ours, ours_check) == [2]  # outside eps
    assert bench.unverified(art, art_check) == [3]  # not misclassified, out of range
    table = bench.agreement(ours_check.broken, art_check.broken)
    assert table == {
        "both robust": 2,
        "both broken": 0,
        "only ours broken": 1,
        "only ART broken": 1,
    }
    rows = bench.disagreement_rows(labels, ours, ours_check, art, art_check)
    assert [(r["index"], r["label"], r["ours"], r["art"]) for r in rows] == [
        (1, 0, "apgd-ce", "robust"),
        (2, 1, "robust", "APGD-T"),
    ]
    assert rows[1]["ours_linf"] == pytest.approx(30) and rows[1]["art_linf"] == pytest.approx(8)


def test_per_image_results_are_read_back_as_the_evaluation_wrote_them(tmp_path):
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 1.0, 0.0], [0.0, 0.5, 1.5]])
    labels = torch.tensor([1, 1, 2])
    rows = image_rows(
        logits, labels, torch.tensor([2, 0, 1]), {"broken_by": [None, "apgd-t", None]}
    )
    cfg = bench.Config(data="unused", attack_epsilon=16.0)
    path = tmp_path / "eval.json.images.jsonl"
    write_image_results(path, [(cfg, rows)])
    read = bench.read_image_results(path)
    # written in batch order (images 2, 0, 1), read back in image order
    assert [(r["index"], r["label"], r["prediction"]) for r in read] == [
        (0, 1, 0),
        (1, 2, 2),
        (2, 1, 1),
    ]
    assert [r["broken_by"] for r in read] == ["apgd-t", None, None]
    assert [r["margin"] for r in read] == pytest.approx([-2.0, 1.0, 1.0])
    write_image_results(path, [(cfg, rows[:2])])  # images 2 and 0: image 1 is missing
    with pytest.raises(RuntimeError, match="not 0..1"):
        bench.read_image_results(path)


def test_targets_are_the_classes_ranked_second_and_below():
    logits = np.array([[0.1, 3.0, 2.0, -1.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert bench.top_targets(logits, 3).tolist() == [[2, 4, 0], [1, 2, 3]]
