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
    rows = {
        m.group(1): (float(m.group(2)), float(m.group(3)))
        for m in re.finditer(
            r"^(adversarial|clean) .*?\s([01]\.\d{3})\s+([01]\.\d{3})$", run.stdout, re.M
        )
    }
    (adv_clean, adv_pgd), (std_clean, std_pgd) = rows["adversarial"], rows["clean"]
    assert adv_clean > 0.8 and std_clean > 0.9, run.stdout
    assert adv_pgd > std_pgd + 0.3, run.stdout  # adversarial training clearly helps under PGD
    assert "adversarial training helps under attack: yes" in run.stdout
    lines = (tmp_path / "predictions.txt").read_text().splitlines()
    assert len(lines) == 360 and all(re.fullmatch(r"\d{4}\.png,\d", line) for line in lines)
    for k in (0, 3):
        assert (tmp_path / f"attack-iter{k}" / "checkpoint-epoch0006.pt").exists()
        assert (tmp_path / f"attack-iter{k}" / "config.json").exists()
