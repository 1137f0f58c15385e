"""--eval's outputs beyond the summary: exported adversarial images (black-box transfer) and
sweeps over epsilon and iterations."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import nets
from iat.app.report import robust_accuracy_curves
from iat.data.augment import eval_transform
from iat.data.layouts import list_split, read_image_bgr
from main import main

ARCH = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8"]
COMMON = [*ARCH, "--image-size", "32", "--batch", "3", "--workers", "0"]


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=8, num_classes=3)
    with torch.no_grad():  # predictions that depend on the image
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    path = tmp_path / "model.npz"
    nets.save_npz(model, path)
    return path


def test_exported_adversarial_images_reproduce_the_reported_numbers(
    tiny_imagenet: Path, checkpoint: Path, tmp_path: Path
) -> None:
    exported, result = tmp_path / "adversarial", tmp_path / "eval.json"
    args = ["--eval", "--load", str(checkpoint), "--data", str(tiny_imagenet), *COMMON,
            "--attack-iter", "3", "--attack-epsilon", "8", "--attack-target", "none",
            "--export-adversarial", str(exported), "--eval-output", str(result)]  # fmt: skip
    assert main(args) == 0
    record = json.loads(result.read_text())
    samples = list_split(tiny_imagenet, "val")[0]
    files = sorted(exported.rglob("*.png"))
    assert len(files) == len(samples) == record["images"] == 7
    for path, _ in samples:  # same relative names, class folders kept, in the epsilon-ball
        relative = Path(path).relative_to(tiny_imagenet / "val").with_suffix(".png")
        adversarial = cv2.imread(str(exported / relative), cv2.IMREAD_UNCHANGED)
        clean = eval_transform(read_image_bgr(path), 32)
        assert adversarial.shape == clean.shape and adversarial.dtype == np.uint8
        assert np.abs(adversarial.astype(int) - clean.astype(int)).max() <= 8
    # Black-box use: another run classifies the exported files; its errors are the reported ones.
    predictions = tmp_path / "predictions.txt"
    assert main(["--eval-directory", str(exported), "--load", str(checkpoint), *COMMON,
                 "--prediction-file", str(predictions)]) == 0  # fmt: skip
    lines = [line.split(",") for line in predictions.read_text().splitlines()]
    assert [name for name, _ in lines] == [p.relative_to(exported).as_posix() for p in files]
    wrong = sum(int(label) != int(name.split("/")[0][1:]) for name, label in lines)
    assert wrong / 7 == pytest.approx(record["top1_error"], abs=1e-12)


def test_an_exported_folder_is_evaluated_with_its_labels(
    tiny_imagenet: Path, checkpoint: Path, tmp_path: Path, capsys
) -> None:
    """Black-box transfer's accuracy: --eval --data EXPORT --split . scores the exported images
    with the labels the export wrote (here by the attacked model itself: the reported error)."""
    exported, attacked, scored = tmp_path / "adversarial", tmp_path / "a.json", tmp_path / "s.json"
    assert main(["--eval", "--load", str(checkpoint), "--data", str(tiny_imagenet), *COMMON,
                 "--attack-iter", "3", "--attack-epsilon", "8", "--attack-target", "none",
                 "--num-examples", "5", "--export-adversarial", str(exported),
                 "--eval-output", str(attacked)]) == 0  # fmt: skip
    labels = (exported / "labels.txt").read_text().splitlines()
    samples = list_split(tiny_imagenet, "val")[0][:5]
    expected = [
        f"{Path(p).relative_to(tiny_imagenet / 'val').with_suffix('.png').as_posix()} {label}"
        for p, label in samples
    ]
    assert labels == expected
    evaluate = ["--eval", "--load", str(checkpoint), "--data", str(exported), *COMMON,
                "--attack-iter", "0", "--eval-output", str(scored)]  # fmt: skip
    assert main(evaluate) == 1  # no val/ in an export: the error says what to give
    assert f"{exported} is an --export-adversarial folder: --split ." in capsys.readouterr().err
    assert main([*evaluate, "--split", "."]) == 0
    record, transfer = json.loads(attacked.read_text()), json.loads(scored.read_text())
    assert transfer["images"] == record["images"] == 5
    assert transfer["top1_error"] == pytest.approx(record["top1_error"], abs=1e-12)
    assert transfer["split"] == "."
    # Image by image: the exported crops are scored as they are (not resized and cropped again).
    attacked_rows, scored_rows = (
        [json.loads(line) for line in Path(f"{path}.images.jsonl").read_text().splitlines()]
        for path in (attacked, scored)
    )
    assert [r["prediction"] for r in scored_rows] == [r["prediction"] for r in attacked_rows]
    for mine, theirs in zip(scored_rows, attacked_rows, strict=True):
        assert mine["margin"] == pytest.approx(theirs["margin"], rel=1e-6)
    assert "top-1 error" in capsys.readouterr().out


def test_split_dot_of_plain_class_folders(tiny_imagenet: Path) -> None:
    """Without an export's labels.txt, --split . reads the folder's own class folders."""
    val = tiny_imagenet / "val"
    samples, classes = list_split(val, ".")
    assert (samples, classes) == list_split(tiny_imagenet, "val")


def test_sweeps_give_one_record_per_point(tiny_imagenet: Path, checkpoint: Path, tmp_path: Path):
    result = tmp_path / "sweep.json"
    assert main(["--eval", "--load", str(checkpoint), "--data", str(tiny_imagenet), *COMMON,
                 "--attack-iter", "2", "--sweep-epsilon", "0,4,16", "--sweep-iters", "1,3",
                 "--attack-target", "none", "--eval-output", str(result)]) == 0  # fmt: skip
    records = json.loads(result.read_text())["records"]
    points = [(r["attack"]["epsilon"], r["attack"]["iter"]) for r in records]
    assert points == [(0.0, 1), (0.0, 3), (4.0, 1), (4.0, 3), (16.0, 1), (16.0, 3)]
    assert all(r["images"] == 7 for r in records)
    at_zero = [r["top1_error"] for r in records if r["attack"]["epsilon"] == 0]
    assert at_zero[0] == at_zero[1]  # no budget, no attack: the clean error
    strongest = max(r["top1_error"] for r in records)
    assert strongest >= at_zero[0]
    curves = robust_accuracy_curves(records, "epsilon")  # one series per iteration count
    assert sorted(curves) == [f"{checkpoint.parent.name}/model.npz: PGD-{k} untargeted, L-inf"
                              for k in (1, 3)]  # fmt: skip
    assert all([x for x, _ in points] == [0.0, 4.0, 16.0] for points in curves.values())


def test_bad_sweep_is_one_line(tiny_imagenet: Path, checkpoint: Path, capsys) -> None:
    args = ["--eval", "--load", str(checkpoint), "--data", str(tiny_imagenet), *COMMON]
    assert main([*args, "--sweep-epsilon", "4,x"]) == 1
    assert "--sweep-epsilon" in capsys.readouterr().err
    assert main([*args, "--sweep-iters", "-1"]) == 1
    assert "--sweep-iters: must be >= 0" in capsys.readouterr().err


def test_pgd_summary_and_record_state_the_step_taken(
    tiny_imagenet: Path, checkpoint: Path, tmp_path: Path, capsys
) -> None:
    """An audit found --attack-step-size 1 and 3.2 both ran 3.2 (raised to epsilon / iterations)
    while the record said 1.0, and step 8 printed the same label as 3.2: the step PGD took is
    now in the summary line and the record, beside the one asked for."""
    lines, steps = {}, {}
    for asked in ("1", "3.2", "8"):
        result = tmp_path / f"step{asked}.json"
        capsys.readouterr()
        assert main(["--eval", "--load", str(checkpoint), "--data", str(tiny_imagenet), *COMMON,
                     "--attack-iter", "10", "--attack-epsilon", "32", "--attack-step-size", asked,
                     "--eval-output", str(result)]) == 0  # fmt: skip
        lines[asked] = capsys.readouterr().out.strip().splitlines()[-1]
        record = json.loads(result.read_text())["attack"]
        steps[asked] = (record["step_size"], record["step_size_requested"])
    assert steps == {"1": (3.2, 1.0), "3.2": (3.2, 3.2), "8": (8.0, 8.0)}
    assert lines["1"].startswith("PGD-10 random target, L-inf eps=32, step 3.2: 7 images")
    assert lines["8"].startswith("PGD-10 random target, L-inf eps=32, step 8: 7 images")
    assert lines["1"] == lines["3.2"]  # the same attack: the same line, the same numbers


def test_the_checks_complete_the_record_they_follow(tmp_path: Path) -> None:
    """--eval-output holds the evaluation's record with its masking checks beside it, not the
    checks alone (they are logged after the result)."""
    from iat.runs.logger import ResultFileBackend

    backend = ResultFileBackend(tmp_path / "e.json")
    backend.result("eval", {"images": 4, "top1_error": 0.5})
    backend.result("masking_checks", {"masking_checks": [{"name": "square"}]})
    written = json.loads((tmp_path / "e.json").read_text())
    assert written == {"images": 4, "top1_error": 0.5, "masking_checks": [{"name": "square"}]}
