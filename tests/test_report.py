"""--report: training curves, accuracy curves and the model-zoo table, checked by their data
and by what the figures draw."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from conftest import write_imagenet

from iat.app.report import (
    collect,
    draw_curves,
    draw_minimal,
    draw_training,
    minimal_epsilons,
    robust_accuracy_curves,
    training_curves,
    zoo_table,
)
from main import main

TINY = ["--arch", "ResNet", "--num-blocks", "1", "1", "1", "1", "--width", "8"]
COMMON = [*TINY, "--image-size", "32", "--batch", "4", "--workers", "0"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODEL = "run/checkpoint-epoch0001.pt"


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict[str, Path]:
    """A 1-epoch run with in-training evaluations (clean and PGD-10: one point each) and --eval
    records of its checkpoint: clean, a 4 x 2 sweep, untargeted PGD-4, FGM-minimal."""
    root = tmp_path_factory.mktemp("study")
    data, run, evals = write_imagenet(root / "imagenet", val_images=4), root / "run", root / "evals"
    evals.mkdir()  # --eval-output's folder must exist (checked before the evaluation)
    assert main(["--data", str(data), "--logdir", str(run), *COMMON, "--loader", "local",
                 "--attack-iter", "1", "--steps-per-epoch", "2", "--epochs", "1",
                 "--train-eval", "light", "--log-every", "1"]) == 0  # fmt: skip
    for name, flags in {
        "clean": ["--attack-iter", "0"],
        "sweep": ["--sweep-epsilon", "4,8,16,32", "--sweep-iters", "1,3"],
        "untargeted": ["--attack-iter", "4", "--attack-target", "none", "--attack-epsilon", "8"],
        "minimal": ["--attack", "fgm-minimal", "--attack-epsilon", "32", "--eps-step", "8"],
    }.items():
        out = evals / f"{name}.json"
        assert main(["--eval", "--load", str(run / "checkpoint-epoch0001.pt"), "--data",
                     str(data), *COMMON, *flags, "--eval-output", str(out)]) == 0  # fmt: skip
    return {"run": run, "evals": evals}


def _lines(figure) -> dict[str, tuple[list, list]]:
    """Label -> (x, y) of every line the figure's axes draw."""
    ax = figure.axes[0]
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def test_one_series_per_threat_model(study: dict[str, Path]) -> None:
    """A sweep's records make one line per threat model, never a zig-zag mixing them."""
    _, records = collect([study["evals"]])
    clean = json.loads((study["evals"] / "clean.json").read_text())
    clean_accuracy = 1 - clean["top1_error"]
    sweep = json.loads((study["evals"] / "sweep.json").read_text())["records"]
    accuracy = {(r["attack"]["epsilon"], r["attack"]["iter"]): 1 - r["top1_error"] for r in sweep}

    by_eps = robust_accuracy_curves(records, "epsilon")
    for k in (1, 3):
        points = by_eps[f"{MODEL}: PGD-{k} random target, L-inf"]
        assert points == [(0.0, clean_accuracy)] + [(e, accuracy[e, k]) for e in (4, 8, 16, 32)]
    untargeted = json.loads((study["evals"] / "untargeted.json").read_text())
    assert by_eps[f"{MODEL}: PGD-4 untargeted, L-inf"][1:] == [(8.0, 1 - untargeted["top1_error"])]
    assert f"{MODEL}: FGM-minimal random target, L-inf in steps of 8" in by_eps
    assert len(by_eps) == 4

    by_iter = robust_accuracy_curves(records, "iter")
    for eps in (4, 8, 16, 32):
        points = by_iter[f"{MODEL}: PGD random target, L-inf eps={eps}"]
        assert points == [(0.0, clean_accuracy), (1.0, accuracy[eps, 1]), (3.0, accuracy[eps, 3])]
    assert by_iter[f"{MODEL}: PGD untargeted, L-inf eps=8"][0] == (0.0, clean_accuracy)
    assert len(by_iter) == 5  # FGM has no iterations

    # What the figure draws: exactly these labelled lines, each with markers.
    figure = draw_curves(by_eps, "epsilon (pixels)")
    drawn = _lines(figure)
    assert set(drawn) == set(by_eps)
    for label, (xs, ys) in drawn.items():
        assert list(zip(xs, ys, strict=True)) == by_eps[label]
        assert xs == sorted(xs), label  # one x per point: no vertical zig-zag
    markers = [line.get_marker() for line in figure.axes[0].lines]
    assert len(set(markers)) == len(markers)  # coinciding series stay apart
    assert figure.axes[0].get_legend() is not None
    # A line only along a real sweep: one attack point beside the clean one is two markers.
    styles = {line.get_label(): line.get_linestyle() for line in figure.axes[0].lines}
    assert styles[f"{MODEL}: PGD-4 untargeted, L-inf"] == "None"
    assert all(styles[f"{MODEL}: PGD-{k} random target, L-inf"] != "None" for k in (1, 3))


