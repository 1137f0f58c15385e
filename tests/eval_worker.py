"""One rank of test_multiprocess's attack-zoo evaluation: each named attack on val/ in turn.

Usage: eval_worker.py OUT_DIR CHECKPOINT DATA ATTACK...
Rank 0 writes OUT_DIR/<attack>.json, the --eval-output record of each attack. One launch
evaluates every attack, so that the comparison of 1 and 2 processes starts few processes.
"""

import json
import sys
from pathlib import Path

import torch

from adv_model import DEFAULT_QUERIES
from iat.attacks import ATTACKS
from iat.builders import load_for_inference
from iat.config import Config
from iat.data.layouts import create_reader
from iat.eval.evaluate import eval_record, evaluate_attack
from iat.runtime import distributed


def attack_config(checkpoint: str, data: str, attack: str) -> Config:
    """A tiny model, odd batches over the ranks, and every option the attack takes."""
    return Config(
        mode="eval", load=checkpoint, data=data, arch="ResNet", num_blocks=(1, 1, 1, 1), width=8,
        image_size=32, batch=2, workers=0, attack=attack, attack_iter=2, attack_epsilon=16.0,
        attack_step_size=4.0, restarts=2 if ATTACKS[attack].restarts else 1, eps_step=4.0,
        apgd_targets=2, attack_loss="cw" if attack == "pgd" else "ce",
        queries=20 if ATTACKS[attack].queries else DEFAULT_QUERIES,
    )  # fmt: skip


def main() -> None:
    out_dir, checkpoint, data, *attacks = sys.argv[1:]
    env = distributed.detect()
    device = distributed.select_device(env)
    torch.set_num_threads(1)
    distributed.init(env, device, timeout_s=120.0)
    samples = create_reader(data).samples("val")
    for attack in attacks:
        model, cfg = load_for_inference(attack_config(checkpoint, data, attack), device)
        result = evaluate_attack(
            model, cfg, samples, attack_iter=cfg.attack_iter, num_classes=cfg.num_classes,
            device=device, desc=attack, name=attack,
        )  # fmt: skip
        if distributed.is_main_process():
            record = eval_record(cfg, result)
            (Path(out_dir) / f"{attack}.json").write_text(json.dumps(record))
    distributed.cleanup()


if __name__ == "__main__":
    main()
