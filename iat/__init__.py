"""ImageNet adversarial training and robustness evaluation (the package behind ``main.py``).

One module per decision; the map is in README.md ("Layout"). Importing the package imports
nothing heavy: the data-server side (``iat.data.layouts``, ``augment``, ``sampling``,
``protocol``, ``client``, ``server``) never imports torch.
"""

import os

from iat.runtime.cpus import usable_cpus


def openmp_wait_policy(load: float, cpus: int) -> str | None:
    """The OpenMP wait policy for a machine with `load` runnable processes (the 1-minute load
    average) on `cpus` usable CPUs: "PASSIVE" when it is oversubscribed (a load of at least
    twice the CPUs: a machine merely kept full, e.g. by this project's own previous run, stays
    below), else None (OpenMP's default).

    Spinning threads collapse beside other busy processes, and passive ones are slower on a
    quiet machine (they sleep between the many small operators): so passive only where the
    machine is oversubscribed. Figures: bench/RESULTS.md, section 11 (bench/shared_machine.py).
    """
    return "PASSIVE" if load >= 2 * cpus else None


def _choose_openmp_wait_policy() -> None:
    """Applied once, on import, before torch loads OpenMP (which reads it once); a user's own
    OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    policy = openmp_wait_policy(os.getloadavg()[0], usable_cpus())
    if policy is not None:
        os.environ["OMP_WAIT_POLICY"] = policy


_choose_openmp_wait_policy()