def _record(name: str, error: float, **attack) -> dict:
    return {"top1_error": error, "images": 8, "checkpoint": "r/m.pt", "split": "val",
            "attack": {"name": name, "norm": "inf", **attack}}  # fmt: skip


def test_autoattack_is_no_iteration_point_and_identical_series_say_so(tmp_path: Path) -> None:
    """AutoAttack (Square counts queries) stays off the iterations axis; two series with the
    same points are both visible: the legend says they coincide."""
    records = [
        _record("clean", 0.25),
        _record("autoattack", 0.75, epsilon=4.0, iter=100, queries=5000),
        _record("pgd", 0.75, epsilon=4.0, iter=10, target="none", step_size=1.0),
    ]
    by_iter = robust_accuracy_curves(records, "iter")
    assert not any("AutoAttack" in label for label in by_iter), by_iter
    assert by_iter == {"r/m.pt: PGD untargeted, L-inf eps=4": [(0.0, 0.75), (10.0, 0.25)]}
    by_eps = robust_accuracy_curves(records, "epsilon")
    assert len(by_eps) == 2 and len(set(map(tuple, by_eps.values()))) == 1  # identical points
    figure = draw_curves(by_eps, "epsilon (pixels)")
    figure.savefig(tmp_path / "identical.png")
    labels = [line.get_label() for line in figure.axes[0].lines]
    assert sum("(same points as " in label for label in labels) == 1, labels
    assert all(line.get_linestyle() == "None" for line in figure.axes[0].lines)


def test_series_differing_in_another_setting_stay_apart() -> None:
    """Records that differ in a setting besides the swept one (loss, defense) are never merged
    into one line (one would overwrite the other's points); their labels say what differs."""

    def record(eps: float, loss: str, error: float, defense: str | None = None) -> dict:
        attack = {"name": "pgd", "epsilon": eps, "norm": "inf", "target": "none", "iter": 10,
                  "step_size": eps / 4, "loss": loss}  # fmt: skip
        return {"top1_error": error, "images": 8, "attack": attack, "checkpoint": "r/m.pt",
                "split": "val", "defense": defense}  # fmt: skip

    records = [record(4, "ce", 0.5), record(8, "ce", 0.75), record(4, "cw", 0.25),
               record(8, "cw", 0.5), record(8, "ce", 0.625, "jpeg:75")]  # fmt: skip
    curves = robust_accuracy_curves(records, "epsilon")
    assert curves == {
        "r/m.pt: PGD-10 untargeted, L-inf": [(4.0, 0.5), (8.0, 0.25)],
        "r/m.pt: PGD-10 untargeted, L-inf, CW loss": [(4.0, 0.75), (8.0, 0.5)],
        "r/m.pt: PGD-10 untargeted, L-inf, defense jpeg:75": [(8.0, 0.375)],
    }


def test_minimal_epsilon_plot_reads_the_records(study: dict[str, Path], tmp_path: Path) -> None:
    record = json.loads((study["evals"] / "minimal.json").read_text())
    median = record["details"]["median_min_epsilon"]
    _, records = collect([study["evals"]])
    ((label, (value, tried)),) = minimal_epsilons(records).items()
    assert label == f"{MODEL}: {record['threat_model']}"
    assert (value, tried) == (median, 32.0)
    figure = draw_minimal({label: (value, tried), "z/model: not broken": (math.inf, 16.0)})
    ax = figure.axes[0]
    # Bottom up: the not-broken one (to the largest epsilon tried), then the record's.
    assert [patch.get_width() for patch in ax.patches] == [16.0, value]
    assert [t.get_text() for t in ax.texts] == ["z/model: not broken", "> 16", label, f"{value:g}"]

    report = tmp_path / "report"
    assert main(["--report", str(study["evals"]), "--out", str(report)]) == 0
    assert (report / "minimal_epsilon.png").read_bytes().startswith(PNG_MAGIC)


