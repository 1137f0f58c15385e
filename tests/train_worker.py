"""One rank of a real multi-process training run (launched by torchrun or mpirun in the tests).

Usage: train_worker.py OUT_DIR MAIN_PY_FLAGS...  Trains as main.py would, then saves this
rank's final parameters and BatchNorm statistics to OUT_DIR/rank<R>.pt for comparison, and the
bytes of parameters and optimizer state it held (its shards under --fsdp) to OUT_DIR/rank<R>.json.
With TEST_LOGDIR_PER_RANK set, each rank gets its own run directory (--logdir + "-rank<R>").
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from iat.app.cli import resolve_resources
from iat.runtime import distributed
from iat.train.trainer import run_training
from main import build_parser, config_from_args


def run(out_dir: Path, argv: list[str]) -> None:
    env = distributed.detect()
    torch.set_num_threads(1)
    device = distributed.select_device(env)
    with distributed.process_group(env, device, timeout_s=120):
        train(out_dir, argv, env, device)


def train(out_dir: Path, argv: list[str], env: distributed.DistEnv, device: torch.device) -> None:
    """One training run of main.py's flags `argv` in the process group already formed."""
    cfg = resolve_resources(config_from_args(build_parser().parse_args(argv)), env)
    if os.environ.get("TEST_LOGDIR_PER_RANK"):  # machines that do not share the run directory
        cfg = dataclasses.replace(cfg, logdir=f"{cfg.logdir}-rank{env.rank}")
    outcome = run_training(cfg, env, device)
    torch.save(outcome.model.state_dict(), out_dir / f"rank{env.rank}.pt")
    facts = {"state_bytes": outcome.state_bytes}
    (out_dir / f"rank{env.rank}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2:])
