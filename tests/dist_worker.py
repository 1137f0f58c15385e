"""One rank of the multi-process tests in test_distributed.py.

Usage: dist_worker.py OUT_DIR MODE [TIMEOUT_S]
  MODE "sum":   all-reduce rank + 1 and broadcast rank 0's value, then write rank<N>.json.
  MODE "dead":  as "sum", then rank 1 exits while rank 0 enters a second all-reduce.
  MODE "stall": as "sum", then rank 1 sleeps while rank 0 enters a second all-reduce.
Rank 0 touches rank0.entered just before that second all-reduce, which must fail.
"""

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from iat.runtime import distributed


def _report(env: distributed.DistEnv) -> dict:
    total = distributed.all_reduce_sum(torch.tensor([float(env.rank + 1)]))
    value = torch.tensor([42.0 if distributed.is_main_process() else -1.0])
    distributed.broadcast_tensor(value, src=0)
    distributed.barrier()
    return {
        **asdict(env),
        "sum": total.item(),
        "broadcast": value.item(),
        "get_rank": distributed.get_rank(),
        "get_world_size": distributed.get_world_size(),
    }


def _fail_collective(env: distributed.DistEnv, out_dir: Path, mode: str) -> None:
    if env.rank == 1:
        if mode == "stall":
            time.sleep(600)
        sys.exit(0)
    (out_dir / "rank0.entered").touch()
    distributed.all_reduce_sum(torch.ones(1))


def main() -> None:
    out_dir, mode = Path(sys.argv[1]), sys.argv[2]
    timeout_s = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
    env = distributed.detect()
    distributed.init(env, distributed.select_device(env), timeout_s=timeout_s)
    result = _report(env)
    (out_dir / f"rank{env.rank}.json").write_text(json.dumps(result))
    if mode in ("dead", "stall"):
        _fail_collective(env, out_dir, mode)
    distributed.cleanup()


if __name__ == "__main__":
    main()