def test_report_of_a_run_directory_alone(study: dict[str, Path], tmp_path: Path) -> None:
    """In-training evaluations fill the table; a one-point series (eval-10step) shows."""
    run = study["run"]
    report = tmp_path / "report"
    assert main(["--report", str(run), "--out", str(report)]) == 0
    for name in ("training.png", "accuracy_vs_iterations.png", "accuracy_vs_epsilon.png"):
        data = (report / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name

    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = {r["phase"]: r for r in logged if r["phase"].startswith("eval-")}
    assert sorted(last) == ["eval-10step", "eval-clean"]
    assert last["eval-10step"]["attack"]["iter"] == 10
    assert "PGD-10 random target" in last["eval-10step"]["threat_model"]

    table = (report / "report.md").read_text()
    (row,) = table.splitlines()[2:]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    clean, pgd10 = last["eval-clean"], last["eval-10step"]
    assert cells[0] == MODEL
    assert cells[1] == f"{100 * clean['eval-clean/top1_error']:.1f}"
    assert cells[2] == (
        f"{100 * pgd10['eval-10step/top1_error']:.1f} / "
        f"{100 * pgd10['eval-10step/attack_success_rate']:.1f}"
    )
    assert cells[3] == cells[4] == "–"  # no PGD-100 in a light schedule, nothing untargeted

    training, records = collect([run])
    assert {r["checkpoint"] for r in records} == {str(run / "checkpoint-epoch0001.pt")}
    by_iter = robust_accuracy_curves(records, "iter")
    ((label, points),) = by_iter.items()
    assert label == f"{MODEL}: PGD random target, L-inf eps=16"
    assert points == [
        (0.0, 1 - clean["eval-clean/top1_error"]),
        (10.0, 1 - pgd10["eval-10step/top1_error"]),
    ]

    panels = training_curves(training)
    steps = [r["step"] for r in logged if r["phase"] == "train"]
    assert [x for x, _ in panels["train/loss"]["run"]] == steps == [1, 2]
    assert len(panels["train/top1_error"]["run eval-10step"]) == 1
    drawn = draw_training(panels).axes[1].lines
    one_point = [line for line in drawn if line.get_label() == "run eval-10step"]
    assert len(one_point) == 1 and one_point[0].get_marker() == "o"  # visible alone


def test_report_of_a_run_and_its_evaluations(study: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "report"
    assert main(["--report", str(study["run"]), str(study["evals"]), "--out", str(report)]) == 0
    _, records = collect([study["run"], study["evals"]])
    table = (report / "report.md").read_text()
    assert table == zoo_table(records)
    (row,) = table.splitlines()[2:]  # the run's evaluations and --eval's: one model
    cells = [c.strip() for c in row.split("|")[1:-1]]
    pgd10 = next(r for r in records if r["attack"].get("iter") == 10)  # in training
    assert cells[2] == f"{100 * pgd10['top1_error']:.1f} / {100 * pgd10['attack_success_rate']:.1f}"
    worst = max(
        (r for r in records if r["attack"]["name"] != "clean"), key=lambda r: r["top1_error"]
    )
    assert cells[5] == f"{100 * worst['top1_error']:.1f} ({worst['threat_model']})"
    assert "accuracy" not in table.splitlines()[0]  # one convention: top-1 error throughout
    labels = robust_accuracy_curves(records, "iter")
    assert f"{MODEL}: PGD random target, L-inf eps=16" in labels  # in training
    assert f"{MODEL}: PGD random target, L-inf eps=8" in labels  # --eval's sweep


def test_report_of_nothing_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["--report", str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    assert "no metrics.jsonl and no evaluation records" in capsys.readouterr().err


def test_a_paired_runs_loss_panel_shows_its_two_terms(tmp_path: Path) -> None:
    """--lp-weight runs log train/cross_entropy and train/logit_pairing: the loss panel draws
    them beside the loss, labelled; a run without them keeps its one line."""
    training = [
        {"run": "alp", "step": s, "train/loss": 1.0 + s, "train/cross_entropy": 0.9 + s,
         "train/logit_pairing": 0.2 * s}
        for s in (1, 2)
    ] + [{"run": "plain", "step": 1, "train/loss": 2.0}]  # fmt: skip
    panels = training_curves(training)["train/loss"]
    assert panels == {
        "alp": [(1, 2.0), (2, 3.0)],
        "alp cross-entropy": [(1, 1.9), (2, 2.9)],
        "alp logit pairing (unweighted)": [(1, 0.2), (2, 0.4)],
        "plain": [(1, 2.0)],
    }
    figure = draw_training(training_curves(training))
    figure.savefig(tmp_path / "training.png")
    loss_axes = figure.axes[0]
    assert [line.get_label() for line in loss_axes.lines] == sorted(panels)
    assert "two terms" in loss_axes.get_title() and "--lp-weight" in loss_axes.get_title()
    plain = draw_training(training_curves(training[2:]))
    plain.savefig(tmp_path / "plain.png")
    assert "lp-weight" not in plain.axes[0].get_title()  # not used: not mentioned


GOOD_LINE = {"step": 1, "train/loss": 2.0}
EVAL_LINE = {"step": 2, "epoch": 1, "phase": "eval-clean", "eval-clean/top1_error": 0.5,
             "eval-clean/top5_error": 0.1, "images": 4, "attack": {"name": "clean"},
             "threat_model": "clean"}  # fmt: skip


@pytest.mark.parametrize(
    "bad",
    [
        "[1, 2]",  # a list, not an object
        json.dumps({"train/loss": 1.0}),  # no step
        json.dumps({k: v for k, v in EVAL_LINE.items() if k != "images"}),  # an eval, no images
        json.dumps({"step": 3, "train/loss": "high"}),  # a string value
        json.dumps({**EVAL_LINE, "eval-clean/top1_error": "0.5"}),
        json.dumps({**EVAL_LINE, "attack": {"name": ["pgd"]}}),
        '{"step": 4, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",  # deeper than the parser
    ],
    ids=["list", "no-step", "no-images", "string", "string-eval", "list-name", "deep"],
)
def test_a_metrics_line_it_cannot_use_is_skipped_naming_file_and_line(
    tmp_path: Path, capsys, bad: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps(GOOD_LINE), bad, json.dumps(EVAL_LINE)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["--report", str(run), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"{run / 'metrics.jsonl'}:2: skipped" in err and "Traceback" not in err, err
    assert err.count("warning") == 1
    training, evaluations = collect([run])
    assert [r["step"] for r in training] == [1, 2] and len(evaluations) == 1


def test_a_string_in_an_evaluation_record_is_skipped_naming_the_record(
    tmp_path: Path, capsys
) -> None:
    good = {"top1_error": 0.5, "images": 4, "attack": {"name": "clean"}}
    (tmp_path / "sweep.json").write_text(json.dumps([good, {**good, "top1_error": "x"}]))
    assert main(["--report", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert f"{tmp_path / 'sweep.json'}:record 2: skipped" in capsys.readouterr().err


def test_a_fifo_a_link_loop_or_an_unusable_out_is_one_line(tmp_path: Path, capsys) -> None:
    """Never a hang nor a traceback: a FIFO is refused unread, a symbolic link loop is named,
    and --out that is a file or under /proc is refused before any work."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(GOOD_LINE) + "\n")
    out = str(tmp_path / "out")
    os.mkfifo(run / "eval.json")
    assert main(["--report", str(run), "--out", out]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eval.json is not a regular file" in err, err
    (run / "eval.json").unlink()
    (run / "eval.json").symlink_to("eval.json")
    (run / "loop").symlink_to(run)  # a folder loop: not followed
    assert main(["--report", str(run), "--out", out]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eval.json is a symbolic link" in err, err
    (run / "eval.json").unlink()
    for metrics in ("fifo", "loop"):
        (run / "metrics.jsonl").unlink()
        if metrics == "fifo":
            os.mkfifo(run / "metrics.jsonl")
        else:
            (run / "metrics.jsonl").symlink_to("metrics.jsonl")
        assert main(["--report", str(run), "--out", out]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "metrics.jsonl" in err, err
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").write_text(json.dumps(GOOD_LINE) + "\n")
    (tmp_path / "file").write_text("")
    for bad_out in (tmp_path / "file", Path("/proc/report"), Path("/proc/self")):
        assert main(["--report", str(run), "--out", str(bad_out)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {bad_out}" in err, err
