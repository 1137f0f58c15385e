"""--report: training curves, accuracy curves and the model-zoo table, checked by their data."""

from __future__ import annotations

import json
from pathlib import Path

from iat.report import collect, robust_accuracy_curves, training_curves, zoo_table
from main import main

TINY = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_of_a_run_and_its_evaluations(tiny_imagenet: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = [*TINY, "--image-size", "32", "--batch", "4", "--workers", "0"]
    assert main(["--data", str(tiny_imagenet), "--logdir", str(run), *common, "--loader",
                 "local", "--attack-iter", "1", "--steps-per-epoch", "2", "--epochs", "2",
                 "--train-eval", "light", "--log-every", "1"]) == 0  # fmt: skip
    ckpt = run / "checkpoint-epoch0002.pt"
    evals = tmp_path / "evals"
    for name, flags in {
        "clean": ["--attack-iter", "0"],
        "pgd2": ["--attack-iter", "2"],
        "pgd4": ["--attack-iter", "4"],
        "untargeted": ["--attack-iter", "4", "--attack-target", "none"],
    }.items():
        out = evals / f"{name}.json"
        assert main(["--eval", "--load", str(ckpt), "--data", str(tiny_imagenet), *common,
                     *flags, "--attack-epsilon", "8", "--eval-output", str(out)]) == 0  # fmt: skip

    report = tmp_path / "report"
    assert main(["--report", str(run), str(evals), "--out", str(report)]) == 0
    for name in ("training.png", "accuracy_vs_iterations.png", "accuracy_vs_epsilon.png"):
        data = (report / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name

    # The data behind the plots.
    training, records = collect([run, evals])
    panels = training_curves(training)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged if r["phase"] == "train"]
    assert [x for x, _ in panels["train/loss"]["run"]] == steps == [1, 2, 3, 4]
    assert sorted(panels["train/top1_error"]) == ["run", "run eval-10step", "run eval-clean"]
    assert len(panels["train/top1_error"]["run eval-clean"]) == 2  # after each epoch
    by_file = {Path(r["checkpoint"]).name: r for r in records}
    assert len(records) == 4 and set(by_file) == {"checkpoint-epoch0002.pt"}
    ((label, points),) = robust_accuracy_curves(records, "iter").items()
    assert label == "run/checkpoint-epoch0002.pt"
    assert [x for x, _ in points] == [0.0, 2.0, 4.0]  # clean, PGD-2, PGD-4 (both targets)
    clean = json.loads((evals / "clean.json").read_text())
    assert (0.0, 1 - clean["top1_error"]) in points

    table = (report / "report.md").read_text()
    assert table == zoo_table(records)
    row = table.splitlines()[2]
    untargeted = json.loads((evals / "untargeted.json").read_text())
    assert f"| {100 * clean['top1_error']:.1f} |" in row
    assert f"| {100 * untargeted['top1_error']:.1f} |" in row


def test_report_of_nothing_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["--report", str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    assert "no metrics.jsonl and no evaluation records" in capsys.readouterr().err
