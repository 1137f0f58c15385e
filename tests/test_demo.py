"""The README's first command: `python main.py --demo`, end to end in a real process."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_demo_trains_attacks_predicts_and_shows_robustness(tmp_path):
    run = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "--demo", "--logdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "PGD-10 rand-target" in run.stdout and "PGD-10 untargeted" in run.stdout
    assert "strong-100" in run.stdout
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
        assert (tmp_path / f"attack-iter{k}" / "checkpoint-epoch0006.pt").exists()
        assert (tmp_path / f"attack-iter{k}" / "config.json").exists()
    # A second demo reuses the trained models and says so.
    again = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "--demo", "--logdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing the trained model") == 3, again.stdout
    assert again.stdout.count("reusing its evaluation") == 3, again.stdout  # no attack rerun
    assert again.stdout.count("reused") >= 3, again.stdout
    assert "reusing the digit images" in again.stdout
