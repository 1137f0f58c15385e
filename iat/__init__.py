"""ImageNet adversarial training and robustness evaluation (the package behind ``main.py``).

One module per decision; the map is in README.md ("Layout"). Importing the package imports
nothing heavy: the data-server side (``iat.data.layouts``, ``augment``, ``sampling``,
``protocol``, ``client``, ``server``) never imports torch.
"""

import os

# OpenMP's threads wait for each other at the end of every parallel region. GNU OpenMP's default
# spins ~300,000 times first; on a machine busy with other processes a thread whose partner is
# descheduled spins away its time slice, and each operator waits for the scheduler: a PGD
# iteration of the demo's ResNet took 2,100-4,150 ms instead of 41 ms under a load of 11 on 2
# cores (bench/shared_machine.py, bench/RESULTS.md). Waiting passively keeps the slowdown
# proportional to the load. Set before torch is imported (OpenMP reads it once, at load), and
# only where the user has not chosen.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
