"""The README's first command, `python main.py --demo`, at its quick scale (`--demo --quick`:
the same code path and table, fewer epochs and attack iterations), end to end in a real
process; the table streamed row by row, and kept when the demo is stopped."""

from __future__ import annotations

import re
import subprocess
import sys

import torch
from conftest import REPO

from iat.app import demo
from iat.eval.metrics import EvalResult

QUICK = [sys.executable, str(REPO / "main.py"), "--demo", "--quick"]


def test_demo_trains_attacks_predicts_and_shows_robustness(tmp_path):
    run = subprocess.run(
        [*QUICK, "--logdir", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "PGD-10 rand-target" in run.stdout and "PGD-10 untargeted" in run.stdout
    assert f"strong-{demo.QUICK.strong_iter}" in run.stdout
    assert re.search(r"^expected time: about \d+ (s|min)", run.stdout, re.M), run.stdout
    # Streamed: the first model's row is printed before the second model trains.
    first_row = re.search(r"^adversarial \(PGD-3\) .*\d$", run.stdout, re.M)
    assert first_row and first_row.start() < run.stdout.index("training clean"), run.stdout
    assert "model (accuracy)" in run.stdout  # the table's convention, in its header
    number = r"\s+([01]\.\d{3})"
    rows = {
        m.group(1): tuple(float(m.group(i)) for i in (2, 3, 4, 5))
        for m in re.finditer(
            rf"^(adversarial|clean|cheap) .*?{number * 4}\s+(\d+|reused)$", run.stdout, re.M
        )
    }
    (adv_clean, adv_pgd, adv_untargeted, adv_strong) = rows["adversarial"]
    (std_clean, std_pgd, std_untargeted, _) = rows["clean"]
    assert adv_clean > 0.8 and std_clean > 0.9, run.stdout
    assert adv_pgd > std_pgd + 0.3, run.stdout  # adversarial training clearly helps under PGD
    # Untargeted PGD is the stronger attack: never a higher accuracy than random-target PGD.
    assert adv_untargeted <= adv_pgd and std_untargeted <= std_pgd, run.stdout
    assert adv_strong <= adv_untargeted, run.stdout  # the ensemble includes stronger attacks
    # FGSM with a random start (one step) also makes the model robust, for less compute.
    cheap_clean, cheap_pgd, _, _ = rows["cheap"]
    assert cheap_clean > 0.7 and cheap_pgd > std_pgd + 0.3, run.stdout
    assert "adversarial training helps under attack: yes" in run.stdout
    lines = (tmp_path / "predictions.txt").read_text().splitlines()
    assert len(lines) == 360 and all(re.fullmatch(r"\d{4}\.png,\d", line) for line in lines)
    for k in (0, 3):
        run_dir = tmp_path / "quick" / f"attack-iter{k}"
        assert (run_dir / f"checkpoint-epoch{demo.QUICK.epochs:04d}.pt").exists()
        assert (run_dir / "config.json").exists()
    # A second demo reuses the trained models and says so.
    again = subprocess.run(
        [*QUICK, "--logdir", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing the trained model") == 3, again.stdout
    assert again.stdout.count("reusing its evaluation") == 3, again.stdout  # no attack rerun
    assert again.stdout.count("reused") >= 3, again.stdout
    assert "reusing the digit images" in again.stdout


def test_a_stopped_demo_keeps_the_rows_printed(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the second model: the first model's row stays, and the demo says where it
    stopped (exit status 130, as a shell reports SIGINT)."""
    calls = []

    def train_and_evaluate(cfg, nprocs, scale):
        calls.append(cfg.logdir)
        if len(calls) == 2:
            raise KeyboardInterrupt
        result = EvalResult(360, top1_error=0.25, top5_error=0.0, attack_success_rate=0.5)
        return [result] * len(demo.columns(scale)), 12.0

    monkeypatch.setattr(demo, "train_and_evaluate", train_and_evaluate)
    monkeypatch.setattr(demo, "measure_unit", lambda cfg, nprocs, cpus: 0.01)
    assert demo.run_demo(str(tmp_path), quick=True) == 130
    out = capsys.readouterr().out
    assert re.search(r"^adversarial \(PGD-3\)\s+0\.750\s+0\.750\s+0\.750\s+0\.750\s+12$", out, re.M)
    assert "stopped after 1 of 3 models" in out
    assert out.index("expected time: about") < out.index("model (accuracy)")


def test_the_estimate_counts_every_models_passes():
    """The expected time grows with what each scale trains and attacks: the full demo costs
    several times the quick one."""
    quick = demo.estimate_seconds(demo.QUICK, 1437, 360, unit_s=0.01)
    full = demo.estimate_seconds(demo.FULL, 1437, 360, unit_s=0.01)
    assert quick > 0 and full > 3 * quick


def test_the_unit_is_measured_as_each_training_process_runs(monkeypatch):
    """Each of `nprocs` processes trains on its share of the batch with its share of the
    threads; the estimate's pass is measured so (a whole-batch pass on every thread measured up
    to 10x slower on a busy machine), and the evaluation's threads are given back."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((x.shape[0], torch.get_num_threads()))
            return x.mean()

    monkeypatch.setattr(demo, "build_model", lambda cfg, classes, device: Probe())
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert demo.measure_unit(None, nprocs=2, cpus=4, repeats=2) >= 0
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
    assert seen == [(demo.TOTAL_BATCH // 2, 2)] * 3
