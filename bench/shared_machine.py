"""An attack iteration on a shared machine: how OpenMP's wait policy turns a busy machine into a
collapse, and what this project's default (``iat/__init__.py``) does about it.

    python bench/shared_machine.py [--busy 4] [--repeats 3]

Runs a PGD iteration (forward and input gradient) of the demo's tiny ResNet on 32 images of
32x32, in a fresh process per setting (OpenMP reads its environment once, at start), first on
the quiet machine and then with ``--busy`` busy-loop processes started by this script. Settings:
1 thread; all usable CPUs with OpenMP's default wait policy (libgomp spins ~300,000 times
before sleeping, so a thread whose partner is descheduled burns its time slice); and all CPUs
with the project's default, ``OMP_WAIT_POLICY=PASSIVE`` (set on import of ``iat`` unless
given; the probe imports only ``nets``, so each setting is as stated). Prints
the milliseconds per iteration (median of the repeats) and each setting's slowdown under load.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROBE = """
import os, sys, time, torch
sys.path.insert(0, {repo!r})
import nets
torch.set_num_threads({threads})
model = nets.build_model("ResNet", num_blocks=[1, 1, 1, 1], width=16, num_classes=10).eval()
x = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255
def step(x):
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    return (x + grad.sign()).detach()
for _ in range(3):
    x = step(x)
start = time.perf_counter()
for _ in range({iterations}):
    x = step(x)
print((time.perf_counter() - start) / {iterations} * 1000)
"""


def busy_loop() -> None:
    while True:
        pass


def measure(threads: int, setting: dict[str, str], iterations: int) -> float:
    """Milliseconds per iteration in a fresh process with the OpenMP `setting` (environment
    variables; empty: OpenMP's defaults)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(setting)
    code = PROBE.format(repo=str(REPO), threads=threads, iterations=iterations)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=int, default=4, help="busy-loop processes for the load")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    settings = [
        ("1 thread", 1, {}),
        (f"{cpus} threads, OpenMP default (spin)", cpus, {}),
        (f"{cpus} threads, GOMP_SPINCOUNT=10000", cpus, {"GOMP_SPINCOUNT": "10000"}),
        (f"{cpus} threads, OMP_WAIT_POLICY=PASSIVE", cpus, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ]
    results: dict[str, dict[str, float]] = {name: {} for name, _, _ in settings}
    for load in ("quiet", f"{args.busy} busy processes"):
        workers = []
        if load != "quiet":
            workers = [multiprocessing.Process(target=busy_loop) for _ in range(args.busy)]
            for w in workers:
                w.start()
            time.sleep(1.0)
        try:
            for name, threads, setting in settings:
                runs = [measure(threads, setting, args.iterations) for _ in range(args.repeats)]
                results[name][load] = statistics.median(runs)
                print(f"{load:>18}  {name:<40} {results[name][load]:9.1f} ms", flush=True)
        finally:
            for w in workers:
                w.terminate()
                w.join()
    print(f"\n{cpus} usable CPUs, {args.busy} busy processes; ms per PGD iteration (median of "
          f"{args.repeats}), slowdown under load:")  # fmt: skip
    for name, figures in results.items():
        quiet, busy = figures.values()
        print(f"  {name:<40} quiet {quiet:8.1f}  busy {busy:9.1f}  x{busy / quiet:6.1f}")


if __name__ == "__main__":
    main()
